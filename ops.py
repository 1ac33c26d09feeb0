"""Attention and convolution for the UNet and the VAE, with a cheap double backward.

The regularizer (Eq. 9/10, `regularizer.py`) differentiates the gradient of the UNet's output, so
every op in the forward pass needs a differentiable backward. PyTorch's fused SDPA kernels (flash,
memory-efficient, and the CPU flash kernel) do not have one, and the plain-ops fallback
(`math_attention`) keeps the full [B, heads, Lq, Lk] probability matrix, several times over once
the backward itself is recorded. Code that will double-backward runs its forward inside
`with double_backward():`, and attention then goes through `DoubleBackwardAttention`:

- forward: fused SDPA; saves only q, k, v and the output (O(L d) memory, no L x L matrix);
- backward: `AttentionBackward`, the FlashAttention gradient recomputed in query chunks
      P = softmax(scale q k^T),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
      dQ = scale dS K,  dK = scale dS^T Q;
  it is itself an autograd Function, saving only q, k, v, O, dO;
- double backward: the derivative of those five formulas, again chunked over queries, so the
  memory of one attention layer is O(chunk x Lk) at any time instead of O(Lq x Lk) per layer;
- a last, first-order backward (the one that trains the weights) uses the fused SDPA backward.
Cross-attention to a few keys (77 text tokens) keeps the math path: its matrix is small, and there
the math path is faster.

Convolutions get the same treatment (`conv2d`, `DoubleBackwardConv2d`): PyTorch can differentiate its
convolution backward, but does needless work there; ours writes the backward with ordinary ops.

Under autocast (mixed precision, CPU bf16 or CUDA bf16/fp16) both Functions compute in autocast's
dtype, as the ops they replace would: `_under_autocast` casts their inputs before `apply`.

`python -m pytest -q tests/test_ops.py` checks both derivatives of both ops against autograd's
(float64 gradcheck / gradgradcheck).
"""
import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Queries per chunk of the recomputed softmax. Measured on CPU (1 thread; forward + create_graph
# backward + backward): [1, 8, 4096, 4096, d 40]: math path 20.1 s / 6.0 GB peak RSS; chunk 256
# 11.5 s / 0.63 GB, 512 9.6 s / 0.88 GB, 1024 9.4 s / 1.32 GB, 2048 11.4 s / 2.2 GB.
CHUNK = 512
# Up to this many keys (cross-attention to 77 text tokens) the [Lq, Lk] matrix is about the size
# of q, k and v, and the math path is faster (0.28 s vs 0.38 s at [2, 8, 4096, 77, 40]): use it there.
MATH_MAX_KEYS = 128

# Fused CPU attention with its logsumexp, and its backward (private ops; absent -> recompute).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

_double_backward = contextvars.ContextVar("double_backward", default=False)


@contextlib.contextmanager
def double_backward(enabled: bool = True):
    """Inside this block, attention is computed so that its gradient can be differentiated again."""
    token = _double_backward.set(enabled)
    try:
        yield
    finally:
        _double_backward.reset(token)


def double_backward_enabled() -> bool:
    return _double_backward.get()


def _under_autocast(fn, *tensors):
    """fn(*tensors) for an autograd Function's `apply`, the floating-point tensors in autocast's dtype.

    Autocast casts the inputs of each op it dispatches, so a Function's forward computes in its dtype;
    but the backward runs where autocast is off (loss.backward() after the autocast block, CUDA's
    backward thread) on the saved tensors in their own dtypes (fp32 input, bf16 or fp32 weight), and
    conv_transpose2d(bf16 gradient, fp32 weight) fails there. So cast once, here, and run `apply` with
    autocast off: forward, backward and double backward then see one dtype, on CPU and CUDA alike;
    autograd casts each gradient back to its input's dtype (an fp32 LoRA weight gets an fp32 gradient).
    """
    device = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):  # e.g. meta
        return fn(*tensors)
    dtype = torch.get_autocast_dtype(device)
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]
    with torch.autocast(device, enabled=False):
        return fn(*cast)


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in plain ops; q, k, v: [B, heads, L, d]."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, heads, Lq, Lk]
    return scores.softmax(dim=-1) @ v  # [B, heads, Lq, d]


def _probs(q, k, scale):
    """softmax(scale q k^T) for a chunk of queries, the softmax in float32 for half inputs."""
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1, dtype=dtype).to(q.dtype)


def _chunks(length, chunk):
    return [slice(i, min(i + chunk, length)) for i in range(0, length, chunk)]


class DoubleBackwardAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v: forward by fused SDPA, a chunked backward that is itself differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, chunk):
        if q.device.type == "cpu" and _CPU_FLASH is not None and v.shape[-1] == q.shape[-1]:
            # The CPU flash kernel also returns the row logsumexp, which its fused backward needs.
            out, lse = _CPU_FLASH(q, k, v)
        else:
            out, lse = F.scaled_dot_product_attention(q, k, v), None
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient will be differentiated again
            dq, dk, dv = AttentionBackward.apply(q, k, v, out, grad_out, ctx.chunk)
        elif lse is not None:  # a last, first-order backward: the fused kernel is ~4x faster
            dq, dk, dv = _CPU_FLASH_BACKWARD(grad_out.contiguous(), q, k, v, out, lse, 0.0, False)
        else:  # recompute the fused forward to get its fused backward
            with torch.enable_grad():
                qkv = [x.detach().requires_grad_() for x in (q, k, v)]
                dq, dk, dv = torch.autograd.grad(F.scaled_dot_product_attention(*qkv), qkv, grad_out)
        return dq, dk, dv, None


