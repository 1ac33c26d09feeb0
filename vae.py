"""The Stable Diffusion VAE (diffusers' AutoencoderKL): images in [-1, 1] <-> 4-channel latents.

Parameter names match diffusers' AutoencoderKL, so `vae/diffusion_pytorch_model.safetensors` loads
with strict=True. Blocks (ResnetBlock2D, Attention, Down/Upsample2D) are reused from `unet.py`.
Smooth Diffusion uses it to map images to latents for inversion and back (paper Sec. 4).

    vae = VAE()
    mean, logvar = vae.encode(images)                  # raw latent moments, [B, 4, H/8, W/8]
    images = vae.decode(mean)                           # [B, 3, H, W], roughly in [-1, 1]
    z = mean * vae.scaling_factor                       # what the UNet sees

Tests: `pytest tests/test_vae.py`.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import Attention, Downsample2D, ResnetBlock2D, Upsample2D

VAE_SCALE = 0.18215  # SD-1.x latent scaling factor (makes latents roughly unit variance)


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded image channels
    latent_channels: int = 4  # latent channels (the UNet's in_channels)
    block_out_channels: tuple = (128, 256, 512, 512)  # channels per level; 3 downsamplings -> /8
    layers_per_block: int = 2  # resnets per encoder block (decoder blocks have one more)
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4  # the only encoder block implemented
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4  # the only decoder block implemented
    norm_num_groups: int = 32  # GroupNorm groups (eps is fixed at 1e-6 in the VAE)
    act_fn: str = "silu"  # only SiLU is implemented
    sample_size: int = 512  # image side the VAE was trained at
    scaling_factor: float = VAE_SCALE  # latents for the UNet are mean * scaling_factor


EPS = 1e-6  # every GroupNorm in the VAE


class SpatialAttention(Attention):
    """Single-head self-attention over the H*W positions of a feature map, with its own GroupNorm."""

    def __init__(self, channels, groups):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        return super().forward(h).transpose(1, 2).reshape(B, C, H, W) + x


class MidBlock(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: n resnets, then an optional down/upsampler."""

    def __init__(self, in_ch, out_ch, n, groups, down=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups, EPS)
                                      for j in range(n)])
        if down is True:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)])  # asymmetric pad
        elif down is False:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for resample in getattr(self, "downsamplers", []) or getattr(self, "upsamplers", []):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        chs, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Block(chs[max(i - 1, 0)], chs[i], c.layers_per_block, g, down=True if i < len(chs) - 1 else None)
            for i in range(len(chs))])
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * c.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        chs, g = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList([
            Block(chs[max(i - 1, 0)], chs[i], c.layers_per_block + 1, g, down=False if i < len(chs) - 1 else None)
            for i in range(len(chs))])
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = c = config or VAEConfig()
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    def encode(self, images):
        """images [B, 3, H, W] in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)  # [B, 4, H/8, W/8] each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents):
        """raw (unscaled) latents [B, 4, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))
