"""The concepts a run learns, resolved from flags or ``--concepts_list``, and checked up front.

A concept is (instance images + a prompt with its modifier token) and, with prior
preservation, (class images + a class prompt). Every problem a user can fix is reported
before any training starts, naming the flag, the file or the list entry.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CONCEPT_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")


@dataclass
class Concept:
    instance_prompt: str
    instance_data_dir: str
    class_prompt: str | None = None
    class_data_dir: str | None = None
    where: str = "the flags"  # for messages: "--concepts_list FILE, entry 2"

    @property
    def prefix(self) -> str:
        """What an error about this concept starts with: where it was given, unless by the flags themselves."""
        return "" if self.where == "the flags" else f"{self.where}: "
    modifier_tokens: list[str] = field(default_factory=list)

    @property
    def class_word(self) -> str | None:
        """The class noun, taken as the last word of the class prompt ('photo of a cat' -> 'cat')."""
        return self.class_prompt.split()[-1] if self.class_prompt and self.class_prompt.split() else None


def read_concepts_list(path: str | Path, root: str | Path | None = None) -> list[Concept]:
    """Concepts from a JSON list of {instance_prompt, class_prompt, instance_data_dir, class_data_dir}. Their
    relative folders are read from the current folder, as flags are, or where they do not exist here, from
    ``root`` (--concepts_root: for a repeated run's record, the folder that run was started in)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--concepts_list {p} does not exist.")
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--concepts_list {p} is not valid JSON ({e}). It must be a list of objects with the "
                          f"keys {', '.join(CONCEPT_KEYS)}.") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--concepts_list {p} must hold a non-empty JSON list of concept objects.")
    concepts = []
    for i, entry in enumerate(entries):
        where = f"--concepts_list {p}, entry {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not an object with the keys {', '.join(CONCEPT_KEYS)}.")
        unknown = set(entry) - set(CONCEPT_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(CONCEPT_KEYS)}.")
        for key in ("instance_prompt", "instance_data_dir"):
            if key in entry and entry[key] is not None and not isinstance(entry[key], str):
                raise ConfigError(f"{where}: '{key}' must be text, not {type(entry[key]).__name__} "
                                  f"({json.dumps(entry[key])[:40]}).")
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ConfigError(f"{where} has no '{key}'.")
        dirs = {k: _from_root(entry.get(k), root, f"{where}: {k}") for k in ("instance_data_dir", "class_data_dir")}
        concepts.append(Concept(entry["instance_prompt"], dirs["instance_data_dir"], entry.get("class_prompt"),
                                dirs["class_data_dir"], where=where))
    return concepts


def _from_root(value: Any, root: str | Path | None, what: str) -> Any:
    """A concept's relative folder as it reads from here, else from ``root`` where it exists there (said)."""
    if root is None or not isinstance(value, str) or not value or Path(value).is_absolute() \
            or Path(value).expanduser().exists() or not (Path(root) / value).exists():
        return value
    import sys

    print(f"{what} {value} read from {root} (--concepts_root; it is not in the current folder)", file=sys.stderr)
    return str(Path(root) / value)


# a token the user wrote into a prompt: <new1>, <sks-dog>; no spaces or nested brackets
PROMPT_TOKEN = re.compile(r"<[^<>\s]+>")


def tokens_in_prompts(concepts: list[Concept]) -> list[str]:
    """The ``<...>`` tokens of the instance prompts, in order of first appearance: the modifier tokens
    of a run given no ``--modifier_token``."""
    return list(dict.fromkeys(t for c in concepts for t in PROMPT_TOKEN.findall(c.instance_prompt)))


