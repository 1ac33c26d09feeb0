"""The Stable Diffusion 1.x conditional UNet (eps-prediction network), in plain PyTorch.

Architecture and parameter names are those of diffusers' `UNet2DConditionModel`, so a diffusers
`unet/diffusion_pytorch_model.safetensors` loads with `load_state_dict(strict=True)`. The paper
(Smooth Diffusion, Sec. 3-4) fine-tunes this network with LoRA; the regularizer (Eq. 9/10) needs a
gradient of its gradient, so attention and convolutions go through `ops.py` (fused forward, a
backward that can be differentiated cheaply) and gradient checkpointing keeps that working.

    unet = UNet()                                   # SD-1.5, random weights
    unet = checkpoint.unet_from_config(config_json)  # from a diffusers config dict (key policy there)
    eps = unet(latents, t, text_embeddings)         # [B,4,H,W], int/0-d/[B] t, [B,77,768]

Tests: `pytest tests/test_unet.py` (parity with diffusers on tiny configs, SD-1.5 names on `meta`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import ops


# ----------------------------------------------------------------------------- config

@dataclass
class UNetConfig:
    sample_size: int = 64  # latent side the model was trained at (64 -> 512 px images)
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # eps channels out
    block_out_channels: tuple = (320, 640, 1280, 1280)  # channels per resolution level
    layers_per_block: int = 2  # resnets per down block (up blocks have one more)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"  # the only mid block implemented
    attention_head_dim: int | tuple = 8  # diffusers' misnomer: NUMBER of heads, see `num_heads`
    cross_attention_dim: int = 768  # width of the text embeddings (CLIP ViT-L/14)
    norm_num_groups: int = 32  # GroupNorm groups in resnets and transformers
    norm_eps: float = 1e-5  # GroupNorm eps in resnets and the output norm
    flip_sin_to_cos: bool = True  # time embedding is [cos, sin] (CompVis order)
    freq_shift: int = 0  # frequency k/(half - freq_shift) in the sinusoid
    act_fn: str = "silu"  # only SiLU is implemented
    downsample_padding: int = 1  # padding of the stride-2 downsampling conv
    mid_block_scale_factor: float = 1.0  # mid-block resnet outputs are divided by this


def num_heads(config, level):
    """Number of attention heads at resolution `level` (-1: the mid block).

    diffusers' SD-1.x config calls this `attention_head_dim`, but UNet2DConditionModel uses it as the
    number of heads (head width = channels / heads: 40, 80, 160 in SD-1.5). This is the one place
    that quirk is handled.
    """
    heads = config.attention_head_dim
    return heads[level] if isinstance(heads, (tuple, list)) else heads


# ----------------------------------------------------------------------------- building blocks

def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding of timesteps t [B] -> [B, dim] (DDPM / Transformer positional encoding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))  # [half]
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters) whose double backward is cheap: see `ops.conv2d`."""

    def forward(self, x):
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + shortcut. temb_channels=None: no time input (VAE)."""

    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-5,
                 output_scale_factor=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention on [B, L, C] tokens; context=None is self-attention.

    Key/value come from `context` (width cross_attention_dim) when given. Names match diffusers'
    `Attention`: to_q, to_k, to_v, to_out.0 (to_out.1 is diffusers' dropout, parameter-free).
    """

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, bias=False, out_bias=True):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        B, L, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # [B, L(q or kv), heads*d]
        q, k, v = (t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (q, k, v))  # [B, heads, L, d]
        out = ops.attention(q, k, v).transpose(1, 2).reshape(B, L, -1)  # [B, L, heads*d]
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # diffusers' order: value first, gate second
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> 1x1 conv -> tokens -> one BasicTransformerBlock -> 1x1 conv, plus the input."""

    def __init__(self, channels, heads, cross_attention_dim, groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Conv2d(channels, channels, 1)  # conv, since use_linear_projection is false
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim)])
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, HW, C]
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # [B, C, H, W]
        return self.proj_out(h) + x


class Downsample2D(nn.Module):
    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the VAE's asymmetric padding: one row/column at the bottom/right
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # nearest x2, or to the skip's size when a side was odd on the way down
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class UNetBlock(nn.Module):
    """One resolution level: resnets, each optionally followed by a transformer, then a resampler.

    Covers CrossAttnDownBlock2D / DownBlock2D / CrossAttnUpBlock2D / UpBlock2D: up blocks take
    `res_channels` (the channels of the skips they pop) and concatenate [hidden, skip] per resnet.
    """

    def __init__(self, in_ch, out_ch, n, temb, cfg, heads=None, up=False, res_channels=(), resample=False):
        super().__init__()
        ins = [(in_ch if j == 0 else out_ch) + (res_channels[j] if up else 0) for j in range(n)]
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_ch, temb, **kw) for c in ins])
        if heads:
            self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, cfg.cross_attention_dim,
                                                                cfg.norm_num_groups) for _ in range(n)])
        if resample and up:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])
        elif resample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)])


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, ch, temb, heads, cfg):
        super().__init__()
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor)
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, cfg.cross_attention_dim, cfg.norm_num_groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, **kw) for _ in range(2)])


# ----------------------------------------------------------------------------- the UNet

class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        chs, n = cfg.block_out_channels, cfg.layers_per_block
        if len(cfg.down_block_types) != len(chs) or len(cfg.up_block_types) != len(chs):
            raise ValueError(f"down_block_types, up_block_types and block_out_channels need one entry per "
                             f"level; got {len(cfg.down_block_types)}, {len(cfg.up_block_types)}, {len(chs)}")
        temb = chs[0] * 4
        self.conv_in = Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb)

        self.down_blocks = nn.ModuleList()
        skip_channels = [chs[0]]  # channels of every tensor pushed on the skip stack, in order
        for i, kind in enumerate(cfg.down_block_types):
            last = i == len(chs) - 1
            heads = num_heads(cfg, i) if kind.startswith("CrossAttn") else None
            self.down_blocks.append(UNetBlock(chs[max(i - 1, 0)], chs[i], n, temb, cfg, heads, resample=not last))
            skip_channels += [chs[i]] * (n + (not last))

        self.mid_block = UNetMidBlock2DCrossAttn(chs[-1], temb, num_heads(cfg, -1), cfg)

        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for i, kind in enumerate(cfg.up_block_types):
            level = len(chs) - 1 - i
            heads = num_heads(cfg, level) if kind.startswith("CrossAttn") else None
            res = [skip_channels.pop() for _ in range(n + 1)]
            self.up_blocks.append(UNetBlock(prev, chs[level], n + 1, temb, cfg, heads, up=True,
                                            res_channels=res, resample=level > 0))
            prev = chs[level]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(chs[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self, enabled=True):
        """Recompute resnet/transformer activations in backward (training only); double-backward safe."""
        self.gradient_checkpointing = enabled

    def _run(self, module, *args):
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return module(*args)
        # Non-reentrant checkpointing supports autograd.grad and double backward. The recomputation
        # happens during backward, possibly outside `ops.double_backward()`, so carry the flag.
        flag = ops.double_backward_enabled()

        def recompute(*a):
            with ops.double_backward(flag):
                return module(*a)
        return checkpoint(recompute, *args, use_reentrant=False)

    def forward(self, sample, timestep, encoder_hidden_states):
        """sample [B, C, H, W] noisy latents, timestep int / 0-d / [B], text [B, L, D] -> eps [B, C, H, W]."""
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t  # [B]
        if t.shape != (B,):
            raise ValueError(f"timestep must be a number or have shape [{B}] (the batch); got {tuple(t.shape)}")
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(sample.dtype)
        temb = self.time_embedding(t_emb)  # [B, 4 * C0]
        ctx = encoder_hidden_states

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, temb)
                if hasattr(block, "attentions"):
                    h = self._run(block.attentions[j], h, ctx)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)

        mid = self.mid_block
        h = self._run(mid.resnets[0], h, temb)
        h = self._run(mid.attentions[0], h, ctx)
        h = self._run(mid.resnets[1], h, temb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)  # [B, C + C_skip, H, W]
                h = self._run(resnet, h, temb)
                if hasattr(block, "attentions"):
                    h = self._run(block.attentions[j], h, ctx)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h, skips[-1].shape[-2:])

        return self.conv_out(F.silu(self.conv_norm_out(h)))
