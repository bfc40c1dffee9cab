"""Float8 storage of the frozen UNet (``--fp8_frozen_unet``): small, close, and trainable through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difftune.fp8 import FP8, Fp8Conv2d, Fp8Linear, dequantize, quantize, store_in_fp8


def _bytes(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(32, 48), (5, 32)),
    (lambda: nn.Conv2d(8, 16, 3, padding=1, stride=2), (2, 8, 12, 12)),
])
def test_fp8_layers_compute_with_their_dequantised_weight_forward_and_backward(make, shape):
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    fp8 = (Fp8Linear if isinstance(layer, nn.Linear) else Fp8Conv2d)(layer)
    assert fp8.weight_fp8.dtype == FP8 and fp8.weight_scale.dtype == torch.float32
    w = dequantize(fp8.weight_fp8, fp8.weight_scale, torch.float32)
    assert float((w - layer.weight).norm() / layer.weight.norm()) < 0.05  # e4m3: ~2 significant digits
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = fp8(x)
    y_ref = (nn.functional.linear(x_ref, w, layer.bias) if isinstance(layer, nn.Linear)
             else nn.functional.conv2d(x_ref, w, layer.bias, layer.stride, layer.padding))
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_fp8_scales_are_powers_of_two_so_a_bf16_layer_dequantises_exactly_in_two_kernels():
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.logspace(-4, 1, 64)[:, None]  # channels of very different sizes
    w8, scale = quantize(w)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()
    top = w8.float().abs().amax(dim=1)
    assert (top >= 224).all() and (top <= 448).all()  # each channel uses the upper half of e4m3's range (rounded)
    exact = w8.float() * scale  # exact in fp32: 4 significant bits times a power of two
    assert torch.equal(dequantize(w8, scale, torch.bfloat16), exact.to(torch.bfloat16))
    assert torch.equal(dequantize(w8, scale, torch.float32), exact)

    layer = Fp8Linear(nn.Linear(32, 64, bias=False).requires_grad_(False)).to(torch.bfloat16)
    ops = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(5, 32, dtype=torch.bfloat16)
    layer(x)  # the first call converts the scales to bf16, once
    with Count():
        layer(x)
    assert ops == ["_to_copy", "mul", "mm"]  # cast, scale, matmul: nothing through fp32


def test_store_in_fp8_halves_a_bf16_unet_keeps_its_output_close_and_survives_dtype_casts(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").requires_grad_(False)
    reference = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").to(torch.bfloat16)
    n = store_in_fp8(unet.to(torch.bfloat16))
    unet.to(torch.bfloat16)  # a later cast must not turn the float8 weights back into bf16
    assert n > 10 and isinstance(unet.conv_in, nn.Conv2d)  # the first and last layers stay as they were
    assert {m.weight_fp8.dtype for m in unet.modules() if isinstance(m, (Fp8Linear, Fp8Conv2d))} == {FP8}
    assert _bytes(unet) < 0.6 * _bytes(reference)
    torch.manual_seed(0)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, dtype=torch.bfloat16)
    h = torch.randn(2, 8, c.cross_attention_dim, dtype=torch.bfloat16)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        out, ref = unet(x, t, encoder_hidden_states=h).sample, reference(x, t, encoder_hidden_states=h).sample
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 0.08
    trainable = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="frozen"):
        store_in_fp8(trainable)