def resolve_concepts(data_cfg: Any, modifier_tokens: list[str]) -> list[Concept]:
    """The run's concepts, checked against the modifier tokens and prior-preservation settings.

    With ``modifier_tokens`` empty (no ``--modifier_token``), each concept's tokens are the ``<...>``
    ones its prompt holds, if any; a concept without one trains on its prompt's own words."""
    if data_cfg.concepts_list:
        concepts = read_concepts_list(data_cfg.concepts_list, data_cfg.concepts_root)
    else:
        concepts = [Concept(data_cfg.instance_prompt, data_cfg.instance_data_dir, data_cfg.class_prompt,
                            data_cfg.class_data_dir)]
    explicit = bool(modifier_tokens)
    modifier_tokens = modifier_tokens or tokens_in_prompts(concepts)
    for c in concepts:
        c.modifier_tokens = [t for t in modifier_tokens if t in c.instance_prompt]
        own = [t for t in PROMPT_TOKEN.findall(c.instance_prompt) if t not in modifier_tokens]
        if explicit and not c.modifier_tokens and own:
            raise ConfigError(
                f"{c.prefix}the instance prompt {c.instance_prompt!r} has the token {own[0]}, which --modifier_token "
                f"does not list ({', '.join(modifier_tokens)}). List every concept's token: --modifier_token "
                f"'{'+'.join(dict.fromkeys([*modifier_tokens, *own]))}'.")
        if explicit and not c.modifier_tokens:
            raise ConfigError(
                f"{c.prefix}the instance prompt {c.instance_prompt!r} contains none of the modifier tokens "
                f"({', '.join(modifier_tokens)}). Put the token in the prompt, e.g. 'photo of a "
                f"{modifier_tokens[0]} {c.class_word or 'cat'}' - otherwise it never learns the concept.")
        if data_cfg.with_prior_preservation:
            if not c.class_data_dir:
                raise ConfigError(f"{c.prefix}--with_prior_preservation needs a class_data_dir.")
            if not c.class_prompt and not data_cfg.real_prior:
                raise ConfigError(f"{c.prefix}--with_prior_preservation needs a class_prompt.")
    unused = [t for t in modifier_tokens if not any(t in c.modifier_tokens for c in concepts)]
    if unused:
        raise ConfigError(f"--modifier_token {'+'.join(modifier_tokens)}: {', '.join(unused)} appears in no "
                          "instance prompt, so it would never train. Use it in a prompt or drop it.")
    return concepts


def concept_flag(concept: Concept, key: str) -> str:
    """How messages name a concept's folder: the flag, or the concepts list entry's key."""
    return f"{concept.where}: {key}" if concept.where != "the flags" else f"--{key}"


@dataclass
class ConceptData:
    """A run's concepts with their instance images and, with --real_prior, real class images: all of it
    read and checked before the base model loads (tens of seconds on SD), so a typo is said first."""

    concepts: list[Concept]
    instances: list[tuple[Path, str]]  # (image, instance prompt), every concept's
    real_prior: list[tuple[Path, str]] | None = None  # (image, caption), with --real_prior


def check_concept_data(data_cfg: Any, modifier_tokens: list[str]) -> ConceptData:
    """Resolve the concepts (``resolve_concepts``), list and decode their instance images, and with prior
    preservation check each class folder; real prior ones are read whole. Generated class images need the
    base model, so those are made (and checked) later."""
    concepts = resolve_concepts(data_cfg, modifier_tokens)
    instances = []
    for c in concepts:
        flag = concept_flag(c, "instance_data_dir")
        files = list_images(c.instance_data_dir, flag)
        check_images(files, flag)
        instances += [(f, c.instance_prompt) for f in files]
    if not data_cfg.with_prior_preservation:
        return ConceptData(concepts, instances)
    real: list[tuple[Path, str]] = []
    for c in concepts:
        flag = concept_flag(c, "class_data_dir")
        if Path(c.class_data_dir).resolve() == Path(c.instance_data_dir).resolve():
            raise ConfigError(f"{flag} {c.class_data_dir} is the concept's instance_data_dir: its photos would "
                              "count as class images, and the prior would be the concept itself. Give the class "
                              "images a folder of their own (missing ones are generated there).")
        if data_cfg.real_prior:
            real += _real_prior(c, flag, data_cfg.num_class_images)
    return ConceptData(concepts, instances, real if data_cfg.real_prior else None)


