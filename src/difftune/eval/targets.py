"""What ``difftune eval controlnet`` scores against: held-out targets (fresh fill50k circles or shapes, or the
rows of a data folder) and their conditions, and the checks on an evaluation request made before any model loads."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from ..data.shapes import MIN_CONTRAST, srgb_to_lab
from ..errors import ConfigError
from .metrics import CONDITION_METRICS, delta_e


def eval_circles(n: int, resolution: int, seed: int, data: str | Path | None = None) -> list[dict]:
    """Held-out fill50k targets: fresh circles (seed ``10_000 + seed``) or the rows of a fill50k folder.

    Each target holds the circle (``cx, cy, r``, RGB ``color`` and ``background``), its
    ``prompt``, the outline (``condition``) and the true ``image``.

    Pairs whose colours are hard to tell apart (Delta E < MIN_CONTRAST) are left out: no
    image can show where such a circle is.
    """
    from ..data.fill50k import render_circle, sample_circles

    targets = []
    if data is not None:
        import datasets

        ds = datasets.load_dataset("parquet", data_files=fill50k_shards(data), split="train")
        rows = iter(ds)
        make = lambda row: dict(cx=row["circle_cx"], cy=row["circle_cy"], r=row["circle_r"],  # noqa: E731
                                color=tuple(row["circle_color"]), background=tuple(row["circle_background"]),
                                prompt=row["text"], condition=row["conditioning_image"].convert("RGB"),
                                image=row["image"].convert("RGB"))
    else:
        circles = iter(sample_circles(20 * n, resolution, 10_000 + seed))
        rows = circles
        make = lambda c: dict(cx=c.cx, cy=c.cy, r=c.r, color=c.color, background=c.background,  # noqa: E731
                              prompt=c.prompt, **dict(zip(("image", "condition"), render_circle(c, resolution))))
    for row in rows:
        t = make(row)
        if delta_e(srgb_to_lab(np.array(t["color"])), srgb_to_lab(np.array(t["background"]))) >= MIN_CONTRAST:
            targets.append(t)
        if len(targets) == n:
            break
    return targets


def eval_condition_rows(n: int, resolution: int, seed: int, data: str | Path | None, conditioner) -> list[dict]:
    """Held-out targets for an image condition (canny, ...): ``prompt``, true ``image`` and ``condition``.

    From ``data`` (any folder the trainer reads; its first ``n`` rows, resized and centre-cropped
    to the base's resolution as the trainer does), or else fresh shapes-world images (seed
    ``10_000 + seed``, the base's shapes) with the condition computed by ``conditioner``.
    Blank conditions (no edge at all: a low-contrast picture) are left out: they say nothing
    about whether the ControlNet follows its condition.
    """
    from ..data.transforms import resize_center_crop

    targets = []
    if data is not None:
        from ..data.images import load_image
        from ..data.columns import resolve_columns
        from ..data.sources import load_table

        from ..errors import DataError, UserError

        try:
            table = load_table(train_data_dir=str(data))
        except UserError as e:  # said with this command's flag
            raise type(e)(str(e).replace("--train_data_dir", "--data")) from None
        try:
            image_col, cond_col, text_col = resolve_columns(table.column_names)
        except UserError:
            raise DataError(f"--data {data} holds the column(s) {', '.join(table.column_names)}, not a ControlNet "
                            f"data set's image, conditioning image and caption: give {EVAL_DATA}") from None
        for i, row in enumerate(table.dataset):
            read = lambda col: resize_center_crop(  # noqa: E731
                load_image(row[col], table.base_dir, f"row {i}, column {col!r}"), resolution)
            condition = read(cond_col)
            if condition.getbbox():
                targets.append(dict(prompt=str(row[text_col] or ""), image=read(image_col), condition=condition))
            if len(targets) == n:
                break
        return targets
    from ..data.shapes import render_shape, sample_shapes

    for spec in sample_shapes(2 * n, resolution, 10_000 + seed):
        image = render_shape(spec, resolution)
        condition = conditioner(image)
        if condition.getbbox():
            targets.append(dict(prompt=spec.prompt, image=image, condition=condition))
        if len(targets) == n:
            break
    return targets


EVAL_DATA = ("a held-out data folder made by `difftune data fill50k` (train/*.parquet, difftune_dataset.json) or "
             "by `difftune data conditions` (metadata.jsonl, images/, conditioning/, difftune_dataset.json)")


def fill50k_shards(data: str | Path) -> list[str]:
    """The parquet shards of a ``difftune data fill50k`` folder: the circles' geometry the fill50k metric needs."""
    return sorted(str(p) for p in Path(data).glob("train/*.parquet"))


def check_eval_request(metric: str | None, n: int, data: str | Path | None,
                       condition_settings: dict | None = None) -> tuple[str, dict]:
    """(metric, ``data``'s manifest) of an eval, refused before any model loads or image is generated
    when ``n``, the metric, its detector settings or ``--data`` cannot give held-out targets.

    The metric is ``metric``, else the condition ``data``'s ``difftune_dataset.json`` names, else
    fill50k; the fill50k metric reads circles from a fill50k folder's parquet shards, the others
    read any folder the trainer reads.
    """
    from ..data.conditions import CONDITIONERS, MANIFEST, SETTING_FLAGS, checked_settings, read_manifest
    from ..errors import DataError

    if n < 1:
        raise ConfigError(f"--n {n}: evaluate at least one held-out condition (default 200)")
    if data is not None and not Path(data).exists():
        raise ConfigError(f"--data {data} does not exist: give {EVAL_DATA}, or leave out --data to evaluate on "
                          "fresh conditions.")
    if data is not None and not Path(data).is_dir():
        raise ConfigError(f"--data {data} is a file: give {EVAL_DATA}.")
    manifest = read_manifest(data) if data is not None else {}
    metric = metric or manifest.get("condition") or "fill50k"
    if metric not in CONDITION_METRICS:
        raise ConfigError(f"--metric {metric!r}: known metrics are {', '.join(CONDITION_METRICS)}")
    made_for = manifest.get("condition")
    if made_for and metric != made_for and made_for in CONDITION_METRICS:  # scored against conditions of another kind
        raise ConfigError(f"--metric {metric}: --data {data} holds {made_for} conditions (its {MANIFEST}), which the "
                          f"{metric} metric cannot score against; leave out --metric, or give a {metric} data set.")
    known = {f.name for f in fields(CONDITIONERS[metric])} if metric in CONDITIONERS else set()
    if unknown := sorted(set(condition_settings or {}) - known):
        named = [SETTING_FLAGS.get(k, k) for k in unknown]
        raise ConfigError(f"{', '.join(named)}: not a setting of the {metric} metric's detector"
                          f"{' (its settings: ' + ', '.join(SETTING_FLAGS[k] for k in sorted(known)) + ')' if known else ''}"
                          "; leave it out")
    if metric in CONDITIONERS:
        checked_settings(metric, condition_settings or {})  # each of its type
    if metric == "fill50k" and data is not None and not fill50k_shards(data):
        others = " or ".join(m for m in CONDITION_METRICS if m != "fill50k")
        why, instead = ((f" (it was made for the {manifest['condition']} condition)", "leave out --metric")
                        if manifest.get("condition") else
                        (f" (a folder without {MANIFEST} is scored as fill50k)",
                         f"pass --metric {others} to score a ControlNet data set of your own (image, "
                         "conditioning image and caption columns)"))
        raise DataError(f"--data {data} holds no fill50k circles (train/*.parquet), which the fill50k metric "
                        f"scores against{why}: give a folder made by `difftune data fill50k`, or {instead}.")
    return metric, manifest


def condition_targets(metric: str | None, n: int, resolution: int, seed: int, data: str | Path | None,
                      condition_settings: dict | None = None, recorded: tuple[dict, str] | None = None):
    """(scorer, held-out targets) for a condition metric; by default the condition ``data``'s
    ``difftune_dataset.json`` names, else fill50k.

    The detector's settings are the data set's, updated by ``condition_settings`` (e.g. another
    ``model`` for depth, when the one the data set was made with has moved); without ``data``, those
    ``recorded`` (settings, the file they are from: the ControlNet's training data's), if any. A recorded
    setting that fails names its file.
    """
    from ..data.conditions import MANIFEST, conditioner_from_settings, recorded_settings
    from ..errors import DataError

    metric, manifest = check_eval_request(metric, n, data, condition_settings)
    if metric == "fill50k":
        scorer, targets = CONDITION_METRICS[metric](), eval_circles(n, resolution, seed, data)
    else:
        if manifest.get("condition") == metric:
            settings, where = recorded_settings(manifest, data), str(Path(data) / MANIFEST)
        elif recorded is not None and data is None:
            settings, where = {**recorded[0], "condition": metric}, recorded[1]
        else:
            settings, where = {"condition": metric}, None
        flags = condition_settings or {}
        from_record = set(settings) - {"condition"} - set(flags)  # what no flag overrides
        conditioner = conditioner_from_settings({**settings, **flags}, recorded_in=where if from_record else None)
        conditioner.load()  # a depth estimator that cannot load fails here, not after the sampling
        scorer = CONDITION_METRICS[metric](conditioner)
        targets = eval_condition_rows(n, resolution, seed, data, conditioner)
    if not targets:
        left_out = ("blank conditions" if metric != "fill50k" else
                    f"circles whose colours differ by less than Delta E {MIN_CONTRAST}")
        raise DataError(f"--data {data}: no held-out condition to evaluate ({left_out} are left out, and that was "
                        "all of them); give a data set with visible conditions, or leave out --data for fresh ones")
    return scorer, targets
