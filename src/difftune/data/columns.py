"""Which columns of a data set play which role (image, conditioning image, caption), and whether a
mapping is clearly wrong: found by well-known names first, then by the diffusers script's positions;
text where images belong, or one column in two roles, is refused before a run trains on nothing."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from difftune.errors import DataError

if TYPE_CHECKING:
    from difftune.data.sources import Table

_KNOWN_NAMES = {
    "image": ("image", "target", "target_image", "file_name"),
    "conditioning_image": ("conditioning_image", "source", "condition", "control", "control_image", "hint",
                           "conditioning", "source_image"),
    "caption": ("text", "prompt", "caption", "captions"),
}
_POSITION = {"image": 0, "caption": 1, "conditioning_image": 2}  # the diffusers defaults
_FLAGS = {"image": "--image_column", "conditioning_image": "--conditioning_image_column", "caption": "--caption_column"}
_ROLE_NAMES = {"image": "image", "conditioning_image": "conditioning image", "caption": "caption"}
_log = logging.getLogger("difftune")


def resolve_columns(
    column_names: list[str],
    image_column: str | None = None,
    conditioning_image_column: str | None = None,
    caption_column: str | None = None,
    kinds: dict[str, str] | None = None,
) -> tuple[str, str, str]:
    """(image, conditioning_image, caption) column names.

    A name given by the user must exist. Otherwise a well-known name for the role wins
    when present (``image``/``target``, ``conditioning_image``/``source``/``hint``,
    ``text``/``prompt``/``caption``, ...), so extra columns (fill50k's ``circle_*``) do not
    shift anything and a source/target table is not read backwards; failing that, the
    diffusers positions (image first, caption second, conditioning third), skipping
    columns already taken. The choice is logged, since a swap trains without any error.
    ``kinds`` (``column_kinds``: column -> "image" / "text") refuses a positional choice that puts
    images in the caption's place or text in an image's, with the mapping their kinds suggest.
    """
    columns = list(column_names)
    given = {"image": image_column, "conditioning_image": conditioning_image_column, "caption": caption_column}
    for role, name in given.items():
        if name is not None and name not in columns:
            raise DataError(
                f"{_FLAGS[role]} {name!r} not in the data set's columns: {', '.join(columns) or '(none)'} — "
                f"pass one of those"
            )
    chosen = {role: name for role, name in given.items() if name is not None}
    twice = sorted({n for n in chosen.values() if list(chosen.values()).count(n) > 1})
    if twice:
        flags = " and ".join(_FLAGS[r] for r, n in chosen.items() if n == twice[0])
        raise DataError(f"{flags} name the same column {twice[0]!r}: each role needs its own column (a ControlNet "
                        "shown its own image as the condition learns to copy it) — give each flag another column")
    how = {role: "given" for role in chosen}
    for role in given:
        if role not in chosen:
            known = [c for c in _KNOWN_NAMES[role] if c in columns and c not in chosen.values()]
            if known:
                chosen[role], how[role] = known[0], "by name"
    for role in ("image", "caption", "conditioning_image"):
        if role in chosen:
            continue
        free = [c for c in columns if c not in chosen.values()]
        if not free:
            have = f"the data set has only {len(columns)} column(s) ({', '.join(columns) or 'none'}): "
            sep = next((c for c in ";\t|" if len(columns) == 1 and c in columns[0]), None)
            if sep is not None:  # a CSV written with another separator reads as one column
                raise DataError(have + f"its name holds {sep!r}, so the file seems separated by {sep!r}, not commas "
                                "— save the CSV comma-separated (or as metadata.jsonl)")
            if role == "conditioning_image":
                raise DataError(
                    have + "none is left for the conditioning images a ControlNet learns from. For pictures with "
                    "captions and no conditions, make the conditions: `difftune data conditions --input_dir DIR "
                    "--out DIR2 --condition canny` (or depth), then train on DIR2; if a column does hold them, name "
                    "it with --conditioning_image_column")
            raise DataError(have + "a ControlNet data set needs an image, a conditioning image and a caption column "
                            f"— name the missing one with {_FLAGS[role]}")
        position = _POSITION[role]
        at = columns[position] if position < len(columns) else None
        chosen[role], how[role] = (at if at in free else free[0]), "by position"
    _refuse_given_against_kinds(columns, chosen, how, kinds or {})
    _refuse_positions_against_kinds(columns, chosen, how, kinds or {})
    for role, column in chosen.items():  # e.g. --conditioning_image_column image: the image role then falls
        other = next((r for r in _KNOWN_NAMES if r != role and column in _KNOWN_NAMES[r]), None)  # elsewhere
        if other is not None:
            _log.warning("the %s column is %r (%s), a name for the %s: are the roles swapped? Set %s and %s to "
                         "the columns meant.", _ROLE_NAMES[role], column, how[role], _ROLE_NAMES[other],
                         _FLAGS[role], _FLAGS[other])
            break  # one swap shows in two roles: said once
    _log.info(
        "data columns: image %r (%s), conditioning image %r (%s), caption %r (%s) — set --image_column / "
        "--conditioning_image_column / --caption_column to change", chosen["image"], how["image"],
        chosen["conditioning_image"], how["conditioning_image"], chosen["caption"], how["caption"],
    )
    return chosen["image"], chosen["conditioning_image"], chosen["caption"]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_ROLE_WORDS = {"image": "image", "conditioning_image": "conditioning image"}


def _is_image_path(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().endswith(_IMAGE_SUFFIXES)


def captions_look_like_paths(rows: list[dict], caption_column: str) -> bool:
    """Whether every caption looked at is an image file name (the caption column is likely wrong)."""
    return bool(rows) and all(_is_image_path(row.get(caption_column)) for row in rows)


def column_contents_problem(rows: list[dict], image_column: str, conditioning_image_column: str,
                            caption_column: str) -> str | None:
    """Why the chosen columns cannot be right, judged from a few rows; None if they may be.

    A wrong mapping (the caption column holding file names, an image column holding text or
    numbers) makes every sample fail to load: training would skip them all and "finish".
    Only clear cases count: every row looked at must agree, and a string without an image
    extension is taken for text only when the caption column holds image paths instead.
    """
    if not rows:
        return None
    captions = [row.get(caption_column) for row in rows]
    captions_are_paths = captions_look_like_paths(rows, caption_column)
    for role, column in (("image", image_column), ("conditioning_image", conditioning_image_column)):
        values = [row.get(column) for row in rows]
        what = f"the {_ROLE_WORDS[role]} column {column!r} holds"
        if all(isinstance(v, (int, float)) for v in values):
            what += f" numbers ({describe_value(values[0])}), not images"
        elif captions_are_paths and all(isinstance(v, str) and not _is_image_path(v) for v in values):
            what += (f" text ({describe_value(values[0])}) while the caption column {caption_column!r} holds "
                     f"image paths ({describe_value(captions[0])})")
        else:
            continue
        return (f"{what}: every sample would fail to load — the columns are mixed up; set --image_column, "
                f"--conditioning_image_column and --caption_column")
    return None


_ROLE_KIND = {"image": "image", "conditioning_image": "image", "caption": "text"}
_KIND_WORDS = {"image": "images", "text": "text", "number": "numbers", "other": "other values"}


def _value_kind(value: Any) -> str | None:
    """"image" (bytes, an image cell, a path to an image file), "text", "number", "other", or None (empty)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)) or (isinstance(value, dict) and ("bytes" in value or "path" in value)):
        return "image"
    if isinstance(value, str):
        return "image" if _is_image_path(value) else "text"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return "text"  # several captions per image
    if isinstance(value, (int, float)):
        return "number"
    return "image" if hasattr(value, "getpixel") else "other"  # a decoded PIL image


