"""A tiny Stable-Diffusion-architecture model built from configs, with random weights.

It has every component of a real SD 1.x folder (CLIP tokenizer and text encoder, VAE with
an 8x down-sampling encoder, UNet with cross-attention, DDPM scheduler) at a size that
trains on a laptop CPU. It is what the tests and, until a pretrained tiny base is bundled,
the demo run on. It is saved in the diffusers layout, so it goes through exactly the same
loading code as a real Stable Diffusion folder.

The tokenizer is a real ``CLIPTokenizer`` (byte-level BPE) whose vocabulary is the 512
byte symbols plus whole-word tokens for the words of our synthetic data sets (colour
names, shapes); any other word still tokenizes, byte by byte.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Four VAE blocks so that latents are 1/8 of the image, as in SD (and as the ControlNet's
# default conditioning embedding expects).
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    norm_num_groups=32,
    cross_attention_dim=32,
    attention_head_dim=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)

DOMAIN_WORDS = (
    "circle square triangle star ring cross heart diamond hexagon stripes dots checkered "
    "with background a an the of photo picture small big large tiny close up far away zoomed in very"
).split()


def _byte_symbols() -> list[str]:
    """The reversible byte -> printable-unicode table used by GPT-2/CLIP byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def word_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary and merge list in which each of ``words`` is one token.

    CLIP's BPE splits a word into characters, the last one carrying ``</w>``, and then
    applies merges by rank; merging left to right makes every prefix a token, so each word
    ends as a single ``word</w>`` token.
    """
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    known = set(vocab_list)
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        if not all(ord(c) < 128 for c in word):
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab_list.append(merged)
                known.add(merged)
            left = merged
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(folder: str | os.PathLike, words: Iterable[str]) -> None:
    """Write CLIPTokenizer files (vocab.json, merges.txt, configs) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = word_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def default_words() -> list[str]:
    from .data.colors import CSS_COLORS

    words = list(DOMAIN_WORDS)
    for name, _ in CSS_COLORS:
        words += name.split()
    return words


def build_tiny_components(seed: int = 0, words: Iterable[str] | None = None) -> dict:
    """Tokenizer, text encoder, VAE, UNet and scheduler of the tiny architecture (random weights)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="difftune_tok_") as tmp:
        write_tokenizer(tmp, default_words() if words is None else words)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=DDPMScheduler(**SD_SCHEDULER),
    )


def save_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny random model and save it as a diffusers ``StableDiffusionPipeline`` folder."""
    from diffusers import StableDiffusionPipeline

    parts = build_tiny_components(seed)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    from .checkpoint import umask_mode  # (here: the CLI's parser reads this module, and torch is slow to load)

    umask_mode(out)
    # Older transformers read only the classic slow-tokenizer files: keep them too.
    with tempfile.TemporaryDirectory(prefix="difftune_tok_") as tmp:
        write_tokenizer(tmp, default_words())
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            if not (out / "tokenizer" / name).exists():
                (out / "tokenizer" / name).write_bytes((Path(tmp) / name).read_bytes())
    (out / "RANDOM_WEIGHTS.json").write_text(
        json.dumps({"note": "random weights from difftune.tiny; not a trained model", "seed": seed})
    )
    return out


# SDXL's layout at toy size: no attention in the first block, two transformer layers in the
# second, text_time additional embedding fed by 6 time ids x 8 + the 32-d pooled embedding,
# cross-attention over both encoders' hidden states concatenated (32 + 32).
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=32,
)


def build_tiny_sdxl_components(seed: int = 0) -> dict:
    """The parts of a tiny random SDXL: two tokenizers/encoders (the second with projection), VAE, UNet."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="difftune_tok_") as tmp:
        write_tokenizer(tmp, default_words())
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")  # SDXL's second tokenizer pads with "!"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer_2), **TINY_TEXT))
    return dict(tokenizer=tokenizer, tokenizer_2=tokenizer_2, text_encoder=text_encoder,
                text_encoder_2=text_encoder_2, vae=vae, unet=unet,
                scheduler=DDPMScheduler(**SD_SCHEDULER, timestep_spacing="leading"))


def save_tiny_sdxl_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny random SDXL and save it as a diffusers ``StableDiffusionXLPipeline`` folder."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed), add_watermarker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    from .checkpoint import umask_mode  # (here: the CLI's parser reads this module, and torch is slow to load)

    umask_mode(out)
    with tempfile.TemporaryDirectory(prefix="difftune_tok_") as tmp:  # slow-tokenizer files, as save_tiny_model
        write_tokenizer(tmp, default_words())
        for sub in ("tokenizer", "tokenizer_2"):
            for name in ("vocab.json", "merges.txt"):
                if not (out / sub / name).exists():
                    (out / sub / name).write_bytes((Path(tmp) / name).read_bytes())
    (out / "RANDOM_WEIGHTS.json").write_text(
        json.dumps({"note": "random weights from difftune.tiny (SDXL layout); not a trained model", "seed": seed})
    )
    return out
