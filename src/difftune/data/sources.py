"""Find and open a training data set: a Hub name or one of the local layouts people use.

The diffusers script accepts a Hub name or a folder for ``load_dataset`` and breaks on
common local layouts (e.g. a ``metadata.jsonl`` whose image columns are relative file
paths). Here each layout is recognised explicitly and every failure says which path was
looked at and which layouts are accepted. Image columns come back *undecoded*
(``Image(decode=False)``) so a corrupt file only fails in ``load_image``, per sample,
where it can be skipped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from difftune.errors import ConfigError, DataError

_log = logging.getLogger("difftune")

LAYOUTS = (
    "a folder (searched recursively) or a single file of parquet / arrow shards; a "
    "`Dataset.save_to_disk` folder; a folder with metadata.jsonl or metadata.csv whose "
    "columns give image and conditioning image paths relative to it and a caption; or an "
    "imagefolder (images + metadata.jsonl with a `file_name` column)"
)
_SPLITS = ("train", "validation", "valid", "val", "test", "eval", "dev")


@dataclass
class Table:
    """An opened data set plus what is needed to read and talk about its rows.

    ``dataset`` is a ``datasets.Dataset`` (or ``IterableDataset`` when streaming);
    ``base_dir`` resolves relative image paths; ``description`` names it in messages;
    ``row_numbers`` maps a position to the row it came from when rows were picked
    (``select_samples``), so messages name the row as the user's data counts it;
    ``source`` is what defines the rows (hub name, config and split, or the local path and
    split, plus the selection), the same in every run, to key caches of them by.
    """

    dataset: Any
    base_dir: str | None
    description: str
    row_numbers: tuple[int, ...] | None = None
    source: dict | None = None

    def row_name(self, index: int) -> str:
        """How messages name the row at ``index``: its number in the data set, counting from 0."""
        return f"row {self.row_numbers[index] if self.row_numbers is not None else index}"

    @property
    def streaming(self) -> bool:
        import datasets

        return isinstance(self.dataset, datasets.IterableDataset)

    @property
    def column_names(self) -> list[str]:
        names = self.dataset.column_names
        if names is None:  # streaming json without declared features: look at one row
            first = next(iter(self.dataset), None)
            names = list(first) if first is not None else []
        return list(names)


def load_table(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    streaming: bool = False,
    split: str = "train",
) -> Table:
    """Open the data set named by ``--dataset_name`` or ``--train_data_dir`` (exactly one)."""
    if (dataset_name is None) == (train_data_dir is None):
        which = "both were given" if dataset_name is not None else "neither was given"
        raise ConfigError(
            f"pass exactly one of --dataset_name (a Hugging Face Hub data set) or "
            f"--train_data_dir (a local folder); {which}"
        )
    if dataset_name is not None and not os.path.exists(os.path.expanduser(dataset_name)):
        table = _load_hub(dataset_name, dataset_config_name, cache_dir, streaming, split)
        source = {"hub": dataset_name, "config": dataset_config_name, "split": split}
    else:
        path = Path(os.path.expanduser(dataset_name or train_data_dir))
        table = _load_local(path, cache_dir, streaming, split)
        source = {"path": str(path.resolve()), "split": split}
    table = replace(table, dataset=_undecoded(table.dataset), source=source)
    if not table.streaming and len(table.dataset) == 0:
        raise DataError(f"{table.description} has no rows — point at a folder or split that holds samples")
    return table


def _load_hub(name: str, config: str | None, cache_dir: str | None, streaming: bool, split: str) -> Table:
    import datasets

    try:
        loaded = datasets.load_dataset(name, config, cache_dir=cache_dir, streaming=streaming)
    except Exception as err:  # the Hub raises many types (HTTP, offline, not-found, auth)
        hint = (
            "pass --train_data_dir with a local copy (e.g. `difftune data fill50k --out DIR`)"
            if "fill50k" in name.lower()
            else "pass --train_data_dir with a local copy (" + LAYOUTS + ")"
        )
        if _offline() or _is_connection_error(err):
            raise DataError(
                f"could not load data set {name!r} from the Hugging Face Hub (offline?) — {hint}. "
                f"[{type(err).__name__}: {err}]"
            ) from err
        raise DataError(
            f"could not load data set {name!r}"
            + (f" (config {config!r})" if config else "")
            + f" from the Hugging Face Hub: {type(err).__name__}: {err} — check --dataset_name and "
            f"--dataset_config_name, or {hint}"
        ) from err
    dataset = _pick_split(loaded, split, f"data set {name!r}")
    return Table(dataset=dataset, base_dir=None, description=f"data set {name!r}" + (f" ({config})" if config else ""))


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _is_connection_error(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, (ConnectionError, TimeoutError)) or "connect" in type(err).__name__.lower():
            return True
        if "offline" in str(err).lower() or "LocalEntryNotFound" in type(err).__name__:
            return True
        err = err.__cause__ or err.__context__
    return False


def _pick_split(loaded: Any, split: str, what: str) -> Any:
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in loaded:
            raise DataError(
                f"{what} has no split {split!r}; it has: {', '.join(loaded) or '(none)'} — "
                f"pick one of those"
            )
        return loaded[split]
    return loaded


def _load_local(path: Path, cache_dir: str | None, streaming: bool, split: str) -> Table:
    import datasets

    if not path.exists():
        raise DataError(f"--train_data_dir {path} does not exist — expected {LAYOUTS}")
    if path.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
        if path.suffix.lower() not in builder:
            raise DataError(f"--train_data_dir {path} is a file that is not parquet, arrow, jsonl or csv — expected {LAYOUTS}")
        dataset = _load_files(builder[path.suffix.lower()], [path], cache_dir, streaming)
        return Table(dataset, str(path.parent), f"{path}")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        dataset = _pick_split(loaded, split, f"saved data set {path}")
        if streaming:
            dataset = dataset.to_iterable_dataset()
        return Table(dataset, str(path), f"saved data set {path}")
    for suffix, builder in (("parquet", "parquet"), ("arrow", "arrow")):
        files = _visible(path.rglob(f"*.{suffix}"), path)
        if files:
            files = _files_for_split(files, path, split)
            dataset = _load_files(builder, files, cache_dir, streaming)
            return Table(dataset, str(path), f"{len(files)} {suffix} file(s) in {path}")
    metadata = _find_metadata(path, split)
    if metadata is not None:
        columns = _metadata_columns(metadata)
        if any(c == "file_name" or c.endswith("_file_name") for c in columns):
            features = _imagefolder_csv_features(metadata) if metadata.suffix == ".csv" else None
            loaded = datasets.load_dataset("imagefolder", data_dir=str(metadata.parent), cache_dir=cache_dir,
                                           streaming=streaming, features=features)
            dataset = _pick_split(loaded, split, f"imagefolder {metadata.parent}")
            if features is not None:
                dataset = _empty_cells_as_text(dataset, [n for n, f in features.items() if isinstance(f, datasets.Value)])
            return Table(dataset, str(metadata.parent), f"imagefolder {metadata.parent}")
        builder = "csv" if metadata.suffix == ".csv" else "json"
        dataset = _load_files(builder, [metadata], cache_dir, streaming)
        return Table(dataset, str(metadata.parent), f"{metadata}")
    found = sorted({p.suffix.lower() for p in path.rglob("*") if p.is_file() and p.suffix})
    seen = f"found only {', '.join(found)} files" if found else "it is empty"
    raise DataError(f"--train_data_dir {path}: nothing to load ({seen}) — expected {LAYOUTS}")


def _visible(paths, root: Path) -> list[Path]:
    """Files not under hidden folders (.cache, .git) — those are never training data."""
    return sorted(p for p in paths if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _split_of(file: Path, root: Path) -> str | None:
    """The split a shard belongs to, from a folder name (train/) or a file prefix (train-0000...)."""
    rel = file.relative_to(root)
    for part in rel.parts[:-1]:
        if part.lower() in _SPLITS:
            return part.lower()
    match = re.match(r"^(" + "|".join(_SPLITS) + r")(?:[-_.]|$)", rel.stem.lower())
    return match.group(1) if match else None


def _files_for_split(files: list[Path], root: Path, split: str) -> list[Path]:
    splits = {f: _split_of(f, root) for f in files}
    chosen = [f for f in files if splits[f] == split]
    if chosen:
        return chosen
    if all(s is None for s in splits.values()):
        return files  # no split naming at all: every shard is training data
    found = sorted({s for s in splits.values() if s})
    raise DataError(
        f"--train_data_dir {root}: no files for split {split!r} (found files for: {', '.join(found)}) — "
        f"name the shards `{split}/...` or `{split}-*.{files[0].suffix[1:]}`, or point at the folder of one split"
    )


def _load_files(builder: str, files: list[Path], cache_dir: str | None, streaming: bool) -> Any:
    import datasets

    # CSV cells are text as written: no guessing numbers (a caption "42" stays a caption) or missing
    # values (an empty caption is "", as in JSON Lines), and "a, b" headers name column "b", not " b".
    options = _csv_as_text(files[0]) if builder == "csv" else {}
    try:
        return datasets.load_dataset(
            builder, data_files={"train": [str(f) for f in files]}, split="train",
            cache_dir=cache_dir, streaming=streaming, **options,
        )
    except Exception as err:  # malformed json/csv/parquet: name the files
        for file in files:  # datasets' own message often names neither the file nor the line
            problem = _text_file_problem(builder, file)
            if problem is not None:
                raise DataError(problem) from err
        shown = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataError(f"could not read {builder} data from {shown}: {type(err).__name__}: {err} — fix or remove the file") from err


def _empty_cells_as_text(dataset: Any, columns: list[str]) -> Any:
    """Empty CSV cells, which imagefolder's pandas reads as missing (None), as "" (an empty caption is an
    unconditional sample, as in JSON Lines and plain metadata.csv folders)."""
    import datasets

    def fill(*values):
        return {c: "" if v is None else v for c, v in zip(columns, values)}

    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(fill, input_columns=columns)
    return dataset.map(fill, input_columns=columns, keep_in_memory=True, desc="reading metadata.csv")


def csv_header(file: Path) -> list[str]:
    """A CSV file's column names as pandas (and so ``datasets``) names them: a byte-order mark and
    spaces after the commas dropped, an empty name ``Unnamed: i``. Repeated names are refused:
    pandas would rename the second (``text.1``) and a role could silently take the wrong one."""
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle, skipinitialspace=True), [])
    except UnicodeDecodeError as err:
        raise DataError(f"{file} is not UTF-8 text ({err}) — save it as UTF-8") from None
    except (OSError, csv.Error):
        return []  # load_dataset fails on it too, and says why
    names = [name.strip() or f"Unnamed: {i}" for i, name in enumerate(header)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{file}: the header names {', '.join(map(repr, repeated))} more than once — give each "
                        "column its own name")
    return names


def _csv_as_text(file: Path) -> dict:
    """load_dataset options that read every cell of a CSV file as the text it holds."""
    from datasets import Features, Value

    options: dict[str, Any] = dict(keep_default_na=False, skipinitialspace=True)
    header = csv_header(file)
    if header:
        options["features"] = Features({name: Value("string") for name in header})  # pandas reads them as str
    return options


def _imagefolder_csv_features(metadata: Path) -> Any:
    """Features for an imagefolder whose metadata.csv ``datasets`` reads with pandas' guessing: file
    columns are images (``file_name`` -> ``image``, ``x_file_name`` -> ``x``), the rest text, so a
    caption ``007`` stays ``007``. None when the header is not plain (imagefolder then guesses)."""
    from datasets import Features, Image, Value

    with metadata.open(newline="", encoding="utf-8-sig") as handle:
        raw = next(csv.reader(handle), [])
    if not raw or any(not name or name != name.strip() for name in raw) or len(set(raw)) != len(raw):
        return None
    features = {}
    for name in raw:
        if name == "file_name":
            features["image"] = Image()
        elif name.endswith("_file_name"):
            features[name[: -len("_file_name")]] = Image()
        else:
            features[name] = Value("string")
    return Features(features)


_JSONL_HINT = (
    'one JSON object per line naming the image, the conditioning image and the caption, e.g. '
    '{"image": "images/0.png", "conditioning_image": "conditions/0.png", "text": "a red circle"}'
)
_CSV_HINT = "a header line naming the columns (e.g. image,conditioning_image,text), then one line per sample"


def _text_file_problem(builder: str, file: Path) -> str | None:
    """Why a json/csv file cannot load (empty, or the first bad JSON line), or None if not found.

    Only called after ``load_dataset`` failed: it reports an empty file as ``StopIteration``
    and a broken JSON line as ``DatasetGenerationError`` with no file or line number.
    """
    if builder not in ("json", "csv") or file.suffix.lower() not in (".json", ".jsonl", ".csv"):
        return None
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"{file} is not UTF-8 text ({err}) — save it as UTF-8"
    except OSError:
        return None
    if not text.strip():
        return f"{file} is empty — it must hold {_CSV_HINT if builder == 'csv' else _JSONL_HINT}"
    if builder == "csv":
        if sum(1 for line in text.splitlines() if line.strip()) < 2:
            return f"{file} has a header line but no rows below it — it must hold {_CSV_HINT}"
        return None
    return _json_lines_problem(file, text)


def _json_lines_problem(file: Path, text: str) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object, named by number."""
    lines = text.splitlines()
    first = next(line for line in lines if line.strip())
    if file.suffix.lower() == ".json" and not _is_json_object(first):
        try:  # one JSON document (a list of rows), not JSON Lines: its error has the line number
            json.loads(text)
        except ValueError as err:
            return f"{file}, line {getattr(err, 'lineno', '?')}: invalid JSON ({err}) — fix that line"
        return None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            what = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
            return f"{file}, line {number}: invalid JSON ({what}) — fix that line; the file must hold {_JSONL_HINT}"
        if not isinstance(row, dict):
            return f"{file}, line {number}: expected a JSON object, got {type(row).__name__} — the file must hold {_JSONL_HINT}"
    return None


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _find_metadata(path: Path, split: str) -> Path | None:
    for folder in (path, path / split):
        both = [folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file()]
        if len(both) > 1:
            raise DataError(
                f"{folder} has both metadata.jsonl and metadata.csv, and it is not clear which one to train on — "
                f"move or rename the other one"
            )
        if both:
            return both[0]
    found = _visible(list(path.rglob("metadata.jsonl")) + list(path.rglob("metadata.csv")), path)
    if len(found) > 1:
        raise DataError(
            f"--train_data_dir {path} has several metadata files ({', '.join(str(f) for f in found[:5])}) — "
            f"point --train_data_dir at the folder of the one to train on"
        )
    return found[0] if found else None


