"""Model surgery for Custom Diffusion: trainable cross-attention processors and new tokens.

Kumari et al. 2023 (arXiv 2212.04488), sec. 3.1: fine-tuning only the cross-attention
projections W_k, W_v that map text features c to keys/values (K = W_k c, V = W_v c) is enough
to learn a new concept, because only they see the text; ``freeze_model="crossattn"`` also
trains W_q and W_out. The trainable copies start from the base weights, so before any
training the model computes exactly what the base model computes. A new concept gets a new
token ``V*`` (``<new1>``) whose embedding row is initialised from an existing word and
trained; every other row of the embedding table stays bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

FREEZE_MODELS = ("crossattn_kv", "crossattn")


def _processor_class(xformers: bool = False) -> type:
    from diffusers.models import attention_processor as ap

    if xformers:
        return ap.CustomDiffusionXFormersAttnProcessor
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return ap.CustomDiffusionAttnProcessor2_0
    return ap.CustomDiffusionAttnProcessor


def is_cross_attention(name: str) -> bool:
    """``attn2`` of a transformer block attends to the text; ``attn1`` is self-attention."""
    return name.endswith("attn2.processor")


def install_processors(unet: torch.nn.Module, freeze_model: str = "crossattn_kv", xformers: bool = False
                       ) -> dict[str, torch.nn.Module]:
    """Give every attention layer of ``unet`` a Custom Diffusion processor; return the trainable ones.

    Cross-attention layers get fp32 copies of ``to_k``/``to_v`` (and ``to_q``/``to_out`` with
    ``crossattn``) initialised from the base weights; self-attention layers get weightless
    processors that compute plain attention. The UNet's own weights stay frozen.
    Returns ``{processor name: processor}`` of the processors with weights.
    """
    if freeze_model not in FREEZE_MODELS:
        raise ConfigError(f"--freeze_model {freeze_model!r}: choose crossattn_kv or crossattn.")
    cls = _processor_class(xformers)
    train_q_out = freeze_model == "crossattn"
    procs: dict[str, torch.nn.Module] = {}
    trainable: dict[str, torch.nn.Module] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name[: -len(".processor")])
        if not is_cross_attention(name):
            procs[name] = cls(train_kv=False, train_q_out=False, hidden_size=None, cross_attention_dim=None)
            continue
        proc = cls(train_kv=True, train_q_out=train_q_out, hidden_size=attn.to_k.out_features,
                   cross_attention_dim=attn.to_k.in_features, out_bias=attn.to_out[0].bias is not None)
        with torch.no_grad():
            copies = {"to_k_custom_diffusion": attn.to_k, "to_v_custom_diffusion": attn.to_v}
            if train_q_out:
                copies["to_q_custom_diffusion"] = attn.to_q
                copies["to_out_custom_diffusion.0"] = attn.to_out[0]
            for dst, src in copies.items():
                proc.get_submodule(dst).load_state_dict({k: v.float() for k, v in src.state_dict().items()})
        proc.to(device=attn.to_k.weight.device, dtype=torch.float32)
        procs[name] = trainable[name] = proc
    unet.set_attn_processor(procs)
    for proc in trainable.values():
        proc.requires_grad_(True)
    return trainable


def custom_diffusion_processors(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The processors of ``unet`` that hold Custom Diffusion weights, by name (sorted)."""
    return {name: p for name, p in sorted(unet.attn_processors.items())
            if isinstance(p, torch.nn.Module) and len(p.state_dict()) > 0}


