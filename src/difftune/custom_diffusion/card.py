"""README.md of a Custom Diffusion output folder: what was trained and how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import base_in_code
from ..noising import objective_text
from ..optim import batch_text, learning_rate_text


def model_card(method: Any, output_dir: Path, summary: dict) -> str:
    c = method.cfg
    base = c.model.pretrained_model_name_or_path
    safe = not c.custom.no_safe_serialization
    ext = "safetensors" if safe else "bin"
    n_params = sum(p.numel() for proc in method.processors.values() for p in proc.parameters())
    grid = summary.get("validation_grid")
    loss = summary.get("final_loss")
    tokens = method.modifier_tokens
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [custom-diffusion, stable-diffusion, text-to-image, difftune]",
        "---",
        "",
        "# Custom Diffusion concept(s) trained with difftune",
        "",
        f"- Base model: `{base}`; tokens: {', '.join(f'`{t}`' for t in tokens)} "
        f"(initialised from {', '.join(f'`{w}`' for w in method.initializers)})" if tokens else
        f"- Base model: `{base}`; no new tokens (the prompts' own words; text encoder unchanged)",
        *[f"- Concept: `{x.instance_prompt}` from `{x.instance_data_dir}`"
          + (f", class prompt `{x.class_prompt}`" if x.class_prompt else "") for x in method.concepts],
        f"- Trained: cross-attention {'K/V' if c.custom.freeze_model == 'crossattn_kv' else 'Q/K/V/out'} "
        f"({n_params:,} parameters) + {len(tokens)} embedding row(s); prior preservation: "
        f"{'on, weight ' + str(c.data.prior_loss_weight) if c.data.with_prior_preservation else 'off'}",
        f"- Optimizer steps: {summary.get('global_step')} of "
        f"{batch_text(c.train.train_batch_size, summary.get('processes', 1), c.train.gradient_accumulation_steps)}"
        f", {learning_rate_text(summary, c.optim)}",
        f"- Loss: {objective_text(c.loss.prediction_type, c.loss.snr_gamma, c.loss.timestep_sampling)}",
        f"- Final loss: {loss:.4f}" if isinstance(loss, float) else "",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        *base_in_code(base)[0],
        f'pipe = StableDiffusionPipeline.from_pretrained({base_in_code(base)[1]}'
        + (f', variant="{method.base.variant}"' if method.base.variant else "") + ")",
        *([f'pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, '
           f'prediction_type="{method.overridden_prediction}")'] if method.overridden_prediction else []),
        "# _pipeline=pipe works around huggingface/diffusers#9320 (load_attn_procs is a no-op without it)",
        f'pipe.unet.load_attn_procs("{output_dir}", weight_name="pytorch_custom_diffusion_weights.{ext}", '
        "_pipeline=pipe)",
        *[f'pipe.load_textual_inversion("{output_dir}", weight_name="{t}.{ext}")' for t in tokens],
        f'image = pipe("{method.concepts[0].instance_prompt}", num_inference_steps=50).images[0]',
        "```",
        "",
        # (no --pretrained_model_name_or_path: on the recorded base, generate reads it as this run did)
        f"or: `difftune generate --custom_diffusion {output_dir} --prompt \"{method.concepts[0].instance_prompt}\"`",
    ]
    if grid:
        lines += ["", f"![validation samples]({Path(grid).relative_to(output_dir)})"]
    return "\n".join(lines) + "\n"