def _real_prior(c: Concept, flag: str, n: int) -> list[tuple[Path, str]]:
    """The first ``n`` real class images of a concept (decoded, as training reads them)."""
    if not Path(c.class_data_dir).is_dir():
        raise DataError(f"--real_prior: {flag} {c.class_data_dir} does not exist. Retrieve a real prior into it "
                        f"first (difftune retrieve --class_prompt ... --class_data_dir {c.class_data_dir} "
                        f"--num_class_images {n} --backend URL).")
    found = real_prior_pairs(c.class_data_dir)[:n]
    if len(found) < n:  # (diffusers stops here too): a prior far smaller than asked for
        raise DataError(
            f"--real_prior: {flag} {c.class_data_dir} holds {len(found)} real class image(s), fewer than "
            f"--num_class_images {n}. Retrieve more (difftune retrieve --class_prompt ... --class_data_dir "
            f"{c.class_data_dir} --num_class_images {n}) or train on what is there with --num_class_images "
            f"{len(found)}.")
    check_images([f for f, _ in found], flag)
    return found


def default_initializers(concepts: list[Concept], modifier_tokens: list[str]) -> list[str]:
    """Without --initializer_token, each new token starts from its concept's class word: the last
    word of the class prompt, else the last word of the instance prompt that is not a modifier token."""
    out = []
    for token in modifier_tokens:
        concept = next(c for c in concepts if token in c.modifier_tokens)
        words = [w for w in concept.instance_prompt.split() if not any(t in w for t in modifier_tokens)]
        word = concept.class_word or (words[-1] if words else None)
        if not word:
            raise ConfigError(f"{concept.prefix}no --initializer_token and no class word to start {token} from. "
                              "Give --initializer_token WORD (one token, e.g. 'cat').")
        out.append(word)
    return out


def list_images(folder: str | Path, flag: str) -> list[Path]:
    """Image files directly in ``folder`` (sorted); a clear error if there are none."""
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"{flag} {d} is not a folder.")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{flag} {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put the concept's "
                        "4-20 pictures there.")
    return files


def check_images(paths: list[Path], flag: str) -> None:
    """Decode each image fully, as training will read it; one DataError naming every file that cannot be
    read (not the first alone, to be fixed and found again one run at a time)."""
    from ..data.images import read_image_file

    bad = []
    for path in paths:
        try:
            read_image_file(path, flag)
        except DataError as e:
            bad.append(str(e))
    if len(bad) == 1:
        raise DataError(bad[0])
    if bad:
        raise DataError(f"{len(bad)} images cannot be read; fix or remove each:\n  " + "\n  ".join(bad))


def real_prior_pairs(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a real prior folder.

    Accepted layouts: ``images.txt`` + ``caption.txt`` (one line per image, as ``difftune
    retrieve`` and diffusers' ``retrieve.py`` write; paths absolute or relative to the folder or
    to ``images/``), or image files each with a same-name ``.txt`` caption.
    """
    d = Path(folder)
    images_txt, captions_txt = d / "images.txt", d / "caption.txt"
    if images_txt.is_file() and captions_txt.is_file():
        paths = [line.strip() for line in images_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        caps = [line.strip() for line in captions_txt.read_text(encoding="utf-8").splitlines()]
        if len(caps) < len(paths):
            raise DataError(f"--real_prior: {captions_txt} has {len(caps)} lines for {len(paths)} images in "
                            f"{images_txt}; one caption per image.")
        pairs = []
        for line, cap in zip(paths, caps):
            p = Path(line)
            candidates = [p, d / p, d / "images" / p.name] if not p.is_absolute() else [p, d / "images" / p.name]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise DataError(f"--real_prior: {images_txt} lists {line}, which does not exist.")
            pairs.append((found, cap))
        return pairs
    if d.is_dir():
        images = [p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        pairs = [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip())
                 for p in images if p.with_suffix(".txt").is_file()]
        uncaptioned = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if pairs and uncaptioned:  # a real prior image trains with its caption: one without is left out, said
            logging.getLogger("difftune").warning(
                "--real_prior: %d image(s) in %s have no same-name .txt caption and are left out: %s%s", len(uncaptioned),
                d, ", ".join(uncaptioned[:5]), " ..." if len(uncaptioned) > 5 else "")
        if pairs:
            return pairs
    raise DataError(f"--real_prior: {d} has neither images.txt + caption.txt nor images with same-name .txt "
                    f"captions. Fetch a real prior with `difftune retrieve --class_prompt ... --class_data_dir {d}`.")
