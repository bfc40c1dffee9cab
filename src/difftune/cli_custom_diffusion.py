"""Custom Diffusion commands: ``train custom-diffusion``, ``retrieve``, ``custom-diffusion merge|compress``,
``eval custom-diffusion``. Flags of training come from ``CustomDiffusionConfig``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from .api import train_custom_diffusion
    from .cli_flags import config_from_args
    from .config import merge
    from .config_custom_diffusion import CustomDiffusionConfig, custom_diffusion_defaults
    from .recipes import recipes_for

    recipes = recipes_for(CustomDiffusionConfig)
    recipe = merge(custom_diffusion_defaults(), recipes[args.recipe]() if args.recipe else {})
    cfg = config_from_args(CustomDiffusionConfig, args, recipe)
    args.run_output_dir = cfg.train.output_dir  # for the message if it is interrupted
    summary = train_custom_diffusion(cfg)
    if os.environ.get("RANK", "0") == "0":  # one report per run, not per process
        print(json.dumps({k: summary[k] for k in ("global_step", "final_loss", "seconds", "exported") if k in summary},
                         indent=2))
        print(f"Custom Diffusion weights saved in {cfg.train.output_dir}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from .custom_diffusion.retrieve import retrieve
    from .errors import ConfigError

    if not args.backend:  # diffusers' script had one built in: say why there is none and what to do instead
        raise ConfigError(
            "retrieve needs --backend URL: the public LAION kNN service that diffusers' retrieve.py queried is no "
            "longer online. Host clip-retrieval yourself (github.com/rom1504/clip-retrieval) and pass its "
            "/knn-service URL, or train with generated class images instead (--with_prior_preservation without "
            "--real_prior: they are made with the base model).")
    out = retrieve(args.class_prompt, args.class_data_dir, args.num_class_images, args.backend,
                   indice_name=args.indice_name, timeout=args.timeout)
    print(f"real prior in {out} (images.txt, caption.txt, urls.txt): train with --real_prior "
          f"--class_data_dir {out}")
    return 0


def base_of(args: argparse.Namespace, folder: str | Path) -> str:
    """The base model: --pretrained_model_name_or_path, else the one the folder was trained on (its
    custom_diffusion.json), so that a concept is never merged, compressed or evaluated on another base."""
    from .custom_diffusion.export import read_meta
    from .recorded import resolve_base

    read_meta(folder)  # a folder that is no Custom Diffusion output is named as such
    return resolve_base(args.pretrained_model_name_or_path, custom_diffusion=folder)


def _load_recorded_base(args: argparse.Namespace, folder: str | Path, uses: tuple[str, ...] = ("tokenizer_name",)):
    """The base a folder was trained on (``base_of``), read as its run read it: its recorded --tokenizer_name,
    unless --pretrained_model_name_or_path names another base; --tokenizer_name over either. ``uses``: what the
    command reads the base with (a recorded tokenizer another base leaves out is warned about)."""
    from .models import load_base_model
    from .recorded import recorded_concept_loading, warn_unused_records

    base = base_of(args, folder)
    warn_unused_records(args.pretrained_model_name_or_path, custom_diffusion=folder,
                        given={"tokenizer_name": args.tokenizer_name}, uses=uses)
    loading = recorded_concept_loading(args.pretrained_model_name_or_path, folder, args.tokenizer_name)
    return load_base_model(base, tokenizer_name=loading.get("tokenizer_name"), stand_ins=("tokenizer",)), loading


def _check_output_dir(args: argparse.Namespace, inputs: list[str], flag: str) -> None:
    """Never write over an input folder; an existing non-empty --output_dir needs --overwrite."""
    from .data.writing import check_out_dir
    from .errors import ConfigError

    out = Path(args.output_dir).resolve()
    for folder in inputs:
        if Path(folder).resolve() == out:
            raise ConfigError(f"--output_dir {args.output_dir} is the {flag} folder {folder}: writing there would "
                              "replace the weights being read. Choose a new folder.")
    check_out_dir(out, args.overwrite, flag="--output_dir", what="the weights", inputs=tuple(inputs))


def _write_new_folder(args: argparse.Namespace, write, inputs: list[str]) -> dict:
    """``write(folder)`` into a temporary folder beside --output_dir, moved into place when it returns: a
    failure midway leaves no half-written --output_dir (which a rerun would then refuse as not empty)."""
    import os
    import shutil

    from .data.writing import remove_stale_temp, replace_dir

    out = Path(args.output_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out)  # (of runs killed while writing)
    try:
        info = write(tmp)
        replace_dir(tmp, out, args.overwrite, flag="--output_dir", what="the weights", inputs=tuple(inputs))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "output_dir": str(out)}


def cmd_merge(args: argparse.Namespace) -> int:
    from .custom_diffusion.merge import check_merge_inputs, merge_concepts
    from .recorded import check_one_base, recorded_base_name

    prompts = None
    if args.regularization_prompts:
        from .errors import ConfigError

        p = Path(args.regularization_prompts)
        if not p.is_file():
            raise ConfigError(f"--regularization_prompts {p} does not exist (one caption per line).")
        prompts = [x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    check_merge_inputs(args.concepts, prompts)  # each folder named with the flag that gave it, before the base loads
    _check_output_dir(args, args.concepts, "--concepts")
    check_one_base({folder: recorded_base_name(custom_diffusion=folder) for folder in args.concepts},
                   args.pretrained_model_name_or_path, "--concepts", "a merge combines weight changes of one base")
    base, loading = _load_recorded_base(args, args.concepts[0])
    info = _write_new_folder(args, lambda tmp: merge_concepts(args.concepts, base, tmp, prompts,
                                                              safe=not args.no_safe_serialization,
                                                              tokenizer_name=loading.get("tokenizer_name")),
                             args.concepts)
    print(json.dumps(info, indent=2))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .custom_diffusion.compress import check_compress_amount, compress

    check_compress_amount(args.rank, args.energy)  # before the base model loads
    _check_output_dir(args, [args.custom_diffusion], "--custom_diffusion")
    base, _ = _load_recorded_base(args, args.custom_diffusion, uses=())  # (the UNet alone: no text is read)
    info = _write_new_folder(args, lambda tmp: compress(args.custom_diffusion, base.unet, tmp, args.rank, args.energy),
                             [args.custom_diffusion])
    print(json.dumps(info, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .cli_flags import out_dir
    from .custom_diffusion.eval import eval_custom_diffusion, format_table
    from .recorded import recorded_concept_loading, warn_unused_records

    with out_dir(args.out):  # a failed evaluation leaves no empty --out
        base = base_of(args, args.custom_diffusion)  # (the folder checked before its record is read)
        warn_unused_records(args.pretrained_model_name_or_path, custom_diffusion=args.custom_diffusion,
                            given={"tokenizer_name": args.tokenizer_name})
        loading = recorded_concept_loading(args.pretrained_model_name_or_path, args.custom_diffusion,
                                           args.tokenizer_name)
        result = eval_custom_diffusion(base, args.custom_diffusion, n=args.n, steps=args.num_inference_steps,
                                       seed=args.seed, guidance_scale=args.guidance_scale, out=args.out,
                                       weight_name=args.weight_name, clip_model=args.clip_model, loading=loading)
    print(format_table(result))
    print(f"details: {Path(args.out) / 'eval_custom_diffusion.json'}, grid: {Path(args.out) / 'eval_custom_diffusion.png'}"
          f" (rows, up to 8 images each: {'; '.join(result['grid_rows'])})")
    return 0


def register(sub, train_sub, eval_sub=None) -> None:
    """Add the Custom Diffusion commands to the top-level, ``train`` and ``eval`` sub-parsers."""
    from .cli_flags import (add_config_flags, add_launcher_flags, add_tokenizer_flag, at_least, finite_float,
                            positive_seconds)
    from .config_custom_diffusion import CustomDiffusionConfig, custom_diffusion_defaults
    from .recipes import recipes_for

    t = train_sub.add_parser("custom-diffusion", help="train Custom Diffusion concept(s) (flags as diffusers' "
                                                      "train_custom_diffusion.py)")
    t.add_argument("--config", help="YAML/TOML/JSON file of settings (flags override it)")
    t.add_argument("--recipe", choices=sorted(recipes_for(CustomDiffusionConfig)),
                   help="start from a named recipe (flags override it)")
    add_config_flags(t, CustomDiffusionConfig, custom_diffusion_defaults())
    add_launcher_flags(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("retrieve", help="download a real prior from a clip-retrieval kNN back-end")
    r.add_argument("--class_prompt", required=True, help="the class to fetch real images of, e.g. 'cat'")
    r.add_argument("--class_data_dir", required=True, help="folder to write (images/, caption.txt, images.txt, "
                                                           "urls.txt), for --real_prior")
    r.add_argument("--num_class_images", type=at_least(1), default=200)
    r.add_argument("--backend", help="URL of a clip-retrieval kNN service (self-hosted), e.g. "
                                     "http://HOST:1234/knn-service (required: there is no public default)")
    r.add_argument("--indice_name", default="laion5B-L-14")
    r.add_argument("--timeout", type=positive_seconds, default=30.0, help="seconds to wait for each answer (default: 30)")
    r.set_defaults(func=cmd_retrieve)

    cd = sub.add_parser("custom-diffusion", help="Custom Diffusion tools").add_subparsers(dest="tool", required=True)
    m = cd.add_parser("merge", help="merge separately trained concepts (closed form, paper eq. 4)")
    m.add_argument("--concepts", nargs="+", required=True, help="two or more Custom Diffusion output folders")
    m.add_argument("--regularization_prompts",
                   help="text file, one caption per line (default: the class prompts and 200 generic captions: "
                        "tiny-shapes' own world on tiny-shapes, everyday subjects on any other base; for a real "
                        "model, captions like the prompts the merged model will see do better)")
    m.add_argument("--no_safe_serialization", action="store_true", help="write .bin files instead of .safetensors")
    c = cd.add_parser("compress", help="low-rank compression of the weight deltas (top singular values)")
    c.add_argument("--custom_diffusion", required=True, help="Custom Diffusion output folder")
    c.add_argument("--rank", type=at_least(1), help="singular values kept of each weight delta")
    c.add_argument("--energy", type=finite_float, help="keep the fewest singular values with this share of sum(S^2)")
    for q in (m, c):
        q.add_argument("--pretrained_model_name_or_path", help="base model (default: the one the folder was trained on, from its custom_diffusion.json)")
        q.add_argument("--output_dir", required=True, help="a new folder for the result")
        q.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir")
        add_tokenizer_flag(q)
    m.set_defaults(func=cmd_merge)
    c.set_defaults(func=cmd_compress)

    if eval_sub is not None:
        e = eval_sub.add_parser("custom-diffusion", help="concept fidelity and prior drift of a trained concept")
        e.add_argument("--pretrained_model_name_or_path", help="base model (default: the one the folder was trained on, from its custom_diffusion.json)")
        e.add_argument("--custom_diffusion", required=True, help="Custom Diffusion output folder")
        e.add_argument("--weight_name", help="weight file in the folder (default: from custom_diffusion.json)")
        add_tokenizer_flag(e)
        e.add_argument("--n", type=at_least(1), default=16,
                       help="images per prompt: each concept's token prompt and class prompt (the 8 unrelated "
                            "prompts that measure drift get one image each)")
        e.add_argument("--num_inference_steps", type=at_least(1), default=20)
        e.add_argument("--guidance_scale", type=finite_float, default=7.5,
                       help="classifier-free guidance scale (1 or less: no guidance)")
        e.add_argument("--seed", type=at_least(0), default=0, help="image i is sampled from seed + i")
        e.add_argument("--out", default="eval", help="folder for the JSON and the PNG grid")
        e.add_argument("--clip_model", help="CLIP model (folder or hub id, e.g. openai/clip-vit-large-patch14) for "
                                            "CLIP image/text alignment: needed for concepts that are not shapes-world "
                                            "images (photos)")
        e.set_defaults(func=cmd_eval)