def column_kinds(features: Any, rows: list[dict]) -> dict[str, str]:
    """What each column holds, where it is clear: "image" for an ``Image`` feature, else the kind
    every non-empty value of ``rows`` agrees on. Columns with mixed or no values are left out."""
    kinds = {}
    for column, feature in (features or {}).items():
        if type(feature).__name__ == "Image":
            kinds[column] = "image"
    for column in dict.fromkeys(c for row in rows for c in row):
        if column in kinds:
            continue
        seen = {_value_kind(row.get(column)) for row in rows} - {None}
        if len(seen) == 1:
            kinds[column] = seen.pop()
    return kinds


def table_column_kinds(table: "Table", peek: int = 5) -> dict[str, str]:
    """``column_kinds`` of ``table``'s first ``peek`` rows (a stream's features only: reading it
    could mean a download)."""
    dataset = table.dataset
    rows = [] if table.streaming else [dataset[i] for i in range(min(peek, len(dataset)))]
    return column_kinds(getattr(dataset, "features", None), rows)


def _refuse_given_against_kinds(columns: list[str], chosen: dict[str, str], how: dict[str, str],
                                kinds: dict[str, str]) -> None:
    """A column the user named for a role that holds the wrong kind (``--image_column text``), refused with
    the columns that do hold that kind; said before any positional choice, which the flag's column shifts."""
    has_images = "image" in kinds.values()
    said, wrong = [], []
    for role in ("image", "conditioning_image", "caption"):
        column = chosen[role]
        if how[role] != "given" or _fits(role, kinds.get(column), has_images):
            continue
        wrong.append(_FLAGS[role])
        want = _ROLE_KIND[role]
        fitting = [c for c in columns if kinds.get(c) == want]
        said.append(f"{_FLAGS[role]} {column} holds {_KIND_WORDS[kinds[column]]}, not {_KIND_WORDS[want]}; "
                    + (f"the {want} column{'s are' if len(fitting) > 1 else ' is'} {', '.join(fitting)}" if fitting else f"no column holds {_KIND_WORDS[want]}"
                       f" (the columns: {', '.join(columns)})"))
    if said:
        raise DataError("; and ".join(said) + f" — give {' and '.join(wrong)} the column meant")


