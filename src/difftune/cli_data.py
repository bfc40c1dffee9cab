"""``difftune data ...``: the data set tools' commands (fill50k, conditions, shapes, check), and the
condition flags (``--low_threshold``, ``--depth_model``, ...) that ``generate`` and ``eval`` share with them."""

from __future__ import annotations

import argparse
import json
import sys

from .cli_flags import at_least
from .errors import UserError


def cmd_data_fill50k(args: argparse.Namespace) -> int:
    from .data import write_fill50k

    info = write_fill50k(args.out, n=args.n, resolution=args.resolution, seed=args.seed, workers=args.workers,
                         overwrite=args.overwrite)
    print(json.dumps(info, indent=2, default=str))
    return 0


# flag -> (condition, the conditioner's setting it fills)
CONDITION_FLAGS = {"low_threshold": ("canny", "low_threshold"), "high_threshold": ("canny", "high_threshold"),
                   "depth_model": ("depth", "model")}


def _condition_settings(args: argparse.Namespace, condition: str | None) -> dict:
    """Conditioner settings from the flags: those of ``condition``, or of any condition when None
    (``difftune eval``, whose flags default to None so that the data set's recorded settings apply)."""
    return {key: getattr(args, flag) for flag, (name, key) in CONDITION_FLAGS.items()
            if (condition is None or name == condition) and getattr(args, flag) is not None}


def _check_condition_flags(args: argparse.Namespace, condition: str | None) -> None:
    """A setting of another condition than the one computed would be silently ignored: refuse it."""
    for flag, (name, _) in CONDITION_FLAGS.items():
        if getattr(args, flag) is not None and name != condition:
            used = f"--condition {condition}" if condition else "no --condition"
            raise UserError(f"--{flag} is a {name} setting, but this command computes {used}: it would be ignored. "
                            f"Drop it, or pass --condition {name}.")


