"""Conditioning images from plain images: ``difftune data conditions`` (canny, ...).

A user with a folder of photos and captions gets a ControlNet data set the trainer reads:
each image is (optionally) resized and centre-cropped to the training resolution *first*,
then its condition is computed at that size (an edge map resized afterwards would be blurred
by the trainer's bilinear resampling), and both are written as PNGs with a
``metadata.jsonl`` of file paths and captions.

Conditions plug in through ``CONDITIONERS`` (name -> a class with ``__call__(PIL RGB image)
-> PIL RGB condition``, optionally a faster ``batch(images)``, and the settings to record);
the settings are written to ``difftune_dataset.json`` so that ``difftune eval controlnet``
computes the same condition on generated images. ``canny`` is OpenCV's Canny on the RGB image (the gradient of the channel
that changes most), white edges on black, thresholds 100 / 200 by default: what the
diffusers and ControlNet documentation use, so a ControlNet trained here takes the edge maps
people make for those at generation time. ``depth`` is a transformers depth estimator's map
(``Intel/dpt-hybrid-midas`` by default, or any local folder), scaled to its maximum.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from difftune.data.picture_folder import IMAGE_SUFFIXES, find_images, read_captions, warn_small_or_uncaptioned
from difftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MANIFEST = "difftune_dataset.json"


def _cv2():
    try:
        import cv2
    except ImportError as err:
        raise ConfigError(
            "the canny condition needs OpenCV: pip install 'difftune[conditions]' "
            "(or opencv-python-headless; any OpenCV that imports as cv2 will do)"
        ) from err
    return cv2


class Conditioner:
    """What every condition shares: its ``name``, whether it must run in the main process, and
    its ``settings()`` (the dataclass fields plus the name), which ``conditioner_from_settings``
    turns back into the same conditioner."""

    name = ""
    in_process = False  # True for model-based conditions: not copied into worker processes
    # Where the settings were read from when no flag gave them (a data set's difftune_dataset.json), for messages;
    # not a setting (``conditioner_from_settings`` sets it on the instance).
    recorded_in: str | None = None

    def settings(self) -> dict:
        return {"condition": self.name, **asdict(self)}

    def load(self) -> None:
        """Load what the condition needs now (a model), so that it fails before minutes of other work."""

    def batch(self, images: list[Image.Image]) -> list[Image.Image]:
        """The conditions of several images; model-based conditions run them as one batch."""
        return [self(image) for image in images]

    @staticmethod
    def grey_rgb(values: np.ndarray) -> Image.Image:
        """A uint8 ``[H, W]`` map as a 3-channel image (what ControlNets take)."""
        return Image.fromarray(np.repeat(values[:, :, None], 3, axis=2))


@dataclass(frozen=True)
class Canny(Conditioner):
    """Canny edges (white on black, RGB) with hysteresis thresholds on the 0-255 gradient scale."""

    low_threshold: int = 100
    high_threshold: int = 200

    name = "canny"

    def __post_init__(self) -> None:
        if not 0 <= self.low_threshold <= self.high_threshold:
            raise ConfigError(
                f"--low_threshold {self.low_threshold} / --high_threshold {self.high_threshold}: "
                "need 0 <= low <= high (e.g. 100 and 200)"
            )

    def edges(self, image: np.ndarray) -> np.ndarray:
        """Boolean ``[H, W]`` edge map of a uint8 ``[H, W, 3]`` RGB image."""
        return _cv2().Canny(np.ascontiguousarray(image), self.low_threshold, self.high_threshold) > 0

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.grey_rgb(self.edges(np.asarray(image.convert("RGB"))).astype(np.uint8) * 255)


DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"  # the estimator diffusers' depth ControlNet docs use
_DEPTH_MODELS: dict[str, tuple] = {}  # model -> (processor, model, device), loaded once per process


@dataclass(frozen=True)
class Depth(Conditioner):
    """A monocular depth map from a transformers depth estimator (DPT, Depth Anything, ...).

    Grey levels are the estimator's output scaled so that its maximum is 255 (MiDaS-style
    models predict inverse depth: near is bright), as transformers' depth-estimation pipeline
    writes them and as depth ControlNets are trained. Weights load from safetensors only.
    The model runs in the main process, on CUDA when there is one.
    """

    model: str = DEFAULT_DEPTH_MODEL

    name = "depth"
    in_process = True

    def settings(self) -> dict:
        """A local model folder as an absolute path, so that a data set's record of it reads the same from
        any folder (``eval controlnet --data`` run elsewhere); a hub id as it is."""
        model = os.path.abspath(self.model) if Path(self.model).is_dir() else self.model
        return {"condition": self.name, "model": model}

    def load(self) -> None:
        self._load()

    def _load(self) -> tuple:
        if self.model not in _DEPTH_MODELS:
            import torch
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            from difftune.errors import ModelLoadError

            try:
                processor = AutoImageProcessor.from_pretrained(self.model)
                net = AutoModelForDepthEstimation.from_pretrained(self.model, use_safetensors=True).eval()
            except (OSError, ValueError) as err:
                where = ("a folder, but no transformers depth estimator could be read from it" if Path(self.model).is_dir() else
                         "not a local folder, and the Hugging Face Hub could not provide it (offline, or no such "
                         "repository)")
                if self.recorded_in:  # not the user's flag: say where the value came from
                    what, give = (f"{self.model} (the depth model {self.recorded_in} records; --depth_model was not "
                                  "given)"), "Pass --depth_model with"
                else:
                    default = " (the default; give another with --depth_model)" if self.model == DEFAULT_DEPTH_MODEL else ""
                    what, give = f"--depth_model {self.model}{default}", "Give"
                raise ModelLoadError(
                    f"{what}: {where}. {give} a folder with a transformers depth estimator "
                    f"(config.json, model.safetensors, preprocessor_config.json). ({type(err).__name__}: {err})"
                ) from None
            device = "cuda" if torch.cuda.is_available() else "cpu"
            _DEPTH_MODELS[self.model] = (processor, net.to(device), device)
        return _DEPTH_MODELS[self.model]

    def depths(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Float ``[H, W]`` depths of uint8 ``[H, W, 3]`` images, each scaled to [0, 1] by its maximum.

        One forward pass for all of them (the processor resizes every image to the estimator's
        input size); each map is then resized back to its own image's size.
        """
        import torch

        processor, net, device = self._load()
        maps: list = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}  # a processor keeping aspect ratios needs equal sizes to stack
        for i, image in enumerate(images):
            by_size.setdefault(image.shape, []).append(i)
        for picked in by_size.values():
            inputs = processor(images=[Image.fromarray(images[i]) for i in picked], return_tensors="pt").to(device)
            with torch.no_grad():
                predicted = net(**inputs).predicted_depth.float()  # [N, h, w]
            resized = torch.nn.functional.interpolate(predicted[:, None], size=images[picked[0]].shape[:2],
                                                      mode="bicubic", align_corners=False)[:, 0].clamp(min=0)
            for i, m in zip(picked, resized.cpu().numpy()):
                top = float(m.max())
                maps[i] = m / top if top > 0 else m
        return maps

    def depth(self, image: np.ndarray) -> np.ndarray:
        """Float ``[H, W]`` depth of a uint8 ``[H, W, 3]`` image, scaled to [0, 1] by its maximum."""
        return self.depths([image])[0]

    def batch(self, images: list[Image.Image]) -> list[Image.Image]:
        maps = self.depths([np.asarray(image.convert("RGB")) for image in images])
        return [self.grey_rgb((m * 255).round().astype(np.uint8)) for m in maps]

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.batch([image])[0]


