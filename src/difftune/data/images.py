"""Turn whatever a data set stores in an image cell into an RGB ``PIL.Image``.

Data sets hold images in many shapes: decoded PIL images, the ``{"bytes", "path"}`` dicts
of an undecoded ``datasets.Image`` column, file paths relative to the data folder (a
``metadata.jsonl`` listing files), or numpy arrays. Decoding is done here, fully
(``Image.load()``), so that a truncated or corrupt file fails at one place that knows the
row and column, and the caller can skip the sample instead of crashing a training run.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from difftune.errors import DataError


class ImageLoadError(DataError):
    """An image cell cannot be read; the message names the row/column and the file."""

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


def describe_source(value: Any, base_dir: str | None = None) -> str | None:
    """The file an image cell points at (resolved against ``base_dir``), or None if embedded."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value.get("path") or None  # the original file name, kept for messages only
        return _resolve_cell_path(value["path"], base_dir) if value.get("path") else None
    if isinstance(value, (str, os.PathLike)):
        return _resolve(os.fspath(value), base_dir)
    if isinstance(value, Image.Image):
        return getattr(value, "filename", None) or None
    return None


def _resolve(path: str, base_dir: str | None) -> str:
    path = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(path):
        return os.path.join(base_dir, path)
    return path


_FROM_HERE_SAID: set[str] = set()


def _resolve_cell_path(path: str, base_dir: str | None) -> str:
    """The file of a ``{"bytes": None, "path": ...}`` cell (a ``datasets.Image`` column holding no bytes):
    relative to the data folder, else, where no such file is there but one is from the current folder,
    from here. ``datasets`` stores such a path as the picture was opened, relative to where it ran, and reads
    it back from the current folder (as does the diffusers script); plain text cells (a metadata.jsonl of
    file names) stay relative to their file's folder only, as imagefolder reads them."""
    joined = _resolve(path, base_dir)
    here = os.path.expanduser(path)
    if base_dir is None or os.path.isabs(here) or os.path.exists(joined) or not os.path.exists(here):
        return joined
    if base_dir not in _FROM_HERE_SAID:
        _FROM_HERE_SAID.add(base_dir)
        import logging

        logging.getLogger("difftune").warning(
            "image cells of %s hold paths and no image bytes, relative to the current folder (%s) rather than to the "
            "data: read from here, as datasets does, so the data set reads only from this folder (e.g. %s). To read it "
            "from anywhere, write the paths relative to %s, absolute, or the pictures into the cells "
            "(datasets' embed_external_files)", base_dir, os.getcwd(), path, base_dir)
    return here


