"""Mixed precision and devices without a GPU: the regularized step under CPU bf16 autocast, and the
models built and run on the `meta` device (where any tensor created on the CPU by mistake fails).

The CUDA side of the same path is tests/test_cuda.py (`pytest -m cuda`, skipped without a GPU).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET, perturb_
from torch import nn

import ops
from checkpoint import unet_from_config
from lora import freeze_all_but_lora, inject_lora, lora_layers, lora_parameters
from regularizer import StepwiseVariationRegularizer, predict_x0, variation_norm
from unet import UNet
from vae import VAE


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def regularized_step(unet, latents, noise0, direction, text, autocast, lam=1.0, dtype=torch.bfloat16):
    """Eq. 14 with the Eq. 9/10 penalty (the regularizer.py docstring's step), backward included, on
    the inputs' device -> (loss, norms, LoRA gradients). `a` is fixed at 0.3 x the batch mean."""
    unet.zero_grad()
    device = latents.device
    t, abar = torch.tensor([50, 800], device=device), torch.tensor([0.95, 0.15], device=device).view(-1, 1, 1, 1)
    noise = noise0.clone().requires_grad_()  # the leaf of Eq. 10
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise  # Eq. 2
    with ops.double_backward(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        eps_pred = unet(x_t, t, text).float()
    x0_pred = predict_x0(x_t, eps_pred, abar.flatten())
    norms = variation_norm(x0_pred, noise, (1 - abar).sqrt().flatten(), direction)  # Eq. 10
    penalty = (norms - 0.3 * norms.detach().mean()).pow(2).mean()  # Eq. 9
    loss = F.mse_loss(eps_pred, noise0) + lam * penalty  # Eq. 14
    loss.backward()
    return loss.detach(), norms.detach(), torch.cat([p.grad.flatten() for p in lora_parameters(unet)])


@pytest.mark.parametrize("frozen_dtype", [torch.bfloat16, torch.float32])
def test_regularized_step_under_cpu_bf16_autocast_matches_fp32(monkeypatch, frozen_dtype):
    """Frozen weights in bf16 (train.py's --mixed-precision bf16) or fp32 (autocast alone), LoRA in
    fp32, autocast bf16, against all-fp32; with fp32 frozen weights the convolution's backward sees
    mixed dtypes unless ops.py casts its inputs.
    Tolerances: the loss and the Eq. 10 norms within 1% (measured <= 0.1%); the LoRA gradient, which
    passes through the forward, the Eq. 10 backward and the backward of that, each rounding to bf16
    (u = 2^-8 per op) over ~10 layers, within 10% in norm (measured 2.3-3.2%). The penalty's share of
    that gradient is ~90% (checked below), so a double backward that went wrong under autocast fails."""
    monkeypatch.setattr(ops, "MATH_MAX_KEYS", 0)  # self- and cross-attention through our Function
    calls = {"attention": 0, "conv": 0}
    for name, cls in (("attention", ops.DoubleBackwardAttention), ("conv", ops.DoubleBackwardConv2d)):
        monkeypatch.setattr(cls, "apply", lambda *a, _apply=cls.apply, _name=name:
                            calls.__setitem__(_name, calls[_name] + 1) or _apply(*a))
    check_mixed_precision_step("cpu", frozen_dtype, torch.bfloat16)
    assert calls["attention"] > 0 and calls["conv"] > 0


def check_mixed_precision_step(device, frozen_dtype, autocast_dtype):
    """The tiny UNet with a perturbed LoRA: the regularized step with frozen weights in `frozen_dtype`
    under autocast against all-fp32, with the tolerances of the test above (also used on CUDA)."""
    torch.manual_seed(0)
    unet = perturb_(unet_from_config(TINY_UNET))
    inject_lora(unet, rank=2)
    freeze_all_but_lora(unet)
    perturb_(nn.ModuleList(layer.lora_up for layer in lora_layers(unet).values()), seed=1, scale=0.05)
    unet.to(device)
    mixed = copy.deepcopy(unet)
    for name, p in mixed.named_parameters():
        if "lora" not in name:
            p.data = p.data.to(frozen_dtype)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 4, 16, 16, generator=g) for _ in range(3)] + [torch.randn(2, 5, 32, generator=g)]
    inputs = [x.to(device) for x in inputs]

    loss, norms, grad = regularized_step(mixed, *inputs, autocast=True, dtype=autocast_dtype)
    assert {p.dtype for p in lora_parameters(mixed)} == {p.grad.dtype for p in lora_parameters(mixed)} \
        == {torch.float32}
    assert torch.isfinite(loss) and torch.isfinite(norms).all() and torch.isfinite(grad).all()
    loss32, norms32, grad32 = regularized_step(unet, *inputs, autocast=False)
    assert relative_error(loss, loss32) < 0.01
    assert relative_error(norms, norms32) < 0.01
    assert relative_error(grad, grad32) < 0.1
    _, _, grad_base = regularized_step(unet, *inputs, autocast=False, lam=0.0)
    assert relative_error(grad_base, grad32) > 0.5  # the penalty dominates: the 10% is a real test


def assert_all_on_meta(model):
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not stray, stray


def test_sd15_models_and_lora_live_and_run_on_the_meta_device():
    """Built on meta (as checkpoint.load_models does), LoRA injected after, a regularized SD-1.5 step
    (512 px latents, double backward) and the VAE run on meta inputs: any tensor that forward or
    backward creates on the CPU instead of on the input's device raises, so `.to(...)`, `device=`
    and factory calls all follow the input. Shapes only; no memory, a few seconds."""
    with torch.device("meta"):
        unet, vae = UNet(), VAE()
    inject_lora(unet, rank=8)  # outside the context: the LoRA must follow the base weights' device
    params = freeze_all_but_lora(unet)
    for model in (unet, vae):
        assert_all_on_meta(model)
    meta = lambda *shape: torch.empty(*shape, device="meta")
    latents, direction, text = meta(1, 4, 64, 64), meta(1, 4, 64, 64), meta(1, 77, 768)
    noise, abar, t = meta(1, 4, 64, 64).requires_grad_(), meta(1), torch.tensor([999], device="meta")
    x_t = abar.sqrt().view(-1, 1, 1, 1) * latents + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise  # Eq. 2
    reg = StepwiseVariationRegularizer().to("meta").eval()  # eval: the running-mean update indexes by value
    assert_all_on_meta(reg)
    with ops.double_backward():
        eps_pred = unet.train()(x_t, t, text)
    x0_pred = predict_x0(x_t, eps_pred, abar)
    loss = F.mse_loss(eps_pred, noise.detach()) + reg(x0_pred, noise, (1 - abar).sqrt(), direction)
    loss.backward()
    assert eps_pred.shape == latents.shape and loss.device.type == "meta"
    assert all(p.grad.device.type == "meta" for p in params)
    with torch.no_grad():
        assert unet(latents, 17, text).device.type == "meta"  # a Python int timestep follows the input
    mean, logvar = vae.encode(meta(1, 3, 512, 512))
    assert mean.shape == logvar.shape == (1, 4, 64, 64) and mean.device.type == "meta"
    assert vae.decode(mean).shape == (1, 3, 512, 512)
    with pytest.raises(RuntimeError, match="meta"), torch.no_grad():  # a stray CPU tensor fails
        unet(latents, t, text.cpu())
