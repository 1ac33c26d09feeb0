"""The toy world's tiny Stable Diffusion, trained from scratch: `python -m toy pretrain`.

A VAE (32 x 32 -> 4 x 8 x 8), a CLIP text encoder with a BPE tokenizer over the toy vocabulary and a
UNet with SD-1.x's topology on SD's scaled_linear schedule, saved in the diffusers layout in
`assets/toy-sd/` (so checkpoint.load_models reads it like SD-1.5's folder), then the attribute
classifier (toy/instruments.py) and the held-out prompts.

    python -m toy pretrain    # VAE, then UNet + text encoder, then the classifier (CPU, ~40 min)
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from toy import instruments
from toy.world import (HELDOUT_PROMPTS, MODEL_DIR, RESOLUTION, WORDS, caption, heldout_prompts, make_images,
                       train_classifier)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(folder, words):
    """Write `vocab.json` + `merges.txt` for a CLIP BPE tokenizer that knows exactly `words`.

    CLIP's BPE marks a word's last symbol with `</w>`; every letter is in the vocabulary (alone and
    word-final) and each word is built by left-to-right merges, so `CLIPTokenizer` reads these
    files exactly like SD-1.5's tokenizer folder, and unknown words still tokenize letter by letter.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.-'") | set("".join(words)))
    vocab = {}
    for symbol in letters + [c + "</w>" for c in letters]:
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


# ----------------------------------------------------------------------------------- the tiny SD-1.x
# Diffusers' config names, so the folder loads like SD-1.5's (checkpoint.load_models).

VAE_CONFIG = dict(  # 32 x 32 x 3 -> 8 x 8 x 4: two downsamplings instead of SD's three
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8, sample_size=RESOLUTION, scaling_factor=1.0)  # scaling_factor: set after training
UNET_CONFIG = dict(  # SD-1.x topology: cross-attention in every level but the lowest, and in the middle
    sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16)  # attention_head_dim = 4 heads (SD-1.x quirk)
# CLIP's text tower, 64 wide, 77 positions as in SD, with NO transformer layer: each token's output is its
# embedding plus its position's (then the final layer norm). With causal self-attention, the 68 padding
# tokens after a caption each encode the whole caption, and they hold most of the UNet's cross-attention:
# a base with 2 layers drew every training caption right but the wrong shape for a third of the held-out
# ones (an unseen shape-colour-background triple). Without layers the caption's words stay separate keys.
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=0, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclass
class PretrainConfig:
    seed: int = 0
    images: int = 20_000  # training images, drawn once (seed) from the training triples
    vae_steps: int = 2500  # 1200 steps left small triangles as blobs (shape read right in 61% of VAE recons)
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # on the mean KL per latent element, against the mean squared error per pixel
    unet_steps: int = 3500  # (with EMA 0.999 a 1000-step base was still blurry: shape right in 2/3 of samples)
    unet_batch: int = 128
    unet_lr: float = 1e-3  # UNet and text encoder, AdamW, linear warm-up then cosine decay to 10%
    warmup: int = 100
    caption_dropout: float = 0.1  # empty prompt instead of the caption: the unconditional model of CFG
    ema_decay: float = 0.999  # the saved UNet and text encoder are the exponential moving average


def _lr(step, total, peak, warmup):
    """Linear warm-up, then cosine decay from peak to peak / 10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(n, batch, steps, seed):
    """`steps` index batches of size `batch`, epoch after epoch of seeded permutations of range(n)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield order[:batch]
        order = order[batch:]


