"""A plain folder of pictures as ``difftune data conditions`` reads it: the images (at any depth, hidden ones
left out), their captions (``metadata.jsonl`` / ``metadata.csv``, a ``.txt`` beside each, or one for all), and
what is said about them before any condition is computed (empty captions, small or unreadable pictures)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from PIL import Image

from difftune.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # as training reads


def find_images(input_dir: Path) -> list[Path]:
    """Image files under ``input_dir`` (any depth), in a stable order; hidden ones (a name starting with '.',
    or in such a folder: macOS's ``._`` resource files, ``.thumbnails/``) are left out, and said."""
    found = [p for p in input_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    hidden = [p for p in found if any(part.startswith(".") for part in p.relative_to(input_dir).parts)]
    if hidden:
        logger.warning("--input_dir %s: left out %d hidden image file(s) (a name starting with '.', or in such a "
                       "folder: %s)", input_dir, len(hidden),
                       _names([str(p.relative_to(input_dir)) for p in hidden], 5))
    return sorted(set(found) - set(hidden))


def _read_text(path: Path) -> str:
    """A caption file's text (UTF-8, a byte-order mark allowed); a DataError naming the file otherwise."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (line {line}: {err.reason} at byte {err.start}) — save it as "
                        "UTF-8") from None


def _metadata_rows(input_dir: Path, caption_column: str):
    """(file, line number, row) of the picture folder's ``metadata.jsonl``, else its ``metadata.csv``."""
    import csv
    import io

    metadata = input_dir / "metadata.jsonl"
    if metadata.is_file():
        for i, line in enumerate(_read_text(metadata).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield metadata, i, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{metadata} line {i} is not JSON ({err.msg}) — fix or remove the line") from err
        return
    table = input_dir / "metadata.csv"
    if table.is_file():
        for i, row in enumerate(csv.DictReader(io.StringIO(_read_text(table))), start=2):  # (line 1: the header)
            yield table, i, {k.strip(): v for k, v in row.items() if k is not None}


def read_captions(input_dir: Path, images: list[Path], caption: str | None, caption_column: str) -> list:
    """One caption per image: ``caption`` for all, else ``metadata.jsonl``'s or ``metadata.csv``'s (text, or in
    JSON a list of texts to draw from), else a ``.txt`` beside the image."""
    if caption is not None:
        return [caption] * len(images)
    by_file: dict[str, str | list[str]] = {}
    lines: dict[str, int] = {}
    metadata = input_dir / "metadata.jsonl"
    for metadata, i, row in _metadata_rows(input_dir, caption_column):
        if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
            raise DataError(
                f"{metadata} line {i} needs 'file_name' and '{caption_column}' (the caption; another "
                f"column with --caption_column); it has {sorted(row) if isinstance(row, dict) else row!r}"
            )
        text, name = row[caption_column], os.path.normpath(str(row["file_name"]))
        if not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
            raise DataError(f"{metadata} line {i} ({row['file_name']}): the '{caption_column}' is "
                            f"{json.dumps(text)}, not text — write the caption, or \"\" for none")
        if name in lines:
            raise DataError(f"{metadata} lines {lines[name]} and {i} both give {row['file_name']}'s caption — "
                            "keep one")
        by_file[name], lines[name] = text, i
    on_disk = {os.path.normpath(p.relative_to(input_dir)) for p in images}
    strays = [name for name in by_file if name not in on_disk]
    if strays:
        shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        logger.warning("%s names %d file(s) that are not images in %s (%s): those rows are left out", metadata,
                       len(strays), input_dir, shown)
    captions, missing = [], []
    for path in images:
        rel = os.path.normpath(path.relative_to(input_dir))
        side = path.with_suffix(".txt")
        if rel in by_file:
            captions.append(by_file[rel])
        elif side.is_file():
            captions.append(_read_text(side).strip())
        else:
            captions.append("")
            missing.append(rel)
    if missing:
        bad = _unreadable(images, input_dir)  # said now too, not after the captions are fixed
        missing = [m for m in missing if m not in bad]  # (those are named once, as unreadable)
        said = []
        if missing:
            said.append(f"no caption for {len(missing)} of {len(images)} images in {input_dir} ({_names(missing)}). "
                        f"Give each image one: a row {{\"file_name\": ..., \"{caption_column}\": ...}} in {metadata}, "
                        "a .txt file of the same name beside the image, or --caption TEXT for all of them")
        if bad:
            said.append(f"{len(bad)} image(s) in {input_dir} cannot be read: {_names(bad)} — fix or remove them")
        raise DataError(". Also, ".join(said))
    return captions


def warn_small_or_uncaptioned(src: Path, images: list[Path], captions: list, resolution: int | None) -> None:
    """Said while converting, as `data check` would say it afterwards (when an upscaled picture no longer
    looks small): pictures smaller than --resolution, blown up to it, and empty captions."""
    def rel(path: Path) -> str:
        return str(path.relative_to(src))

    empty = [rel(p) for p, c in zip(images, captions) if not (c.strip() if isinstance(c, str) else any(c))]
    if empty:
        logger.warning("%d of %d pictures have an empty caption (%s): they train unconditioned on text",
                       len(empty), len(images), _names(empty, 5))
    if resolution is None:
        return
    small = []
    for path in images:
        try:
            with Image.open(path) as image:  # (the header only)
                if min(image.size) < resolution:
                    small.append(f"{rel(path)} {image.size[0]}x{image.size[1]}")
        except Exception:  # noqa: BLE001 — an unreadable file is named by the conversion itself
            continue
    if small:
        logger.warning("%d of %d pictures are smaller than --resolution %d and are upscaled to it (blurred): %s",
                       len(small), len(images), resolution, _names(small, 5))


def _names(names: list[str], most: int = 20) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _unreadable(images: list[Path], input_dir: Path) -> list[str]:
    """The images whose file PIL cannot identify or verify (a quick look at each header, no decoding)."""
    bad = []
    for path in images:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # PIL raises many kinds for a broken file
            bad.append(os.path.normpath(path.relative_to(input_dir)))
    return bad
