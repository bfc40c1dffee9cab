"""Validate a ControlNet data set before training, and say exactly what to fix.

A training run finds a corrupt file or a misaligned pair hours in, if at all: a
conditioning image with another aspect ratio than its target is centre-cropped
differently, so the control stops lining up (training warns of the first such row and
trains on, as diffusers does). This reads every row once (images fully decoded) and
reports errors (the run would fail or skip rows) and warnings (it would work, maybe not
as intended, as for those pairs), each naming the row, column and file.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

from difftune.data.images import ImageLoadError, describe_source, load_image
from difftune.data.columns import bad_caption_words, captions_look_like_paths, column_contents_problem
from difftune.data.sources import Table
from difftune.data.transforms import aspects_differ, check_resolution, misaligned_words

_PEEK_ROWS = 5  # rows looked at to catch a mixed-up column mapping


@dataclass
class Issue:
    """One problem: where it is (row, column, file; None when not applicable) and what it is."""

    row: int | None
    column: str | None
    file: str | None
    message: str
    kind: str = ""

    def location(self) -> str:
        parts = []
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        if self.file:
            parts.append(f"file {self.file}")
        return ", ".join(parts)


@dataclass
class CheckReport:
    """What ``check_dataset`` found; ``ok`` is False when any error was found."""

    rows_checked: int
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    description: str = ""
    columns: tuple[str, str, str] | None = None  # (image, conditioning image, caption) as checked

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, max_per_kind: int = 20) -> str:
        """A report for people: issues grouped by kind, at most ``max_per_kind`` lines each."""
        lines = [
            f"checked {self.rows_checked} row(s) of {self.description or 'the data set'}: "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
            + (" (rows are numbered from 0, in the data set's order)" if self.errors or self.warnings else "")
        ]
        if self.columns is not None:  # a swapped mapping reads fine row by row: show it
            image, conditioning, caption = self.columns
            lines.append(f"image column: {image}, conditioning: {conditioning}, caption: {caption}")
        for title, issues in (("errors", self.errors), ("warnings", self.warnings)):
            if not issues:
                continue
            lines.append(f"{title}:")
            for kind, group in itertools.groupby(sorted(issues, key=lambda i: i.kind), key=lambda i: i.kind):
                group = list(group)
                for issue in group[:max_per_kind]:
                    where = issue.location()
                    lines.append(f"  [{kind}] {where + ': ' if where else ''}{issue.message}")
                if len(group) > max_per_kind:
                    lines.append(f"  ... and {len(group) - max_per_kind} more [{kind}]")
        lines.append("OK: ready to train" if self.ok else "NOT OK: fix the errors above before training")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "description": self.description,
            "rows_checked": self.rows_checked,
            "ok": self.ok,
            "columns": None if self.columns is None else dict(zip(("image", "conditioning_image", "caption"), self.columns)),
            "errors": [asdict(i) for i in self.errors],
            "warnings": [asdict(i) for i in self.warnings],
        }


def check_dataset(
    table: Table,
    image_column: str,
    conditioning_image_column: str,
    caption_column: str,
    resolution: int,
    tokenizer: Any = None,
    limit: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Read up to ``limit`` rows (all by default) and report every problem found.

    ``tokenizer`` (e.g. the base model's ``CLIPTokenizer``) enables the caption length
    check: the text encoder sees at most ``model_max_length`` tokens, the rest is cut.
    """
    from tqdm.auto import tqdm

    check_resolution(resolution)
    report = CheckReport(rows_checked=0, description=table.description,
                         columns=(image_column, conditioning_image_column, caption_column))
    columns = table.column_names
    for column in dict.fromkeys((image_column, conditioning_image_column, caption_column)):
        if column not in columns:
            report.errors.append(Issue(
                None, column, None,
                f"column {column!r} not in the data set's columns: {', '.join(columns) or '(none)'} — "
                f"pass --image_column / --conditioning_image_column / --caption_column with one of those",
                "missing_column",
            ))
    if report.errors:
        return report
    first = list(itertools.islice(iter(table.dataset), _PEEK_ROWS))
    problem = column_contents_problem(first, image_column, conditioning_image_column, caption_column)
    if problem is not None:  # every row would fail the same way: one error says it better
        report.errors.append(Issue(None, None, None, problem, "mixed_up_columns"))
        return report
    if captions_look_like_paths(first, caption_column):  # trains, but on file names as prompts
        report.warnings.append(Issue(
            None, caption_column, None,
            f"captions look like image file names ({first[0][caption_column]!r:.60}) — is --caption_column right?",
            "caption_is_path",
        ))

    total = len(table.dataset) if not table.streaming else None
    total = min(total, limit) if total is not None and limit is not None else (total or limit)
    rows = itertools.islice(iter(table.dataset), limit)
    for index, row in enumerate(tqdm(rows, total=total, desc="checking", unit="row", disable=not progress)):
        _check_row(report, table, row, index, image_column, conditioning_image_column, caption_column, resolution, tokenizer)
        report.rows_checked += 1
    return report


