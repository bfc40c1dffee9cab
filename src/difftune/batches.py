"""What the training loop reads from: the per-epoch sampler, the micro-batch stream (with a look
ahead for a readable batch), and a step's scalars read from the device without stalling it."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from .errors import UserError


class Lookahead:
    """A batch iterator that can look ahead for the next readable batch without consuming it."""

    def __init__(self, batches, limit: int):
        self._batches, self._ahead, self._limit = batches, [], limit

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self._ahead.pop(0) if self._ahead else next(self._batches)

    def next_readable(self) -> dict:
        """The first batch ahead with a readable sample in it; it stays in the stream."""
        for batch in self._ahead:
            if not batch.get("empty"):
                return batch
        while len(self._ahead) <= self._limit:
            self._ahead.append(next(self._batches))
            if not self._ahead[-1].get("empty"):
                return self._ahead[-1]
        raise UserError(f"none of the {self._limit} batches of this process's share of the data could be read; "
                        "check the data (difftune data check DIR) and fix or remove the unreadable files.")


class DeviceScalars:
    """A step's scalars (e.g. its loss), read on the host later without waiting for the work queued after them.

    ``.item()`` on a GPU tensor waits for everything queued before it, so the host cannot
    prepare the next step meanwhile. Here the values are copied to pinned host memory in the
    stream's order and only that copy is waited for, when ``get`` is called.
    """

    def __init__(self, values: torch.Tensor):
        self._event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            values = host
        self._values = values
        self._read: list[float] | None = None

    def get(self) -> list[float]:
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            self._read = self._values.tolist()
        return self._read


class EpochSampler(Sampler[int]):
    """A fresh permutation of the data set each epoch, a pure function of (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def images_in(batch: dict) -> int:
    """Images in a collated batch: ``n_images`` if the method counts them, else the pixel batch size."""
    return int(batch["n_images"]) if "n_images" in batch else int(batch["pixel_values"].shape[0])