def processor_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"<processor name>.<weight>": tensor}``, the key layout diffusers' ``load_attn_procs`` reads."""
    out = {}
    for name, proc in custom_diffusion_processors(unet).items():
        for k, v in proc.state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def load_processor_state_dict(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of ``processor_state_dict``: fails loudly on a missing or unexpected key or shape."""
    procs = custom_diffusion_processors(unet)
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in procs}
    for key, value in tensors.items():
        name = next((n for n in procs if key.startswith(n + ".")), None)
        if name is None:
            raise ConfigError(f"Custom Diffusion weight {key!r} matches no cross-attention layer of this UNet: "
                              "was it trained on another base model?")
        grouped[name][key[len(name) + 1:]] = value
    for name, proc in procs.items():
        try:
            proc.load_state_dict(grouped[name], strict=True)
        except RuntimeError as e:
            raise ConfigError(f"Custom Diffusion weights for {name} do not fit this UNet: {e}") from None


# ----------------------------------------------------------------------------- modifier tokens
def single_token_id(tokenizer: Any, word: str, flag: str = "--initializer_token") -> int:
    """The id of ``word`` if the tokenizer keeps it as one token, else a ConfigError.

    Tokenize the string itself, never ``[word]``: under transformers 5, ``encode([word])``
    returns one nested list, whose length is 1 whatever the word, so a multi-token word such
    as 'ktn' (two tokens in CLIP's vocabulary) slips past a length check and crashes later.
    """
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        singles = [w for w in ("cat", "dog", "person", "star", "circle", "square", "thing", "object")
                   if len(tokenizer(w, add_special_tokens=False).input_ids) == 1][:3]  # examples true of this tokenizer
        example = f", e.g. {', '.join(map(repr, singles))}" if singles else ""
        way_out = ("" if flag.startswith("the default") else
                   ", or leave the flag out to use the class prompt's last word")
        raise ConfigError(
            f"{flag} {word!r} is {len(ids)} tokens in this tokenizer ({', '.join(map(repr, pieces))}); a new "
            f"token's embedding is copied from ONE existing token. Give --initializer_token with a word that is a "
            f"single token here{example}{way_out}."
        )
    return int(ids[0])


def add_modifier_tokens(tokenizer: Any, text_encoder: torch.nn.Module, modifier_tokens: list[str],
                        initializer_tokens: list[str], flag: str = "--initializer_token") -> list[int]:
    """Add each modifier token to the tokenizer; its new embedding row copies its initializer's row.

    Returns the new token ids (the only rows of the embedding table that will train).
    """
    if len(initializer_tokens) < len(modifier_tokens):
        raise ConfigError(f"{len(modifier_tokens)} modifier tokens but {len(initializer_tokens)} initializer "
                          "tokens: give one --initializer_token per --modifier_token, '+'-separated.")
    check_new_tokens(tokenizer, modifier_tokens)  # first: a token that is a word is the mistake to fix first
    init_ids = [single_token_id(tokenizer, w, flag) for w in initializer_tokens[: len(modifier_tokens)]]
    new_ids = add_tokens(tokenizer, text_encoder, modifier_tokens)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for new, init in zip(new_ids, init_ids):
            table[new] = table[init]
    return new_ids


def check_new_tokens(tokenizer: Any, tokens: list[str]) -> None:
    """Refuse a modifier token the tokenizer already has, as a token or as a whole word."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token in vocab:
            raise ConfigError(f"--modifier_token {token!r} is already a token of the tokenizer; pick a new string "
                              "such as '<new1>'.")
        if f"{token.lower()}</w>" in vocab:  # CLIP's BPE keeps whole words as 'word</w>', not 'word'
            raise ConfigError(f"--modifier_token {token!r} is a word the tokenizer already knows "
                              f"({token.lower()}</w>): as a new token it would take that word's place in every "
                              "prompt, the class prompt's too. Pick a string that is no word, such as '<new1>'.")


def add_tokens(tokenizer: Any, text_encoder: torch.nn.Module, tokens: list[str]) -> list[int]:
    """Add new tokens to the tokenizer and rows to the embedding table (set by the caller); return their ids."""
    check_new_tokens(tokenizer, tokens)
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ConfigError(f"--modifier_token {'+'.join(tokens)}: only {added} could be added as new tokens.")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set by the caller
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def restrict_to_rows(weight: torch.nn.Parameter, rows: list[int]) -> torch.utils.hooks.RemovableHandle:
    """Zero the gradient of every row of ``weight`` but ``rows``.

    With this hook and no weight decay on ``weight``, AdamW's moments of the other rows stay
    exactly zero, so their update is exactly zero and they stay bit-identical.
    """
    keep = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    keep[rows] = True
    return weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))


def learned_embeddings(text_encoder: torch.nn.Module, tokens: list[str], ids: list[int]) -> dict[str, torch.Tensor]:
    """``{token: embedding row}`` (fp32, CPU), the textual-inversion layout diffusers loads."""
    table = text_encoder.get_input_embeddings().weight.detach()
    return {t: table[i].float().cpu().clone() for t, i in zip(tokens, ids)}


def set_embeddings(text_encoder: torch.nn.Module, ids: list[int], rows: list[torch.Tensor]) -> None:
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i, row in zip(ids, rows):
            table[i] = row.to(table.device, table.dtype)