def to_pixels(images_uint8):
    """uint8 [N, H, W, 3] (numpy or tensor) -> float [N, 3, H, W] in [-1, 1] (the VAE's input)."""
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def train_vae(images, cfg):
    """The VAE on the training images: MSE reconstruction + a small KL term (SD's VAE adds perceptual and
    GAN losses, which flat shapes do not need). Returns the VAE with its scaling_factor set so that the
    scaled latents of the training set have unit standard deviation (SD-1.5's 0.18215 does the same)."""
    from checkpoint import vae_from_config

    torch.manual_seed(cfg.seed)
    vae = vae_from_config(VAE_CONFIG).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(enumerate(_batches(len(images), cfg.vae_batch, cfg.vae_steps, cfg.seed)), total=cfg.vae_steps,
               desc="VAE")
    for step, idx in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        x = to_pixels(images[idx])
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        recon = F.mse_loss(vae.decode(z), x)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = recon + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{recon.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    mean, _ = encode_all(vae, images[:2000])
    scaled = vae_from_config({**VAE_CONFIG, "scaling_factor": round(1 / mean.std().item(), 5)})
    scaled.load_state_dict(vae.state_dict())
    return scaled.eval()


@torch.no_grad()
def encode_all(vae, images, batch=500):
    """Posterior (mean, logvar) of uint8 images, unscaled, in batches."""
    out = [vae.encode(to_pixels(images[i:i + batch])) for i in range(0, len(images), batch)]
    return torch.cat([m for m, _ in out]), torch.cat([v for _, v in out])


def make_tokenizer(folder):
    """SD's CLIPTokenizer over the toy vocabulary (vocab.json + merges.txt written to folder)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, WORDS), model_max_length=77)


def tokenize(tokenizer, prompts):
    """Token ids [B, 77], padded with the end token as SD does (checkpoint.Models.encode_prompt)."""
    return tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


def train_denoiser(vae, images, captions, tokenizer, cfg):
    """UNet and CLIP text encoder, jointly from scratch, on the VAE's latents: SD's objective
    ||eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, text)||^2 with t ~ U{0..999} on SD's
    scaled_linear schedule, and 10% empty captions so that classifier-free guidance works.
    Returns the exponential moving averages of both."""
    import copy

    from transformers import CLIPTextConfig, CLIPTextModel

    import sampler
    from checkpoint import unet_from_config

    torch.manual_seed(cfg.seed)
    unet = unet_from_config(UNET_CONFIG).train()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)).train()
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in (unet, text_encoder)]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    alphas_cumprod = sampler.make_schedule(sampler.SD15_SCHEDULER).alphas_cumprod
    mean, logvar = encode_all(vae, images)
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])
    g = torch.Generator().manual_seed(cfg.seed + 2)
    bar = tqdm(enumerate(_batches(len(images), cfg.unet_batch, cfg.unet_steps, cfg.seed + 3)),
               total=cfg.unet_steps, desc="UNet + text encoder")
    for step, idx in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
        B = len(idx)
        z0 = (mean[idx] + (0.5 * logvar[idx]).exp() * torch.randn(mean[idx].shape, generator=g)) * vae.scaling_factor
        drop = torch.rand(B, generator=g) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty, ids[idx])
        t = torch.randint(0, 1000, (B,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        abar = alphas_cumprod[t].view(B, 1, 1, 1)
        x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps  # Eq. 2
        loss = F.mse_loss(unet(x_t, t, text_encoder(tokens).last_hidden_state), eps)  # the first term of Eq. 14
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, avg in zip((unet, text_encoder), ema):
                for p, q in zip(model.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def pretrain(out=MODEL_DIR, cfg=None):
    """Train the tiny SD from scratch and write it (diffusers layout), the classifier and the prompts."""
    import checkpoint

    cfg = cfg or PretrainConfig()
    out, t0 = Path(out), time.time()
    images, attributes = make_images(cfg.images, cfg.seed)
    vae = train_vae(images, cfg)
    tokenizer = make_tokenizer(out / "tokenizer")
    unet, text_encoder = train_denoiser(vae, images, [caption(a) for a in attributes], tokenizer, cfg)
    scheduler = {k: v for k, v in checkpoint.SD15_SCHEDULER.items() if k != "_class_name"}
    checkpoint.save_models(checkpoint.Models(unet, vae, text_encoder, tokenizer, scheduler), out)
    # SD-1.5's tokenizer/ holds vocab.json + merges.txt; transformers 5 saves tokenizer.json instead.
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_clip_tokenizer(out / "tokenizer", WORDS)
    (out / "pretrain_config.json").write_text(json.dumps(vars(cfg), indent=2))
    instruments.save_classifier(train_classifier(cfg.seed))
    HELDOUT_PROMPTS.write_text("\n".join(heldout_prompts()) + "\n")
    print(f"pretrained in {time.time() - t0:.0f} s: {out}, {instruments.CLASSIFIER_PATH}, {HELDOUT_PROMPTS}")