class AttentionBackward(torch.autograd.Function):
    """(q, k, v, O, dO) -> (dQ, dK, dV) of attention, and its own derivative, chunked over queries."""

    @staticmethod
    def forward(ctx, q, k, v, out, grad_out, chunk):
        ctx.save_for_backward(q, k, v, out, grad_out)
        ctx.chunk = chunk
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # In-place ops and the scale moved onto the [chunk, d] side: the [chunk, Lk] passes dominate.
        for c in _chunks(q.shape[-2], chunk):
            qc, do = q[..., c, :], grad_out[..., c, :]
            p = _probs(qc, k, scale)  # [B, heads, chunk, Lk]
            dv += p.transpose(-2, -1) @ do  # dV = P^T dO
            ds = (do @ v.transpose(-2, -1))  # dP = dO V^T
            ds.sub_((do * out[..., c, :]).sum(-1, keepdim=True)).mul_(p)  # dS = P (dP - rowsum(dO O))
            dq[..., c, :] = ds @ (k * scale)  # dQ = scale dS K
            dk += ds.transpose(-2, -1) @ (qc * scale)  # dK = scale dS^T Q
        return dq, dk, dv

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dq, g_dk, g_dv):
        """Chain rule through the five formulas of `forward`, in reverse, for one chunk at a time.

        g_X is the incoming gradient of the output X; G_Y is the gradient flowing into Y.
        """
        q, k, v, out, grad_out = ctx.saved_tensors
        scale = 1.0 / math.sqrt(q.shape[-1])
        zeros = torch.zeros_like
        g_dq = zeros(q) if g_dq is None else g_dq
        g_dk = zeros(k) if g_dk is None else g_dk
        g_dv = zeros(v) if g_dv is None else g_dv
        G_q, G_k, G_v = torch.empty_like(q), zeros(k), zeros(v)
        G_out, G_do = torch.empty_like(out), torch.empty_like(grad_out)
        k_s, g_dk_s = k * scale, g_dk * scale
        for c in _chunks(q.shape[-2], ctx.chunk):
            qc, do, oc = q[..., c, :], grad_out[..., c, :], out[..., c, :]
            qc_s, gq_s = qc * scale, g_dq[..., c, :] * scale
            p = _probs(qc, k, scale)  # recomputed, [B, heads, chunk, Lk]
            delta = (do * oc).sum(-1, keepdim=True)
            dp_delta = (do @ v.transpose(-2, -1)).sub_(delta)  # dP - delta
            ds = p * dp_delta
            # dQ = scale dS K and dK = scale dS^T Q
            G_ds = (gq_s @ k.transpose(-2, -1)).add_(qc @ g_dk_s.transpose(-2, -1))
            G_qc = ds @ g_dk_s
            G_k += ds.transpose(-2, -1) @ gq_s
            # dV = P^T dO
            G_p = (do @ g_dv.transpose(-2, -1)).addcmul_(G_ds, dp_delta)  # ... and dS = P (dP - delta)
            G_dp = G_ds.mul_(p)
            G_delta = -G_dp.sum(-1, keepdim=True)
            # dP = dO V^T and delta = rowsum(dO O)
            G_do[..., c, :] = p @ g_dv + G_dp @ v + G_delta * oc
            G_v += G_dp.transpose(-2, -1) @ do
            G_out[..., c, :] = G_delta * do
            # P = softmax(scale q k^T): G_S = P (G_P - rowsum(G_P P))
            G_s = G_p.sub_((G_p * p).sum(-1, keepdim=True)).mul_(p)
            G_q[..., c, :] = G_qc + G_s @ k_s
            G_k += G_s.transpose(-2, -1) @ qc_s
        return G_q, G_k, G_v, G_out, G_do, None


def attention(q, k, v, chunk=None):
    """Multi-head attention on [B, heads, L, d] tensors (no mask, no dropout: SD uses neither).

    Inside `double_backward()` with grad enabled, the result can be differentiated twice at the
    memory cost of fused attention (see the module docstring); otherwise it is plain fused SDPA.
    """
    if _double_backward.get() and torch.is_grad_enabled():
        if k.shape[-2] <= MATH_MAX_KEYS:
            return math_attention(q, k, v)
        return _under_autocast(DoubleBackwardAttention.apply, q, k, v, chunk or CHUNK)
    return F.scaled_dot_product_attention(q, k, v)


# ------------------------------------------------------------------------------------ convolutions

class DoubleBackwardConv2d(torch.autograd.Function):
    """conv2d (dilation 1, groups 1) whose backward is written with ordinary ops.

    The input gradient is the transposed convolution of the output gradient with the weight: linear
    in it and independent of the input, so its own derivative is one ordinary convolution. PyTorch's
    derivative of its fused convolution backward (ConvolutionBackwardBackward0) also ran convolutions
    of weight-gradient shape for frozen weights: with it the SD-1.5 + LoRA regularized step (32x32,
    batch 1, 1 CPU thread) took 12.3 s against 3.9 s for a plain step; with this, 8.6 s.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # A strided convolution maps several input sizes to one output size: pad back to x's.
            extra = [x.shape[d] - ((grad_out.shape[d] - 1) * stride[d - 2] - 2 * padding[d - 2] + weight.shape[d])
                     for d in (2, 3)]
            grad_x = F.conv_transpose2d(grad_out, weight, None, stride, padding, extra)
        if ctx.needs_input_grad[1]:  # a trained convolution (full fine-tuning); differentiable too
            grad_weight = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, stride, padding)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0)):
    """F.conv2d; inside `double_backward()` with grad enabled, through `DoubleBackwardConv2d`."""
    if _double_backward.get() and torch.is_grad_enabled():
        return _under_autocast(DoubleBackwardConv2d.apply, x, weight, bias, tuple(stride), tuple(padding))
    return F.conv2d(x, weight, bias, stride, padding)
