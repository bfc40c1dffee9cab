"""``difftune`` command line: translates flags into typed configs and calls the Python API.

Training flags are generated from the config dataclasses (``difftune.config``), so every
field is a flag with the diffusers script's name, and a config file (YAML/TOML/JSON) can set
the same names; explicit flags override the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError

from .cli_flags import (  # noqa: F401 (re-exported)
    add_config_flags, add_launcher_flags, add_tokenizer_flag, add_vae_flag, at_least, config_from_args, finite_float,
    out_dir, refuse_unknown,
)
from .cli_process import Terminated, redact_secrets, saved_so_far, show_messages, stop_on_sigterm  # noqa: F401 (re-exported)
from .cli_data import _add_condition_flags, _check_condition_flags, _condition_settings  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- commands
def cmd_train_controlnet(args: argparse.Namespace) -> int:
    from .api import train_controlnet
    from .config import ControlNetConfig
    from .recipes import RECIPES

    recipe = RECIPES[args.recipe]() if args.recipe else None
    cfg = config_from_args(ControlNetConfig, args, recipe)
    args.run_output_dir = cfg.train.output_dir  # for the message if it is interrupted
    summary = train_controlnet(cfg)
    if os.environ.get("RANK", "0") == "0":  # one report per run, not per process
        keys = ("global_step", "final_loss", "seconds", "exported")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
        print(f"ControlNet saved in {cfg.train.output_dir}")
    return 0


def check_image_out(out: Path, flag: str = "--out") -> None:
    """Refuse, before anything is generated, an image file name PIL cannot write an RGB image to (by its
    extension): the images would be made and then lost to ``unknown file extension``."""
    import io

    from PIL import Image

    from .errors import ConfigError

    Image.init()  # registers every format plugin, so the extension table is complete
    fmt = Image.registered_extensions().get(out.suffix.lower())
    writable = False
    if fmt is not None:
        try:  # a trial save: some formats are read-only stubs, or take no RGB (XBM: 1-bit only)
            Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
            writable = True
        except (OSError, KeyError, ValueError):
            pass
    if not writable:
        what = f"PIL cannot write RGB images as '{out.suffix}'" if out.suffix else "it has no extension"
        raise ConfigError(f"{flag} {out}: {what}; end the file name with .png (lossless), or .jpg, .jpeg, .webp, "
                          ".bmp, .tif, ...")


def cmd_generate(args: argparse.Namespace) -> int:
    from .api import generate

    if not args.controlnet and not args.custom_diffusion:
        raise UserError("generate needs --controlnet DIR (with --image), --custom_diffusion DIR, or both (a "
                        "concept drawn under a ControlNet's control).")
    if args.controlnet and not args.image:
        raise UserError("--controlnet needs --image (the conditioning image).")
    if args.condition and not args.controlnet:
        raise UserError("--condition computes a ControlNet's condition from --image: it needs --controlnet.")
    _check_condition_flags(args, args.condition)
    out = Path(args.out)
    check_image_out(out)
    if args.image:  # a missing or unreadable --image is said before minutes of model loading
        from .data.images import read_image_file

        read_image_file(args.image, "--image")
    out.parent.mkdir(parents=True, exist_ok=True)
    # (lossless whatever --out is: a JPEG would blur the edges or depth it was generated from)
    condition_out = out.with_name(f"{out.stem}-condition.png") if args.condition else None
    paths = ([out] if args.num_images == 1 else
             [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(args.num_images)])
    from PIL import Image

    from .checkpoint import atomic_write

    def save(i: int, image) -> None:  # each image as it is made: an interrupted run keeps those done
        atomic_write(paths[i], lambda p: image.save(p, format=Image.registered_extensions()[out.suffix.lower()]))
        print(paths[i], flush=True)

    generate(  # the base (and VAE, tokenizer, prediction type) the adapter's run recorded, unless given
        args.pretrained_model_name_or_path, args.controlnet, args.image, args.prompt,
        custom_diffusion=args.custom_diffusion, weight_name=args.weight_name,
        num_inference_steps=args.num_inference_steps, seed=args.seed, guidance_scale=args.guidance_scale,
        controlnet_conditioning_scale=args.controlnet_conditioning_scale, num_images=args.num_images,
        resolution=args.resolution, negative_prompt=args.negative_prompt, device=args.device,
        cpu_offload=args.cpu_offload,
        enable_xformers_memory_efficient_attention=args.enable_xformers_memory_efficient_attention,
        condition=args.condition, condition_out=condition_out, control_guidance=args.control_guidance,
        vae=args.pretrained_vae_model_name_or_path, tokenizer_name=args.tokenizer_name,
        condition_settings=_condition_settings(args, args.condition) if args.condition else {},
        on_image=save, keep=False,
    )
    if condition_out is not None:
        print(f"{condition_out} (the {args.condition} condition it was generated from)")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .data.writing import check_out_dir
    from .tiny import save_tiny_model, save_tiny_sdxl_model

    check_out_dir(Path(args.out), args.overwrite, what="the model", model_folder_ok=True)
    save = save_tiny_sdxl_model if args.family == "sdxl" else save_tiny_model
    print(save(args.out, seed=args.seed))
    return 0


def cmd_eval_controlnet(args: argparse.Namespace) -> int:
    from .eval.run import eval_controlnet, format_table

    with out_dir(args.out):  # a failed evaluation leaves no empty --out
        result = eval_controlnet(args.pretrained_model_name_or_path, args.controlnet, data=args.data, n=args.n,
                                 steps=args.num_inference_steps, seed=args.seed, guidance_scale=args.guidance_scale,
                                 out=args.out, baseline=not args.no_baseline, metric=args.metric,
                                 condition_settings=_condition_settings(args, None),
                                 control_guidance=tuple(args.control_guidance),
                                 conditioning_scale=args.controlnet_conditioning_scale,
                                 vae=args.pretrained_vae_model_name_or_path,  # (None: the recorded one)
                                 tokenizer_name=args.tokenizer_name)
    print(format_table(result))
    modes = {"both": "ControlNet", "cond": "ControlNet, cond only"}
    columns = " | ".join(["condition", *(modes[m] for m in dict.fromkeys(args.control_guidance)),
                          *([] if args.no_baseline else ["base alone"])])
    print(f"details: {Path(args.out) / 'eval_controlnet.json'}, grid ({columns}): {Path(args.out) / 'eval_controlnet.png'}")
    return 0


def cmd_eval_base(args: argparse.Namespace) -> int:
    from .eval.run import eval_base, format_table

    with out_dir(args.out):  # a failed evaluation leaves no empty --out
        result = eval_base(args.pretrained_model_name_or_path, n_prompts=args.n_prompts, per_prompt=args.per_prompt,
                           steps=args.num_inference_steps, seed=args.seed, guidance_scale=args.guidance_scale,
                           out=args.out)
    print(format_table(result))
    print(f"details: {Path(args.out) / 'eval_base.json'}, grid: {Path(args.out) / 'eval_base.png'}")
    return 0


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    from .pretrain import pretrain_base

    print(pretrain_base(args.out, n_images=args.n_images, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                        seed=args.seed, stop_at_step=args.stop_at_step, latent_downsample=args.latent_downsample,
                        world=args.world, vae_batch=args.vae_batch, unet_batch=args.unet_batch, device=args.device,
                        latent_channels=args.latent_channels, checkpointing_steps=args.checkpointing_steps))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.max_train_steps, n=args.n, eval_n=args.eval_n)
    return 0


class Parser(argparse.ArgumentParser):
    """Every flag with a default says it in --help (sub-commands inherit the class), unless its help does."""

    def add_argument(self, *args, **kwargs):
        default = kwargs.get("default")
        if not any(default is x for x in (None, False, argparse.SUPPRESS)) and "default" not in (kwargs.get("help") or ""):
            kwargs["help"] = f"{kwargs.get('help') or ''} (default: %(default)s)".strip()
        return super().add_argument(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .config import CONTROL_GUIDANCE, ControlNetConfig
    from .data.conditions import CONDITIONERS
    from .eval.metrics import CONDITION_METRICS
    from .recipes import RECIPES

    p = Parser(prog="difftune", description="Train ControlNet and Custom Diffusion adapters on frozen Stable Diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an adapter").add_subparsers(dest="method", required=True)
    cn = train.add_parser("controlnet", help="train a ControlNet (flags as diffusers' train_controlnet.py)")
    cn.add_argument("--config", help="YAML/TOML/JSON file of settings (flags override it)")
    cn.add_argument("--recipe", choices=sorted(RECIPES), help="start from a named recipe (flags override it)")
    add_config_flags(cn, ControlNetConfig)
    add_launcher_flags(cn)
    cn.set_defaults(func=cmd_train_controlnet)
    from .cli_custom_diffusion import register as register_custom_diffusion
    from .cli_data import register as register_data

    g = sub.add_parser("generate", help="generate images with a trained ControlNet or Custom Diffusion concept")
    g.add_argument("--pretrained_model_name_or_path", help="base model folder, hub id or built-in name (default: the "
                   "base the adapter was trained on, as its run recorded it; else tiny-shapes)")
    g.add_argument("--controlnet", help="trained ControlNet folder (the training --output_dir)")
    g.add_argument("--image", help="conditioning image (with --controlnet)")
    g.add_argument("--condition", choices=tuple(CONDITIONERS),
                   help="--image is a plain picture: compute this condition from it (saved as OUT-condition.png)")
    _add_condition_flags(g)
    g.add_argument("--custom_diffusion", help="trained Custom Diffusion folder; use its tokens in --prompt")
    g.add_argument("--weight_name", help="weight file in the --custom_diffusion folder (default: the trained one)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative_prompt",
                   help="what the image should not show (classifier-free guidance steers away from it)")
    g.add_argument("--num_inference_steps", type=at_least(1), default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance_scale", type=finite_float, default=7.5)
    g.add_argument("--controlnet_conditioning_scale", type=finite_float, default=1.0)
    g.add_argument("--control_guidance", choices=CONTROL_GUIDANCE, default="both",
                   help="both: the ControlNet on both halves of classifier-free guidance (diffusers' default); "
                        "cond: on the conditional half only, so guidance amplifies the control too")
    g.add_argument("--num_images", type=at_least(1), default=1)
    g.add_argument("--resolution", type=at_least(8), help="image size (default: the base model's)")
    add_vae_flag(g)
    add_tokenizer_flag(g)
    g.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    g.add_argument("--cpu_offload", action="store_true", help="keep only the running model on the GPU")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--out", default="generated.png", help="output image: .png, .jpg, .webp, ... (several images get -0, -1, ... "
                                                  "suffixes)")
    g.set_defaults(func=cmd_generate)

    register_data(sub)

    t = sub.add_parser("make-tiny-model", help="write a tiny random-weight SD model folder (tests, smoke runs)")
    t.add_argument("--out", required=True)
    t.add_argument("--family", choices=("sd", "sdxl"), default="sd", help="SD 1.x layout or SDXL layout")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    t.set_defaults(func=cmd_make_tiny_model)

    ev = sub.add_parser("eval", help="measured quality").add_subparsers(dest="what", required=True)
    e = ev.add_parser("controlnet", help="condition fidelity on held-out conditions (fill50k: circle IoU; "
                                         "canny: edge F1; depth: depth correlation)")
    e.add_argument("--pretrained_model_name_or_path", help="base model (default: the base the ControlNet was "
                   "trained on, from its run's difftune_config.json; else tiny-shapes)")
    e.add_argument("--controlnet", required=True, help="trained ControlNet folder")
    e.add_argument("--data", help="held-out data folder to take the conditions from: fill50k, or one made by "
                                  "`difftune data conditions` (default: fresh circles / shapes)")
    e.add_argument("--metric", choices=tuple(CONDITION_METRICS),
                   help="fill50k: circle IoU; canny: edge F1; depth: depth correlation (default: the condition "
                        "--data was made with; without --data, the one the ControlNet's run trained on; else fill50k)")
    e.add_argument("--n", type=at_least(1), default=200,
                   help="held-out conditions to sample and score (fewer when --data holds fewer usable ones)")
    e.add_argument("--no_baseline", action="store_true", help="skip the base-model-alone baseline")
    add_vae_flag(e)
    add_tokenizer_flag(e)
    e.add_argument("--control_guidance", nargs="+", choices=CONTROL_GUIDANCE, default=["both"],
                   help="evaluate with the ControlNet on both halves of classifier-free guidance (both, row "
                        "controlnet; diffusers' default) and/or on the conditional half only (cond, row "
                        "controlnet_cond)")
    e.add_argument("--controlnet_conditioning_scale", type=finite_float, default=1.0,
                   help="the ControlNet's residuals times this, as in `difftune generate` (0: the base alone)")
    _add_condition_flags(e, defaults=False)
    eb = ev.add_parser("base", help="does the base model draw the prompt's shape and colours?")
    eb.add_argument("--pretrained_model_name_or_path", default="tiny-shapes")
    eb.add_argument("--n_prompts", type=at_least(1), default=30,
                    help="shapes-world prompts drawn (shape, colour, background; from --seed)")
    eb.add_argument("--per_prompt", type=at_least(1), default=8, help="images sampled per prompt")
    for q in (e, eb):
        q.add_argument("--num_inference_steps", type=at_least(1), default=20)
        q.add_argument("--guidance_scale", type=finite_float, default=7.5,
                       help="classifier-free guidance scale (1 or less: no guidance)")
        q.add_argument("--seed", type=at_least(0), default=0,
                       help="image i is sampled from seed + i; it also draws the fresh conditions or prompts "
                            "(a held-out set of its own for each seed)")
        q.add_argument("--out", default="eval", help="folder for the JSON and the PNG grid")
    e.set_defaults(func=cmd_eval_controlnet)
    eb.set_defaults(func=cmd_eval_base)
    register_custom_diffusion(sub, train, ev)

    pb = sub.add_parser("pretrain-base", help="train the tiny-shapes base model from scratch (what ships)")
    pb.add_argument("--out", required=True,
                    help="work folder: the finished base model is written to OUT/model (give that folder as "
                         "--pretrained_model_name_or_path); OUT/vae, the stages' checkpoints and the log beside it")
    pb.add_argument("--n_images", type=at_least(1), default=20000, help="shapes-world images generated to train on")
    pb.add_argument("--vae_steps", type=at_least(1), default=1500, help="optimizer steps of the VAE stage")
    pb.add_argument("--unet_steps", type=at_least(0), default=2000,
                    help="0: train and save the VAE only (OUT/vae; no OUT/model)")
    pb.add_argument("--seed", type=int, default=0)
    pb.add_argument("--stop_at_step", type=at_least(1), default=None,
                    help="end at this UNet step, after exporting the model there; the same flags with a later "
                         "--stop_at_step, or none, continue from it (default: at --unet_steps)")
    pb.add_argument("--latent_downsample", type=int, choices=(2, 4, 8), default=4,
                    help="image pixels per latent pixel: 4 ships (16x16 latents); 8 gives 8x8, 2 gives 32x32 (an experiment)")
    pb.add_argument("--latent_channels", type=at_least(1), default=4,
                    help="channels per latent pixel, any positive number: 4 ships (as SD 1.x/SDXL); more (8, 16 "
                         "as SD3/FLUX) keep more of each patch")
    pb.add_argument("--world", choices=("standard", "wide"), default="standard",
                    help="standard (ships): shapes fully in frame; wide: half of the images with fill50k's "
                         "geometry too (smaller shapes, cut by the border)")
    pb.add_argument("--vae_batch", type=at_least(1), default=32, help="images per VAE optimizer step")
    pb.add_argument("--unet_batch", type=at_least(1), default=64, help="images per UNet optimizer step")
    pb.add_argument("--checkpointing_steps", type=at_least(1), default=250,
                    help="save a resumable checkpoint of the stage every N steps; the same command run again "
                         "continues a killed run from the newest (default: 250)")
    pb.add_argument("--device", default="auto", help="auto (a CUDA GPU when torch sees one), cpu, cuda, cuda:N")
    pb.set_defaults(func=cmd_pretrain_base)

    d = sub.add_parser("demo", help="end to end on the embedded default: data, train, sample")
    d.add_argument("--out", default="difftune-demo")
    d.add_argument("--max_train_steps", type=at_least(1), default=None,
                   help="ControlNet training steps (default: the controlnet_tiny_demo recipe's, 800)")
    d.add_argument("--n", type=at_least(1), default=None, help="fill50k samples to generate (default: 5000)")
    d.add_argument("--eval_n", type=at_least(1), default=200,
                   help="held-out conditions the evaluation samples (about 40%% of the demo's time at 200; 16 for a quick look)")
    d.set_defaults(func=cmd_demo)
    from .bench.cli import register as register_bench

    register_bench(sub)
    return p


def parse_command(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; a flag no command has, or one of another command, is refused naming it."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown(parser, argv, unknown)
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    show_messages()
    args = parse_command(sys.argv[1:] if argv is None else list(argv))
    sys.argv[:] = redact_secrets(sys.argv)  # parsed: nothing after this needs the token in the command line
    previous = stop_on_sigterm()
    try:
        return args.func(args)
    except UserError as e:
        from .errors import LaunchError

        if not (isinstance(e, LaunchError) and os.environ.get("RANK", "0") != "0"):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, Terminated) else 130
        if os.environ.get("RANK", "0") != "0":  # several processes: the message once, from the first
            return code
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        hint = {"train": saved_so_far(getattr(args, "run_output_dir", None)),
                "demo": ": run it again to resume", "pretrain-base": ": run it again to resume"}.get(args.command, "")
        print(f"\n{what}{hint}", file=sys.stderr)  # on a line of its own, after any progress bar
        return code
    finally:
        if previous is not None:  # main() called in a longer-lived process (tests, a notebook)
            import signal

            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