def _check_row(report: CheckReport, table: Table, row: dict, index: int, image_column: str,
               conditioning_image_column: str, caption_column: str, resolution: int, tokenizer: Any) -> None:
    sizes = {}
    for column in (image_column, conditioning_image_column):
        try:
            image = load_image(row[column], table.base_dir)
        except ImageLoadError as err:
            report.errors.append(Issue(index, column, err.file, str(err), "unreadable_image"))
            continue
        sizes[column] = image.size
        if column == conditioning_image_column and all(lo == hi for lo, hi in image.getextrema()):
            report.warnings.append(Issue(
                index, column, describe_source(row[column], table.base_dir),
                "conditioning image is blank (one colour): the sample teaches no control (a canny map of a "
                "low-contrast picture: lower --low_threshold / --high_threshold, or drop the row)",
                "blank_condition",
            ))
        if min(image.size) < resolution:
            report.warnings.append(Issue(
                index, column, describe_source(row[column], table.base_dir),
                f"{image.size[0]}x{image.size[1]} is smaller than --resolution {resolution} on its short "
                f"side: it will be upscaled (blurry)", "small_image",
            ))
    if len(sizes) == 2 and sizes[image_column] != sizes[conditioning_image_column]:
        (w1, h1), (w2, h2) = sizes[image_column], sizes[conditioning_image_column]
        files = describe_source(row[image_column], table.base_dir), describe_source(row[conditioning_image_column], table.base_dir)
        file = " / ".join(f for f in files if f) or None
        if aspects_differ((w1, h1), (w2, h2)):  # a warning, as training says it: the pair trains, as in diffusers
            report.warnings.append(Issue(
                index, conditioning_image_column, file,
                f"{misaligned_words((w1, h1), (w2, h2))} — crop or pad both to the same shape", "aspect_mismatch",
            ))
        else:
            report.warnings.append(Issue(
                index, conditioning_image_column, file,
                f"image is {w1}x{h1} but the conditioning image is {w2}x{h2}: same aspect ratio, both are resized "
                f"to {resolution}; fine if they show the same view", "size_mismatch",
            ))
    _check_caption(report, row[caption_column], index, caption_column, tokenizer)


def _check_caption(report: CheckReport, value: Any, index: int, column: str, tokenizer: Any) -> None:
    if isinstance(value, str):
        captions = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        captions = list(value)
    else:
        report.errors.append(Issue(index, column, None, bad_caption_words(value, column), "bad_caption"))
        return
    if not any(c.strip() for c in captions):
        report.warnings.append(Issue(
            index, column, None,
            "empty caption: the sample trains as unconditional (like --proportion_empty_prompts)",
            "empty_caption",
        ))
    if tokenizer is not None:
        limit = tokenizer.model_max_length
        longest = max((len(tokenizer(c).input_ids) for c in captions), default=0)
        if longest > limit:
            report.warnings.append(Issue(
                index, column, None,
                f"caption has {longest} tokens, more than the text encoder's {limit}: the rest is cut off",
                "long_caption",
            ))
