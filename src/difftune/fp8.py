"""Frozen weights stored in float8, for training that must fit a small GPU.

``--fp8_frozen_unet`` replaces each ``nn.Linear`` and ``nn.Conv2d`` of the frozen UNet by a
module that keeps its weight as float8 (e4m3: 4 exponent bits, 3 mantissa bits) with one fp32
scale per output channel, and dequantises it to the compute dtype when the layer runs. The
UNet's weights then take one byte a parameter instead of bf16's two (SD 1.5: 0.86 GB instead
of 1.72 GB). What it costs: e4m3 keeps about two significant digits, so each weight moves by up
to ~6% of itself (1/16 for a 3-bit mantissa) and the UNet's output by a few percent.

Why not diffusers' ``enable_layerwise_casting``: it is made for inference. Its hook casts a
layer's weight back to float8 in place after the forward, so autograd's saved copy of the
weight is float8 by the time backward needs it ("expected scalar type BFloat16 but found
Float8_e4m3fn"). A ControlNet is trained *through* the frozen UNet, so backward needs the
UNet's weights (for the input gradients, never for weight gradients). Here a small autograd
function saves the float8 weight and dequantises it again in backward, so no full-precision
copy of any weight outlives its own layer's forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
# layers left in their dtype: few weights, and the first/last layers and the timestep path matter most
SKIP = ("conv_in", "conv_out", "time_embedding", "add_embedding", "class_embedding", "time_proj")


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 weight and fp32 per-output-channel scale with ``weight ~= fp8 * scale``.

    Each scale is the power of two just above the channel's largest magnitude / 448, so the
    channel uses the upper half of e4m3's range or more (its relative precision is the same
    anywhere in that range), and dequantising is exact in bf16 as in fp32: one cast and one
    multiply, where a scale of any value needs the product in fp32 and a cast back (three
    kernels per layer, in forward, again in recomputation and in backward)."""
    w = weight.detach().float()
    amax = w.abs().flatten(1).amax(dim=1).clamp(min=1e-12)
    _, exponent = torch.frexp(amax / FP8_MAX)  # amax / 448 < 2 ** exponent
    scale = torch.ldexp(torch.ones_like(amax), exponent).view(-1, *([1] * (w.dim() - 1)))
    return (w / scale).to(FP8), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w8 * scale`` in ``dtype``. Exact for bf16 and fp32 (power-of-two scales): two kernels
    when ``scale`` is already in ``dtype``. fp16 (whose exponent range is narrow) goes through fp32."""
    if dtype in (torch.bfloat16, torch.float32):
        return w8.to(dtype) * scale.to(dtype)
    return (w8.to(torch.float32) * scale.float()).to(dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        return F.linear(x, dequantize(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        return grad @ dequantize(w8, scale, grad.dtype), None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(w8, scale)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, dequantize(w8, scale, x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(shape, dequantize(w8, scale, grad.dtype), grad, stride, padding,
                                            dilation, groups)
        return grad_x, None, None, None, None, None, None, None


class _Fp8Storage(nn.Module):
    """A frozen layer's float8 weight, its fp32 scale and its bias, as buffers. They are kept
    through ``.to(dtype)`` (which would otherwise cast every floating-point buffer): only their
    device follows; the bias follows dtype and device."""

    def __init__(self, layer: nn.Linear | nn.Conv2d):
        super().__init__()
        w8, scale = quantize(layer.weight)
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self._scales: dict[torch.dtype, torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        w8, scale = self.weight_fp8, self.weight_scale
        super()._apply(fn, recurse)
        self.weight_fp8 = w8.to(self.weight_fp8.device)
        self.weight_scale = scale.to(self.weight_scale.device)
        self._scales = {}
        return self

    def scale_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in the compute dtype, converted once (exactly: they are powers of two)."""
        s = self._scales.get(dtype)
        if s is None:
            s = self._scales[dtype] = self.weight_scale.to(dtype)
        return s


class Fp8Linear(_Fp8Storage):
    """A frozen ``nn.Linear`` whose weight is stored in float8 (see the module docstring)."""

    def __init__(self, layer: nn.Linear):
        super().__init__(layer)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Fp8Linear.apply(x, self.weight_fp8, self.scale_in(x.dtype), bias)


class Fp8Conv2d(_Fp8Storage):
    """A frozen ``nn.Conv2d`` whose weight is stored in float8 (see the module docstring)."""

    def __init__(self, layer: nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("float8 storage supports zero padding given as numbers only")
        super().__init__(layer)
        self.conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Fp8Conv2d.apply(x, self.weight_fp8, self.scale_in(x.dtype), bias, *self.conv)


def store_in_fp8(model: nn.Module, skip: tuple[str, ...] = SKIP) -> int:
    """Replace the frozen ``model``'s Linear and Conv2d layers (but those under ``skip`` names) by
    float8-storage ones, in place; returns how many were replaced. Inference and backward through
    the model both work; its weights can no longer be trained or saved as a diffusers model."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("float8 storage is for frozen models: this one has trainable parameters")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(part in skip for part in name.split("."))]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(layer) if isinstance(layer, nn.Linear) else Fp8Conv2d(layer))
    return len(targets)