CONDITIONERS: dict[str, type] = {"canny": Canny, "depth": Depth}
SETTING_FLAGS = {"low_threshold": "--low_threshold", "high_threshold": "--high_threshold", "model": "--depth_model"}


def conditioner_from_settings(settings: dict, recorded_in: str | None = None):
    """The conditioner a data set's ``difftune_dataset.json`` records (``{"condition": "canny", ...}``);
    ``recorded_in`` names that file in its messages when the settings are not the user's flags."""
    settings = dict(settings)
    name = settings.pop("condition")
    if name not in CONDITIONERS:
        raise ConfigError(f"unknown condition {name!r}; known: {', '.join(CONDITIONERS)}")
    conditioner = CONDITIONERS[name](**checked_settings(name, settings))
    if recorded_in is not None:
        object.__setattr__(conditioner, "recorded_in", recorded_in)  # (frozen; not a setting, so not a field)
    return conditioner


def checked_settings(condition: str, settings: dict) -> dict:
    """``settings`` for the ``condition``'s conditioner, each a setting of it and of its type (a path as a string),
    or a ConfigError naming it: from Python, a misspelt or other condition's setting or a threshold given as a
    string failed as a bare TypeError, in ``generate`` only after the models had loaded."""
    kinds = {f.name: f.type for f in fields(CONDITIONERS[condition])}  # "int" / "str" (postponed annotations)
    accepted = ", ".join(f"{k} ({SETTING_FLAGS[k]})" for k in kinds)
    checked = {}
    for key, value in settings.items():
        if key not in kinds:
            owner = [n for n, c in CONDITIONERS.items() if key in {f.name for f in fields(c)}]
            whose = f"({SETTING_FLAGS[key]}) is a setting of the {owner[0]} condition, not of {condition}" if owner \
                else f"is not a setting of the {condition} condition"
            raise ConfigError(f"{key!r} {whose}: its settings are {accepted}.")
        if isinstance(value, os.PathLike) and kinds[key] == "str":
            value = os.fspath(value)
        if kinds[key] == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)) or \
                kinds[key] == "str" and not isinstance(value, str):
            word = {"int": "an integer", "str": "a string"}[kinds[key]]
            raise ConfigError(f"{key} ({SETTING_FLAGS[key]}) must be {word}, got {value!r}.")
        checked[key] = int(value) if kinds[key] == "int" else value
    return checked