def _refuse_positions_against_kinds(columns: list[str], chosen: dict[str, str], how: dict[str, str],
                                    kinds: dict[str, str]) -> None:
    """Columns taken by position that hold the wrong kind (images as captions, text as images) fail on
    every sample: refused here, with the mapping the columns' kinds suggest. Text in an image's place
    counts only when some column does hold images (paths without an extension read as text)."""
    has_images = "image" in kinds.values()
    wrong = [role for role in ("image", "conditioning_image", "caption")
             if how[role] == "by position" and not _fits(role, kinds.get(chosen[role]), has_images)]
    if not wrong:
        return
    said = ", ".join(f"{_ROLE_NAMES[r]} {chosen[r]!r} holds {_KIND_WORDS[kinds[chosen[r]]]}" for r in wrong)
    head = (f"the columns were matched by position, as diffusers does, and that does not fit what they hold: "
            f"{said}")
    suggested = _mapping_by_kind(columns, {r: c for r, c in chosen.items() if r not in wrong}, kinds)
    if suggested is None:
        held = ", ".join(f"{c} ({_KIND_WORDS.get(kinds.get(c, ''), 'unclear')})" for c in columns)
        raise DataError(f"{head}. The columns hold: {held} — name each role's column with --image_column, "
                        "--conditioning_image_column and --caption_column")
    flags = " ".join(f"{_FLAGS[r]} {suggested[r]}" for r in ("image", "conditioning_image", "caption"))
    raise DataError(f"{head} — by what they hold, pass {flags} (check that {suggested['image']!r} holds the "
                    f"pictures to learn and {suggested['conditioning_image']!r} their conditions; swap the two "
                    "if not)")


def _fits(role: str, kind: str | None, has_images: bool) -> bool:
    """Whether a column of ``kind`` (None: unclear) may play ``role``."""
    if kind is None or kind == _ROLE_KIND[role]:
        return True
    return role != "caption" and kind == "text" and not has_images


def _mapping_by_kind(columns: list[str], kept: dict[str, str], kinds: dict[str, str]) -> dict[str, str] | None:
    """Roles for the columns not in ``kept``, by kind and in column order (images: the first is the
    image, as in diffusers' order; the first text column is the caption); None if one is missing."""
    mapping = dict(kept)
    for role in ("image", "conditioning_image", "caption"):
        if role not in mapping:
            fits = [c for c in columns if kinds.get(c) == _ROLE_KIND[role] and c not in mapping.values()]
            if not fits:
                return None
            mapping[role] = fits[0]
    return mapping


def bad_caption_words(value: Any, column: str) -> str:
    """Why a caption cell that is neither text nor a list of texts cannot be trained on, and what to do (said
    the same by training and ``data check``). A row of JSON Lines without the key reads as None, as a null does."""
    if value is None:
        return (f"no caption: the row has no {column!r} value (the key is missing, or null) — give the row its "
                "caption (\"\" for none)")
    return (f"caption is {describe_value(value, typed=True)}, expected a string or a list of strings — fix the data "
            "or pick another --caption_column")


def describe_value(value: Any, width: int = 60, typed: bool = False) -> str:
    """A value for a message: an image cell or bytes by its size, never its raw bytes; anything
    else as its repr cut to ``width`` characters, after its type name when ``typed``."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return f"an image ({len(value['bytes'])} bytes)"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    text = text if len(text) <= width else text[: width - 3] + "..."
    return f"{type(value).__name__} ({text})" if typed else text