def _add_condition_flags(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The conditioners' settings; None unless given (so that a setting given for nothing can be refused)."""
    from .data.conditions import DEFAULT_DEPTH_MODEL

    def flag(name: str, default, help: str, **kwargs) -> None:
        told = f"default {default}" if defaults else "default: the setting --data was made with"
        parser.add_argument(name, default=None, help=f"{help} ({told})", **kwargs)

    flag("--low_threshold", 100, "canny: lower hysteresis threshold", type=int)
    flag("--high_threshold", 200, "canny: upper hysteresis threshold", type=int)
    flag("--depth_model", DEFAULT_DEPTH_MODEL, "depth: a transformers depth estimator, local folder or hub id "
         "(safetensors)")


def cmd_data_conditions(args: argparse.Namespace) -> int:
    from .data.conditions import write_condition_dataset

    _check_condition_flags(args, args.condition)
    if args.caption is not None and args.caption_column:
        raise UserError("--caption (one caption for every picture) and --caption_column (each picture's own, from "
                        "INPUT_DIR/metadata.jsonl) exclude each other: give one.")
    info = write_condition_dataset(args.input_dir, args.out, condition=args.condition, resolution=args.resolution,
                                   caption=args.caption, caption_column=args.caption_column or "text",
                                   overwrite=args.overwrite,
                                   workers=args.workers, **_condition_settings(args, args.condition))
    blank = info.pop("blank_conditions")
    print(json.dumps({**info, "blank_conditions": len(blank)}, indent=2))
    if blank:
        print(f"warning: {len(blank)} image(s) gave a blank {args.condition} map ({', '.join(blank[:5])}"
              f"{' ...' if len(blank) > 5 else ''}): they teach no control; "
              f"{'lower --low_threshold / --high_threshold or ' if args.condition == 'canny' else ''}"
              "remove them (`difftune data check` lists them too)", file=sys.stderr)
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from .data.shapes import write_shapes_folder

    shapes = tuple(s.strip() for s in args.shapes.split(",")) if args.shapes else None
    print(json.dumps(write_shapes_folder(args.out, n=args.n, resolution=args.resolution, seed=args.seed,
                                         shapes=shapes, overwrite=args.overwrite), indent=2))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import check_dataset, load_table, resolve_columns
    from .data.columns import table_column_kinds
    from .data.transforms import check_resolution
    from .models import DEFAULT_MODEL, training_resolution

    base = args.pretrained_model_name_or_path or DEFAULT_MODEL  # what `train` would use
    default = training_resolution(base)  # (read even with --resolution: a base training cannot load is refused)
    if args.resolution is None:
        args.resolution = default
        print(f"checking at --resolution {args.resolution}: the training default for {base} (pass "
              f"--resolution to check another)", file=sys.stderr)
    check_resolution(args.resolution)
    from .data.check import CheckReport, Issue
    from .errors import DataError
    from .models import load_tokenizer

    table = None
    try:  # a data set that cannot be read, or whose columns are not a ControlNet's, is a failed check (exit 1)
        table = load_table(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                           train_data_dir=args.train_data_dir, cache_dir=args.cache_dir)
        cols = resolve_columns(table.column_names, args.image_column, args.conditioning_image_column,
                               args.caption_column, kinds=table_column_kinds(table))
    except DataError as e:
        failed = "columns" if table is not None else "unreadable_data_set"
        report = CheckReport(0, [Issue(None, None, None, str(e), failed)],
                             description=str(args.train_data_dir or args.dataset_name))
        print(json.dumps(report.to_dict(), indent=2) if args.json else f"error: {e}",
              file=sys.stdout if args.json else sys.stderr)
        return 1
    tokenizer = load_tokenizer(base)  # caption lengths against the text encoder training would use
    report = check_dataset(table, *cols, resolution=args.resolution, tokenizer=tokenizer, limit=args.limit)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def register(sub) -> None:
    """Add ``difftune data`` to the top-level sub-parsers."""
    from .data.conditions import CONDITIONERS

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="tool", required=True)
    f = data.add_parser("fill50k", help="generate the fill50k circles data set")
    f.add_argument("--out", required=True, help="folder to write (parquet shards, validation/, difftune_dataset.json)")
    f.add_argument("--n", type=at_least(1), default=50000)
    f.add_argument("--resolution", type=at_least(8), default=512)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--workers", type=at_least(1), help="processes (default: all cores)")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    f.set_defaults(func=cmd_data_fill50k)
    dc = data.add_parser("conditions", help="a ControlNet data set from a plain image folder: conditions computed "
                                            "(canny edges or depth maps), captions from metadata.jsonl, .txt files "
                                            "or --caption")
    dc.add_argument("--input_dir", required=True, help="folder of images (any depth)")
    dc.add_argument("--out", required=True, help="folder to write (images/, conditioning/, metadata.jsonl)")
    dc.add_argument("--condition", default="canny", choices=tuple(CONDITIONERS))
    dc.add_argument("--resolution", type=at_least(8), help="resize + centre-crop to this size before computing the "
                                                   "condition (recommended: your training --resolution)")
    dc.add_argument("--caption", help="one caption for every image")
    dc.add_argument("--caption_column", help="caption column of INPUT_DIR/metadata.jsonl (default: text)")
    _add_condition_flags(dc)
    dc.add_argument("--workers", type=at_least(1), help="processes (default: all cores)")
    dc.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    dc.set_defaults(func=cmd_data_conditions)
    ds = data.add_parser("shapes", help="a plain image folder of the shapes world (images + metadata.jsonl)")
    ds.add_argument("--out", required=True, help="folder to write (NNNNN.png + metadata.jsonl)")
    ds.add_argument("--n", type=at_least(1), default=5000)
    ds.add_argument("--resolution", type=at_least(8), default=64)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--shapes", help="comma-separated kinds (default: the base model's circle,square,triangle)")
    ds.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ds.set_defaults(func=cmd_data_shapes)
    c = data.add_parser("check", help="validate a data set before training")
    for name, text in (
            ("dataset_name", "a data set on the Hugging Face Hub (needs the network; else --train_data_dir)"),
            ("dataset_config_name", "its configuration, when it has several"),
            ("train_data_dir", "a local data set: a folder or file in any format training reads"),
            ("image_column", "column of the target images (default: found by name, else the 1st)"),
            ("conditioning_image_column", "column of the conditioning images (default: by name, else the 3rd)"),
            ("caption_column", "column of the captions (default: by name, else the 2nd)"),
            ("cache_dir", "where `datasets` keeps what it downloads or converts"),
            ("pretrained_model_name_or_path", "the base model training will use: its tokenizer measures the "
                                              "captions and it sets the default --resolution (default: tiny-shapes)")):
        c.add_argument(f"--{name}", help=text)
    c.add_argument("--resolution", type=at_least(8),
                   help="the training resolution to check images against (default: the one training would use "
                        "with --pretrained_model_name_or_path, or with the default base tiny-shapes: 64)")
    c.add_argument("--limit", type=at_least(1), help="check only the first N rows")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_data_check)
