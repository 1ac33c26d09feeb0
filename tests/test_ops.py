"""ops.py: the double-backward path has the math path's first and second derivatives.

Tiny float64 shapes; gradcheck / gradgradcheck compare against finite differences, the other tests
against `math_attention` differentiated by autograd (the oracle).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import ops
from ops import AttentionBackward, DoubleBackwardAttention, math_attention


def qkv(b=1, heads=2, lq=5, lk=5, d=3, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    return make(b, heads, lq, d), make(b, heads, lk, d), make(b, heads, lk, dv or d)


def first_and_second(fn, q, k, v, seed=1):
    """Gradient of <fn(q,k,v), w> (create_graph) and the gradient of a function of that gradient."""
    g = torch.Generator().manual_seed(seed)
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v), create_graph=True)
    u = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in grads]
    # A nonlinear function of the first derivative, like Eq. 10's norm of a vjp.
    second_loss = sum(((x * ui).sum()) ** 2 for x, ui in zip(grads, u)) + (out ** 2).sum()
    second = torch.autograd.grad(second_loss, (q, k, v))
    return out, grads, second


@pytest.mark.parametrize("lq,lk,d,dv,chunk", [(5, 5, 3, 3, 2), (4, 7, 3, 5, 3), (6, 3, 2, 2, 100)])
def test_gradcheck_and_gradgradcheck_of_the_function(lq, lk, d, dv, chunk):
    q, k, v = qkv(lq=lq, lk=lk, d=d, dv=dv)
    fn = lambda q, k, v: DoubleBackwardAttention.apply(q, k, v, chunk)
    assert gradcheck(fn, (q, k, v))
    assert gradgradcheck(fn, (q, k, v))


def test_gradgradcheck_of_the_backward_with_respect_to_out_and_grad_out():
    """The double backward also differentiates w.r.t. the saved output O and the incoming dO."""
    q, k, v = qkv(lq=4, lk=6, d=3)
    out = math_attention(q, k, v).detach().requires_grad_()
    grad_out = torch.randn_like(out).requires_grad_()
    assert gradcheck(lambda *x: AttentionBackward.apply(*x, 3), (q, k, v, out, grad_out))


@pytest.mark.parametrize("lq,lk,d,dv", [(9, 9, 4, 4), (9, 5, 4, 6), (3, 8, 2, 3)])
def test_first_and_second_derivatives_equal_the_math_path(lq, lk, d, dv):
    q, k, v = qkv(b=2, heads=3, lq=lq, lk=lk, d=d, dv=dv)
    ours = first_and_second(lambda *x: DoubleBackwardAttention.apply(*x, 4), q, k, v)
    ref = first_and_second(math_attention, q, k, v)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(ours[1] + ours[2], ref[1] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_equals_unchunked():
    q, k, v = qkv(b=2, heads=2, lq=11, lk=7, d=4)
    one = first_and_second(lambda *x: DoubleBackwardAttention.apply(*x, 11), q, k, v)
    for chunk in (1, 3, 5):
        many = first_and_second(lambda *x: DoubleBackwardAttention.apply(*x, chunk), q, k, v)
        for a, b in zip(one[1] + one[2], many[1] + many[2]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_attention_switches_path_only_inside_double_backward_with_grad(monkeypatch):
    monkeypatch.setattr(ops, "MATH_MAX_KEYS", 4)
    q, k, v = qkv()
    assert ops.attention(q, k, v).grad_fn.name() != "DoubleBackwardAttentionBackward"
    with ops.double_backward():
        assert ops.double_backward_enabled()
        assert ops.attention(q, k, v).grad_fn.name() == "DoubleBackwardAttentionBackward"
        with torch.no_grad():
            torch.testing.assert_close(ops.attention(q, k, v), math_attention(q, k, v))
    assert not ops.double_backward_enabled()
    with ops.double_backward():  # few keys (text tokens): the math path, cheaper there
        out = ops.attention(q, k[..., :4, :], v[..., :4, :])
        assert out.grad_fn.name() != "DoubleBackwardAttentionBackward"
    # The default path is plain SDPA, which has no double backward on CPU: the reason for the switch.
    torch.testing.assert_close(ops.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


class TwoLayers(torch.nn.Module):
    """Self-attention then cross-attention, with projections: a UNet-free stand-in for a block."""

    def __init__(self, dim=8, ctx_dim=6, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv1 = torch.nn.Linear(dim, 3 * dim)
        self.q2, self.kv2 = torch.nn.Linear(dim, dim), torch.nn.Linear(ctx_dim, 2 * dim)

    def split(self, x):  # [B, L, heads*d] -> [B, heads, L, d]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, ctx, attn):
        q, k, v = (self.split(t) for t in self.qkv1(x).chunk(3, dim=-1))
        x = x + attn(q, k, v).transpose(1, 2).flatten(2)
        k, v = (self.split(t) for t in self.kv2(ctx).chunk(2, dim=-1))
        return x + attn(self.split(self.q2(x)), k, v).transpose(1, 2).flatten(2)


def test_double_backward_through_two_stacked_layers_matches_math_path(monkeypatch):
    """The regularizer's pattern: ||d(out . u)/d x|| in the loss, trained by parameter gradients."""
    monkeypatch.setattr(ops, "MATH_MAX_KEYS", 0)  # both layers through DoubleBackwardAttention
    torch.manual_seed(0)
    model = TwoLayers().double()
    x0 = torch.randn(2, 10, 8, dtype=torch.float64)
    ctx = torch.randn(2, 4, 6, dtype=torch.float64)
    u = torch.randn(2, 10, 8, dtype=torch.float64)

    def param_grads(attn):
        x = x0.clone().requires_grad_()
        out = model(x, ctx, attn)
        (vjp,) = torch.autograd.grad((out * u).sum(), x, create_graph=True)  # like Eq. 10
        loss = (vjp.flatten(1).norm(dim=1) - 1).pow(2).mean() + out.pow(2).mean()  # like Eq. 9 + 14
        return torch.autograd.grad(loss, list(model.parameters()))

    def ours(q, k, v):
        with ops.double_backward():
            return ops.attention(q, k, v, chunk=3)

    for a, b in zip(param_grads(ours), param_grads(math_attention)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_half_precision_inputs_run_and_stay_close_to_float32():
    q, k, v = (x.detach().float() for x in qkv(lq=16, lk=16, d=8))
    ref = first_and_second(lambda *x: DoubleBackwardAttention.apply(*x, 5),
                           *(x.requires_grad_() for x in (q, k, v)))
    half = first_and_second(lambda *x: DoubleBackwardAttention.apply(*x, 5),
                            *(x.bfloat16().requires_grad_() for x in (q, k, v)))
    for a, b in zip(half[1] + half[2], ref[1] + ref[2]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.1 * b.abs().max().item())


# ------------------------------------------------------------------------------------ convolutions

CONV_CASES = [  # (in, out, kernel, stride, padding, side): 3x3, 1x1, strided with even and odd sides
    (3, 4, 3, 1, 1, 5), (3, 4, 1, 1, 0, 4), (2, 3, 3, 2, 1, 6), (2, 3, 3, 2, 1, 7), (2, 2, 3, 2, 0, 7)]


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, side", CONV_CASES)
@pytest.mark.parametrize("trained_weight", [False, True])
def test_conv_gradcheck_and_gradgradcheck(c_in, c_out, kernel, stride, padding, side, trained_weight):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, side, side, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=trained_weight)
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=trained_weight)
    f = lambda x, w, b: ops.DoubleBackwardConv2d.apply(x, w, b, (stride, stride), (padding, padding))
    torch.testing.assert_close(f(x, w, b), F.conv2d(x, w, b, stride, padding))
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_conv_double_backward_equals_pytorchs_on_the_regularizer_pattern():
    """grad of ||grad_x <conv(x), u>|| w.r.t. a trained weight upstream, as Eq. 10 needs, both ways."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    w1 = torch.randn(4, 3, 3, 3, generator=g, requires_grad=True)  # trained, like a LoRA upstream
    w2 = torch.randn(4, 4, 3, 3, generator=g)  # frozen
    u = torch.randn(2, 4, 4, 4, generator=g)

    def penalty(double_backward):
        with ops.double_backward(double_backward):
            h = ops.conv2d(x, w1, None, (1, 1), (1, 1)).tanh()
            y = ops.conv2d(h, w2, None, (2, 2), (1, 1))
        (grad_x,) = torch.autograd.grad((y * u).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.norm(), w1)[0]

    torch.testing.assert_close(penalty(True), penalty(False), rtol=1e-5, atol=1e-6)


def test_unet_conv_switches_path_only_inside_double_backward(monkeypatch):
    from unet import Conv2d
    conv, calls = Conv2d(2, 3, 3, padding=1), []
    monkeypatch.setattr(ops.DoubleBackwardConv2d, "apply",
                        lambda *a: calls.append(1) or F.conv2d(*a[:3], a[3], a[4]))
    x = torch.randn(1, 2, 4, 4)
    conv(x)
    with ops.double_backward(), torch.no_grad():
        conv(x)
    assert calls == []
    with ops.double_backward():
        out = conv(x)
    assert calls == [1]
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, 1, 1))


# ------------------------------------------------------------------------------- under autocast (bf16)
# bf16 keeps 8 significant bits: one rounding is off by at most u = 2^-8 (half of finfo.eps = 2^-7).
# The second derivatives pass through about four bf16 roundings (inputs, P, dS, the first
# gradient), so we allow 4u in norm-relative error against float64, for ours AND for the math path
# (the oracle meets the same bound: it is bf16's, not slack for ours).
# Measured: ours <= 2.6u, math path <= 3.1u.
BF16_U = torch.finfo(torch.bfloat16).eps / 2


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def attention_derivatives(fn, q, k, v, autocast):
    """[out, first derivatives, second derivatives] of `first_and_second`'s pattern, w and u drawn in
    float64 whatever the dtype (so every run sees the same directions), the ops under bf16 autocast."""
    g = torch.Generator().manual_seed(1)
    with torch.autocast(q.device.type, dtype=torch.bfloat16, enabled=autocast), ops.double_backward():
        out = fn(q, k, v)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(q)
    grads = torch.autograd.grad((out.to(q.dtype) * w).sum(), (q, k, v), create_graph=True)
    u = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(q) for x in grads]
    second = torch.autograd.grad(sum(((x * ui).sum()) ** 2 for x, ui in zip(grads, u)), (q, k, v))
    return [out, *grads, *second]


@pytest.mark.parametrize("length, d", [(160, 16), (300, 40)])  # > MATH_MAX_KEYS: the fused path
def test_attention_under_bf16_autocast_matches_the_math_path_within_bf16_rounding(length, d):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    exact = attention_derivatives(math_attention, *(x.clone().requires_grad_() for x in (q, k, v)), False)
    ours = attention_derivatives(ops.attention, *(x.float().requires_grad_() for x in (q, k, v)), True)
    math_path = attention_derivatives(math_attention, *(x.float().requires_grad_() for x in (q, k, v)), True)
    assert ours[0].dtype == torch.bfloat16  # computed in autocast's dtype, as SDPA would be
    for a, m, e in zip(ours, math_path, exact):
        assert torch.isfinite(a).all()
        assert relative_error(a, e) < 4 * BF16_U
        assert relative_error(m, e) < 4 * BF16_U


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])  # trained fp32 / frozen bf16
def test_conv_under_bf16_autocast_double_backward_equals_pytorchs(weight_dtype):
    """The regularizer's pattern with fp32 inputs and mixed weights under autocast (the training setup).
    Without the casts in `_under_autocast` the backward fails on mixed dtypes."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 8, 12, 12, generator=g, dtype=torch.float64)
    w1_0 = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64) / 8  # trained, upstream
    w2_0 = torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64) / 12
    u = torch.randn(2, 16, 6, 6, generator=g, dtype=torch.float64)

    def derivatives(double_backward, dtype, autocast):
        x, w1 = x0.to(dtype).requires_grad_(), w1_0.to(dtype).requires_grad_()
        w2 = w2_0.to(weight_dtype if autocast else dtype)
        with ops.double_backward(double_backward), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            h = ops.conv2d(x, w1, None, (1, 1), (1, 1)).tanh()
            y = ops.conv2d(h, w2, None, (2, 2), (1, 1))
        (grad_x,) = torch.autograd.grad((y.to(dtype) * u.to(dtype)).sum(), x, create_graph=True)
        return grad_x, torch.autograd.grad(grad_x.norm(), w1)[0]

    exact = derivatives(False, torch.float64, autocast=False)
    ours = derivatives(True, torch.float32, autocast=True)
    pytorchs = derivatives(False, torch.float32, autocast=True)
    for a, p, e in zip(ours, pytorchs, exact):
        assert a.dtype == torch.float32  # gradients come back in the inputs' dtype
        torch.testing.assert_close(a, p, rtol=1e-3, atol=1e-3 * p.abs().max().item())
        assert relative_error(a, e) < 4 * BF16_U
