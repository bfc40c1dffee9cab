"""PyTorch datasets that turn table rows into ControlNet training examples.

Each example is the target image in [-1, 1], the conditioning image in [0, 1] (both
resized + centre-cropped to the same square, so the control stays aligned) and a caption.
A sample whose image cannot be read yields ``None`` instead of raising: one corrupt file
in a 50k-row data set must not kill a run hours in. ``collate_examples`` drops the
``None`` items and counts them, so the trainer can log how many were skipped and still
count examples consumed exactly (which resuming a stream relies on).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch
import torch.utils.data

from difftune.data.images import ImageLoadError, load_image
from difftune.data.columns import (
    bad_caption_words,
    captions_look_like_paths,
    column_contents_problem,
    describe_value,
)
from difftune.data.sources import Table
from difftune.data.transforms import (
    aspects_differ,
    check_resolution,
    conditioning_to_tensor,
    image_to_tensor,
    misaligned_words,
    resize_center_crop,
    resize_center_crop_geometry,
)
from difftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)
_PEEK_ROWS = 5  # rows looked at to catch a mixed-up column mapping before training


class _ExampleBuilder:
    """Row → example; shared by the map-style and the streaming dataset."""

    def __init__(
        self,
        table: Table,
        image_column: str,
        conditioning_image_column: str,
        caption_column: str,
        resolution: int,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        interpolation: str = "bilinear",
    ) -> None:
        check_resolution(resolution)
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ConfigError(f"--proportion_empty_prompts {proportion_empty_prompts} must be between 0 and 1")
        known = table.dataset.column_names  # None for some streams; then rows are trusted
        for flag, column in (("--image_column", image_column), ("--conditioning_image_column", conditioning_image_column),
                             ("--caption_column", caption_column)):
            if known is not None and column not in known:
                raise DataError(f"{flag} {column!r} not in the data set's columns: {', '.join(known)} — pass one of those")
        if not table.streaming:  # a stream is not read here; `difftune data check` looks at it
            first = [table.dataset[i] for i in range(min(_PEEK_ROWS, len(table.dataset)))]
            problem = column_contents_problem(first, image_column, conditioning_image_column, caption_column)
            if problem is not None:
                raise DataError(f"{table.description}: {problem}")
            if captions_look_like_paths(first, caption_column):
                logger.warning("the caption column %r of %s holds image file names (%s): the model would learn "
                               "them as prompts — set --caption_column to the captions", caption_column,
                               table.description, describe_value(first[0][caption_column]))
        self.table = table
        self.image_column = image_column
        self.conditioning_image_column = conditioning_image_column
        self.caption_column = caption_column
        self.resolution = resolution
        self.proportion_empty_prompts = proportion_empty_prompts
        self.seed = seed
        self.interpolation = interpolation
        self.epoch = 0
        self._aspect_warned = False
        self._upscale_warned = False

    def _warn_misaligned(self, image_size: tuple[int, int], conditioning_size: tuple[int, int], index: int) -> None:
        """Once per run: an image and its condition of other shapes are center-cropped differently, so the
        condition no longer lies over what it describes (``difftune data check`` lists every such row)."""
        if self._aspect_warned or not aspects_differ(image_size, conditioning_size):
            return
        self._aspect_warned = True
        logger.warning("%s of %s: %s (further rows are not reported: `difftune data check` lists them all)",
                       self.table.row_name(index), self.table.description,
                       misaligned_words(image_size, conditioning_size))

    def set_epoch(self, epoch: int) -> None:
        """Vary caption choice / prompt dropping per epoch, reproducibly (call before iterating)."""
        self.epoch = int(epoch)

    def caption(self, value: Any, index: int) -> str:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if isinstance(value, str):
            caption = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            # Several captions per image: pick one, seeded by index so a resumed run agrees.
            caption = value[int(rng.integers(len(value)))] if value else ""
        else:
            raise DataError(f"{self.table.row_name(index)}, column {self.caption_column!r} of {self.table.description}: "
                            f"{bad_caption_words(value, self.caption_column)}")
        # diffusers' --proportion_empty_prompts: train some steps unconditionally (for CFG).
        if self.proportion_empty_prompts and rng.random() < self.proportion_empty_prompts:
            return ""
        return caption

    def build(self, row: dict, index: int, with_image: bool = True) -> dict | None:
        """The example of ``row``; ``with_image=False`` leaves out the target image (and its
        geometry): an encoded cache (``difftune.encoded_cache``) already holds its latents."""
        base = self.table.base_dir
        try:
            where = self.table.row_name(index)
            image = (load_image(row[self.image_column], base, f"{where}, column {self.image_column!r}")
                     if with_image else None)
            conditioning = load_image(
                row[self.conditioning_image_column], base, f"{where}, column {self.conditioning_image_column!r}"
            )
        except ImageLoadError as err:
            logger.warning("skipping a sample: %s", err)
            return None
        r, mode = self.resolution, self.interpolation
        example = {
            "conditioning_pixel_values": conditioning_to_tensor(resize_center_crop(conditioning, r, mode)),
            "caption": self.caption(row[self.caption_column], index),
            "index": index,
        }
        if image is not None:
            self._warn_misaligned(image.size, conditioning.size, index)
            if not self._upscale_warned and min(image.size) < r:
                self._upscale_warned = True
                logger.warning("%s of %s: the image is %dx%d, smaller than --resolution %d on its short side, so it "
                               "is upscaled (blurry); further rows are not reported (`difftune data check` lists "
                               "them all)", where, self.table.description, image.size[0], image.size[1], r)
            _, crop_top_left = resize_center_crop_geometry(image.size, r)
            example["pixel_values"] = image_to_tensor(resize_center_crop(image, r, mode))
            # SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): size before resizing, crop offset
            example["original_size"] = (image.height, image.width)
            example["crop_top_left"] = crop_top_left
        return example


def _is_text(feature: Any) -> bool:
    """A datasets feature of strings or of lists of strings."""
    from datasets import Value

    feature = getattr(feature, "feature", feature)  # a list's items
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


class ControlNetExamples(torch.utils.data.Dataset):
    """Map-style dataset over a non-streaming Table.

    Item ``i``: ``{"pixel_values": [3,R,R] in [-1,1], "conditioning_pixel_values":
    [3,R,R] in [0,1], "caption": str, "index": i, "original_size": (h, w), "crop_top_left": (top, left)}``,
    or ``None`` if an image is unreadable.
    """

    def __init__(
        self,
        table: Table,
        image_column: str,
        conditioning_image_column: str,
        caption_column: str,
        resolution: int,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        interpolation: str = "bilinear",
    ) -> None:
        if table.streaming:
            raise DataError(f"{table.description} is streaming: use StreamingControlNetExamples")
        self._builder = _ExampleBuilder(
            table, image_column, conditioning_image_column, caption_column, resolution, proportion_empty_prompts, seed,
            interpolation,
        )
        self._check_captions()

    def _check_captions(self) -> None:
        """A caption that is not text stops the run at its start, naming the row, rather than hours in
        when that row is drawn (an unreadable image is skipped instead: a caption cannot be guessed)."""
        b = self._builder
        dataset = b.table.dataset
        if _is_text(dataset.features.get(b.caption_column)) and not dataset.data.column(b.caption_column).null_count:
            return  # Arrow's own type and null count say every value is text: nothing to scan
        for index, value in enumerate(dataset[b.caption_column]):
            b.caption(value, index)  # raises on the first bad one

    def set_epoch(self, epoch: int) -> None:
        self._builder.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._builder.table.dataset)

    def __getitem__(self, index: int) -> dict | None:
        return self.example(index)

    def example(self, index: int, with_image: bool = True) -> dict | None:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._builder.build(self._builder.table.dataset[int(index)], int(index), with_image)

    def caption_values(self) -> list:
        """The caption column's raw values (strings or lists of strings), for caching their embeddings."""
        b = self._builder
        return list(b.table.dataset[b.caption_column])