def recorded_settings(manifest: dict, data_dir: str | os.PathLike) -> dict:
    """The detector settings a data set's ``difftune_dataset.json`` records, ``{"condition": ..., ...}``.

    Data sets made before depth model folders were recorded absolute hold the ``--depth_model`` as it was
    given, relative to the folder ``difftune data conditions`` ran in; that folder is looked for among the
    data set's own and its parents (one where the recorded ``input_dir`` is found too first), so the
    record reads from anywhere. A hub id, found as no such folder, stays as it is.
    """
    settings = {"condition": manifest.get("condition"), **(manifest.get("conditioner") or {})}
    model = settings.get("model")
    if not isinstance(model, str) or not model or os.path.isabs(model):
        return settings
    here = Path(os.path.abspath(data_dir))
    found = [folder for folder in (here, *here.parents) if (folder / model).is_dir()]
    source = manifest.get("input_dir")
    if isinstance(source, str) and source and not os.path.isabs(source):
        found = [folder for folder in found if (folder / source).is_dir()] or found
    if found:
        settings["model"] = os.path.normpath(found[0] / model)
        if settings["model"] != os.path.abspath(model):  # not what it reads as from here: said
            logger.warning("%s records the depth model as %s, relative to the folder it was made in; read as %s "
                           "(pass --depth_model to use another)", Path(data_dir) / MANIFEST, model, settings["model"])
    return settings


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """A data folder's ``difftune_dataset.json`` (empty when it has none)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}) — regenerate the data set or delete the file") from err


IN_PROCESS_BATCH = 16  # pictures per forward pass of a model-based condition


def _make_pairs(jobs: list[tuple]) -> list[bool | str]:
    """Read pictures, crop them, write them and their conditions; for each picture, whether its
    condition is blank, or why it could not be read (every bad file is named at the end, not the first).

    A worker gets one job; the main process gets ``IN_PROCESS_BATCH`` of them for a model-based
    condition, which computes their conditions in one batch.
    """
    from .images import ImageLoadError, load_image
    from .transforms import resize_center_crop

    results: list[bool | str] = []
    images = []
    for index, path, tmp, name, resolution, _ in jobs:
        try:
            image = load_image(str(path), where="--input_dir", remedy="fix or replace it, or move it out of --input_dir")
        except ImageLoadError as err:
            results.append(str(err))
            continue
        if resolution is not None:
            image = resize_center_crop(image, resolution, "bicubic")
        image.save(tmp / "images" / name)
        images.append(image)
        results.append(False)
    conditions = iter(jobs[0][-1].batch(images) if images else [])
    for i, result in enumerate(results):
        if result is False:
            cond = next(conditions)
            cond.save(tmp / "conditioning" / jobs[i][3])
            results[i] = not cond.getbbox()
    return results


def write_condition_dataset(input_dir: str | os.PathLike, out_dir: str | os.PathLike, condition: str = "canny",
                            resolution: int | None = None, caption: str | None = None, caption_column: str = "text",
                            overwrite: bool = False, progress: bool = True, workers: int | None = None,
                            **settings) -> dict:
    """Write a ControlNet data set (``images/``, ``conditioning/``, ``metadata.jsonl``) from a plain image folder.

    ``settings`` go to the conditioner (canny: ``low_threshold``, ``high_threshold``);
    ``workers`` processes (default: all cores) read and write the images. Like ``difftune data
    fill50k``, everything is written to a temporary folder renamed into place at the end, so a
    killed run never leaves a folder that looks complete.
    """
    from tqdm.auto import tqdm

    from .transforms import check_resolution
    from .writing import check_out_dir, default_workers, fresh_temp_dir, ordered_map, replace_dir

    if condition not in CONDITIONERS:
        raise ConfigError(f"--condition {condition!r}: known conditions are {', '.join(CONDITIONERS)}")
    conditioner = conditioner_from_settings({**settings, "condition": condition})
    if resolution is not None:
        check_resolution(resolution)
    src, out = Path(input_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"--input_dir {src} is not a folder — give the folder that holds your images")
    if out.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"--out {out} is inside --input_dir {src}: its images would be read as input; "
                          "choose a folder outside it")
    images = find_images(src)
    if not images:
        raise DataError(f"--input_dir {src} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = read_captions(src, images, caption, caption_column)
    warn_small_or_uncaptioned(src, images, captions, resolution)
    check_out_dir(out, overwrite, inputs=(src,))
    tmp = fresh_temp_dir(out)
    (tmp / "images").mkdir()
    (tmp / "conditioning").mkdir()
    width = max(5, len(str(len(images))))
    names = [f"{i:0{width}d}.png" for i in range(len(images))]
    jobs = [(i, path, tmp, name, resolution, conditioner) for i, (path, name) in enumerate(zip(images, names))]
    made = None
    try:
        size = IN_PROCESS_BATCH if conditioner.in_process else 1
        groups = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        made = ordered_map(_make_pairs, groups, 1 if conditioner.in_process else default_workers(workers))
        flags = []
        with tqdm(total=len(jobs), desc=condition, unit="image", disable=not progress) as bar:
            for group_flags in made:
                flags.extend(group_flags)
                bar.update(len(group_flags))
        unreadable = [flag for flag in flags if isinstance(flag, str)]
        if unreadable:
            shown = "\n  ".join(unreadable[:20]) + (f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else "")
            raise DataError(f"{len(unreadable)} of the {len(images)} images in --input_dir {src} cannot be read "
                            f"(nothing was written):\n  {shown}")
        blank = [str(path.relative_to(src)) for path, is_blank in zip(images, flags) if is_blank]
        rows = [{"image": f"images/{name}", "conditioning_image": f"conditioning/{name}", "text": text,
                 "source": str(path.relative_to(src))} for path, name, text in zip(images, names, captions)]
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        info = {"kind": "conditions", "condition": conditioner.name, "conditioner": conditioner.settings(),
                "n": len(rows), "resolution": resolution, "input_dir": str(src), "blank_conditions": blank}
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, out, overwrite)
    except BaseException:
        if made is not None:
            made.close()  # stops the worker pool now
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "path": str(out)}