def _metadata_columns(metadata: Path) -> list[str]:
    if metadata.suffix == ".csv":
        return csv_header(metadata)
    try:
        with metadata.open(newline="", encoding="utf-8-sig") as handle:  # (a BOM, as Notepad writes, is fine)
            first = next((line for line in handle if line.strip()), "{}")
            row = json.loads(first)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{metadata}, line 1: cannot parse ({err}) — each line must be one JSON object") from err
    if not isinstance(row, dict):
        raise DataError(f"{metadata}, line 1: expected a JSON object with column names, got {type(row).__name__}")
    return list(row)


def _undecoded(dataset: Any) -> Any:
    """Cast decoded Image columns to Image(decode=False): decoding happens per sample, later."""
    import datasets

    features = dataset.features
    for column, feature in (features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


# Names people give each role, best first. The original fill50k (lllyasviel) has
# source = control, target = image, prompt = caption: position alone (image first) would
# pick source as the image and train the control the wrong way round.
def say_fewer_rows(max_train_samples: int, rows: int) -> None:
    """Tell the user that --max_train_samples asked for more rows than the data holds."""
    _log.info("--max_train_samples %d: the data set has %d rows; training on all of them", max_train_samples, rows)


def select_samples(table: Table, max_train_samples: int | None, seed: int, buffer_size: int = 1000) -> Table:
    """Shuffle with ``seed`` and keep the first ``max_train_samples`` (diffusers semantics).

    Streaming data sets shuffle within a ``buffer_size`` window, then ``take``; how many rows that
    gives is only known once the stream is read (``materialize`` says so when it is fewer).
    """
    if max_train_samples is None:
        return table
    if isinstance(max_train_samples, bool) or not isinstance(max_train_samples, int) or max_train_samples <= 0:
        raise ConfigError(f"--max_train_samples {max_train_samples!r} must be a positive integer")
    source = {**(table.source or {}), "max_train_samples": max_train_samples, "seed": seed}
    if table.streaming:
        dataset = table.dataset.shuffle(seed=seed, buffer_size=buffer_size).take(max_train_samples)
        source["buffer_size"] = buffer_size
    else:
        count = min(max_train_samples, len(table.dataset))
        if count < max_train_samples:
            say_fewer_rows(max_train_samples, count)
        # Dataset.shuffle(seed)'s own order (numpy's permutation), kept so messages can name the rows.
        # keep_in_memory: never write index caches into the user's data folder.
        picked = np.random.default_rng(seed).permutation(len(table.dataset))[:count]
        dataset = table.dataset.select(picked, keep_in_memory=True)
        earlier = table.row_numbers
        rows = tuple(int(earlier[i]) if earlier is not None else int(i) for i in picked)
        return replace(table, dataset=dataset, row_numbers=rows, source=source,
                       description=f"{table.description} (first {max_train_samples} after shuffle)")
    return replace(table, dataset=dataset, source=source,
                   description=f"{table.description} (first {max_train_samples} after shuffle)")