class StreamingControlNetExamples(torch.utils.data.IterableDataset):
    """Iterable dataset over a streaming Table, with the same items (``None`` if unreadable).

    Work is split across DataLoader workers by example (worker ``w`` of ``W`` decodes
    stream positions ``w, w+W, ...``), not by shard: every worker reads the stream's
    rows (cheap: images are not decoded) but decodes only its own, so any number of
    workers sees one global order, and ``skip(n)`` resumes after exactly ``n`` examples.
    """

    def __init__(
        self,
        table: Table,
        image_column: str,
        conditioning_image_column: str,
        caption_column: str,
        resolution: int,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        skipped: int = 0,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self._builder = _ExampleBuilder(
            table, image_column, conditioning_image_column, caption_column, resolution, proportion_empty_prompts, seed,
            interpolation,
        )
        self._skipped = int(skipped)

    def set_epoch(self, epoch: int) -> None:
        self._builder.set_epoch(epoch)

    def skip(self, n: int) -> "StreamingControlNetExamples":
        """A copy that starts ``n`` examples further into the stream (for resuming)."""
        b = self._builder
        copy = StreamingControlNetExamples(
            b.table, b.image_column, b.conditioning_image_column, b.caption_column, b.resolution,
            b.proportion_empty_prompts, b.seed, skipped=self._skipped + int(n), interpolation=b.interpolation,
        )
        copy.set_epoch(b.epoch)
        return copy

    def _rows(self) -> Iterator[dict]:
        dataset = self._builder.table.dataset
        if self._skipped:
            dataset = dataset.skip(self._skipped)  # skips whole arrow batches, no per-row Python
        # .iter() rather than iter(): inside a DataLoader worker, iter() would let `datasets`
        # split by shard on its own, on top of our split by example.
        for batch in dataset.iter(batch_size=1):
            yield {column: values[0] for column, values in batch.items()}

    def __iter__(self) -> Iterator[dict | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for offset, row in enumerate(self._rows()):
            if offset % workers == worker:
                yield self._builder.build(row, self._skipped + offset)


def collate_examples(items: list[dict | None]) -> dict:
    """Stack the readable examples; ``n_skipped`` counts the unreadable ones.

    Returns ``{"pixel_values": [B,3,R,R] (or "latent_mean"/"latent_std" [B,C,h,w] from a cache),
    "conditioning_pixel_values": [B,3,R,R], "n_images": B,
    "captions": list[str], "indices": LongTensor[B], "original_sizes": LongTensor[B, 2] (h, w),
    "crop_top_lefts": LongTensor[B, 2] (top, left), "n_skipped": int}``, or
    ``{"empty": True, "n_skipped": k}`` when no item of the batch could be read.
    """
    kept = [item for item in items if item is not None]
    n_skipped = len(items) - len(kept)
    if not kept:
        return {"empty": True, "n_skipped": n_skipped}
    batch = {
        "conditioning_pixel_values": torch.stack([i["conditioning_pixel_values"] for i in kept]).contiguous().float(),
        "captions": [i["caption"] for i in kept],
        "indices": torch.tensor([i["index"] for i in kept], dtype=torch.long),
        "original_sizes": torch.tensor([i["original_size"] for i in kept], dtype=torch.long),
        "crop_top_lefts": torch.tensor([i["crop_top_left"] for i in kept], dtype=torch.long),
        "n_images": len(kept),
        "n_skipped": n_skipped,
    }
    if "pixel_values" in kept[0]:
        batch["pixel_values"] = torch.stack([i["pixel_values"] for i in kept]).contiguous().float()
    else:  # from an encoded cache: the latent distribution instead of the pixels
        batch["latent_mean"] = torch.stack([i["latent_mean"] for i in kept]).contiguous()
        batch["latent_std"] = torch.stack([i["latent_std"] for i in kept]).contiguous()
    return batch
