"""Shared fixtures: tiny configs and a tiny random Stable Diffusion saved by diffusers (the oracle)."""
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tiny models: one thread is faster than two (and far faster on a shared machine).
torch.set_num_threads(1)

# Tiny configs in diffusers' own key names. SD-1.x layout: attention in every block but the last.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
    cross_attention_dim=32, norm_num_groups=8,
)
TINY_UNET_3LEVEL = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
)
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
TINY_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "circle", "square", "on", "background"]
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
    timestep_spacing="leading",
)


def perturb_(module, seed=0, scale=0.1):
    """Add noise to every parameter so that no zero-initialised weight hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def make_tiny_diffusers_sd(folder, seed=0):
    """Save a tiny random SD (UNet, VAE, CLIP text encoder, tokenizer, DDIM scheduler) with diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from toy import pretrain

    torch.manual_seed(seed)
    unet = perturb_(UNet2DConditionModel(**TINY_UNET), seed + 1)
    vae = perturb_(AutoencoderKL(**TINY_VAE), seed + 2, scale=0.02)
    tok_dir = pretrain.write_clip_tokenizer(Path(folder) / "_tok", TINY_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_CLIP))
    perturb_(text_encoder, seed + 3, scale=0.02)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # transformers 5 saves only tokenizer.json; SD-1.5's folder has vocab.json + merges.txt. Mimic it.
    import shutil
    (Path(folder) / "tokenizer" / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.move(tok_dir / name, Path(folder) / "tokenizer" / name)
    tok_dir.rmdir()
    return pipe


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """(folder, pipeline): a tiny random SD in the diffusers layout, and diffusers' pipeline for it."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe = make_tiny_diffusers_sd(folder)
    return folder, pipe


def wait_for_lines(path, n, proc, timeout=120):
    """Wait until the file at `path` has n lines while `proc` (a training run) is still running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not reach {n} lines")
