"""Scaled dot-product attention for the UNet and the VAE, with a switch for double backward.

The regularizer (Eq. 9/10, `regularizer.py`) differentiates the gradient of the UNet's output, so
every op in the forward pass needs a differentiable backward. PyTorch's fused SDPA kernels (flash,
memory-efficient, and the CPU flash kernel) do not have one. Code that will double-backward runs its
forward inside `with double_backward():`, and attention then takes a path autograd can differentiate
twice.
"""
import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F

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


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in plain ops; q, k, v: [B, heads, L, d]."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, heads, Lq, Lk]
    return scores.softmax(dim=-1) @ v  # [B, heads, Lq, d]


def attention(q, k, v):
    """Multi-head attention on [B, heads, L, d] tensors (no mask, no dropout: SD uses neither)."""
    if _double_backward.get() and torch.is_grad_enabled():
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