def _open(value: Any, base_dir: str | None) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return _from_array(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(_resolve_cell_path(value["path"], base_dir))
        raise ValueError("the cell has neither 'bytes' nor 'path'")
    if isinstance(value, (str, os.PathLike)):
        if not os.fspath(value):
            raise ValueError("the cell is an empty string, not a file path")
        return Image.open(_resolve(os.fspath(value), base_dir))
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if value is None:
        raise ValueError("the cell is empty (None)")
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def _from_array(array: np.ndarray) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 array of uint8/uint16/bool/float in [0, 1] to an image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"array of shape {array.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        # Floats are taken as [0, 1] (the torch/numpy convention); larger maxima as [0, 255].
        scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
        array = np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _integer_to_8bit(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """A 16- or 32-bit integer image as 8 bits. 16-bit data (PNG, "I;16") keeps its scale, 0-65535 to
    0-255; a 32-bit "I" image (a TIFF) says nothing of its range, so it is read by its values: 0-255 as
    they are, up to 65535 as 16-bit, beyond that scaled by its maximum."""
    array = array.clip(0, None)
    top = int(array.max(initial=0))
    if sixteen_bit or 255 < top <= 65535:
        return (array >> 8).clip(0, 255).astype(np.uint8)
    if top <= 255:
        return array.astype(np.uint8)
    return (array * 255 // top).astype(np.uint8)


def read_image_file(path: str | os.PathLike, flag: str) -> Image.Image:
    """An image file a flag names (``--image``, ``--validation_image``, a concept's folder), read as
    the training data is (16-bit and other modes scaled, EXIF orientation applied); a DataError naming
    the flag and the file otherwise."""
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path} is a folder, not an image file." if os.path.isdir(path)
                        else f"{flag} {path} does not exist.")
    try:
        return load_image(os.fspath(path))
    except ImageLoadError as e:
        raise DataError(f"{flag}: cannot read image {path} ({e.__cause__ and type(e.__cause__).__name__}: "
                        f"{e.__cause__}); fix or replace the file.") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNGs load as "I"/"I;16"; PIL's own convert clips to 255 (white), so rescale.
        array = np.asarray(image, dtype=np.int64)
        return Image.fromarray(_integer_to_8bit(array, sixteen_bit=image.mode != "I" or image.format == "PNG"))\
            .convert("RGB")
    if image.mode == "F":
        return _from_array(np.asarray(image, dtype=np.float32)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    # RGBA/LA: alpha is dropped, not composited, matching what the diffusers scripts do.
    return image.convert("RGB")


def load_image(value: Any, base_dir: str | None = None, where: str = "",
               remedy: str = "fix or replace the file, or remove the row") -> Image.Image:
    """Decode one image cell fully and return it as RGB.

    ``where`` (e.g. ``"row 17, column 'conditioning_image'"``) goes into the error message,
    together with the file, so a user can find and fix the bad sample. EXIF orientation is
    applied (as ``datasets.Image`` does) so that an image and its conditioning image taken
    from files line up the way they are displayed.
    """
    place = f"{where}: " if where else ""
    if value is None or (isinstance(value, (str, os.PathLike)) and not os.fspath(value).strip()):
        # JSON Lines rows without the key read as None, empty CSV cells as "": no file to name
        raise ImageLoadError(f"{place}no image: the cell is empty or the row lacks this column — give the row its "
                             "image, or remove the row", file=None)
    file = describe_source(value, base_dir)
    try:
        image = _open(value, base_dir)
        image.load()
        if image.getexif().get(0x0112) not in (None, 1):  # 0x0112: EXIF Orientation
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, TypeError) as err:
        # OSError covers missing files, unidentified formats and truncated data.
        source = f"file {file}" if file else "image embedded in the data set"
        if isinstance(value, dict) and value.get("bytes") is None and isinstance(err, FileNotFoundError):
            # e.g. `datasets` stored a PIL image opened from a file as its path alone, relative to where it ran
            source += (f" (the cell holds a path and no image bytes; relative paths are read from {base_dir or '.'}"
                       + (f", then from the current folder, {os.getcwd()}, as datasets does)" if base_dir else ")"))
        relative = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
        if (isinstance(err, FileNotFoundError) and base_dir and relative and not os.path.isabs(relative)
                and os.path.isfile(relative)):  # written relative to where the user runs, not to the table
            source += (f" (relative paths are read from the data file's folder, {base_dir}; {relative} is a file "
                       f"from the current folder: write the paths relative to {base_dir}, or absolute)")
        raise ImageLoadError(
            f"{place}cannot read {source} ({type(err).__name__}: {err}) — {remedy}",
            file=file,
        ) from err


def files_signature(dataset: Any, columns: list[str], base_dir: str | None) -> str:
    """A digest of the name, size and modification time of every file the image ``columns`` of
    ``dataset`` (a ``datasets.Dataset``) point at rather than hold: a data set's own fingerprint covers
    its cells, which for a ``metadata.jsonl`` of paths do not change when the pictures are replaced.
    Cells holding image bytes add nothing (the fingerprint covers them); a missing file counts as such."""
    import hashlib

    import pyarrow as pa

    digest = hashlib.sha256()
    for column in columns:
        values = dataset.data.column(column)
        kind = values.type
        resolve = _resolve
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            paths = values.to_pylist()
        elif pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:  # a datasets.Image column
            paths = []
            for chunk in values.chunks:  # field by field: the image bytes are not copied
                names = chunk.field("path").to_pylist()
                if kind.get_field_index("bytes") >= 0:
                    embedded = chunk.field("bytes").is_valid().to_pylist()
                    names = [name for name, has in zip(names, embedded) if not has]
                paths.extend(names)
            resolve = _resolve_cell_path  # (read as load_image reads them)
        else:
            continue
        for path in paths:
            if not path:
                continue
            file = resolve(path, base_dir)
            try:
                stat = os.stat(file)
                digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{file}\0missing\n".encode())
    return digest.hexdigest()[:16]
