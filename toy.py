"""The toy world: a procedural captioned shapes data set and a tiny Stable Diffusion trained on it.

Smooth Diffusion is a fine-tune of SD-1.5, which cannot be downloaded here and needs a GPU. This module
ships a world small enough to run the whole method on a laptop CPU:

  * the data: 32 x 32 RGB images of one shape (circle, square, triangle) of one of six colours, small
    or large, jittered in position, size and tint, on a background of another colour, captioned
    "a small red circle on a blue background". Some (shape, colour, background) triples never appear
    in training: their captions are the held-out prompts (`assets/toy-heldout-prompts.txt`);
  * a tiny SD-1.x: VAE (32 x 32 -> 4 x 8 x 8), CLIP text encoder with a BPE tokenizer over the toy
    vocabulary, UNet with SD-1.x's topology, SD's scaled_linear schedule, trained from scratch by
    `python toy.py pretrain` and saved in the diffusers layout in `assets/toy-sd/`;
  * the hooks `train.py` uses with no arguments: `TRAIN_DEFAULTS`, `prepare_data`, `report`.

The quality proxies (an attribute classifier, caption accuracy, a Frechet distance) are in
`toy_metrics.py`.

    python toy.py pretrain    # VAE, then UNet + text encoder, then the classifier (CPU, ~25 min)
    python toy.py evaluate    # VAE reconstruction, classifier accuracy, caption accuracy of samples
    python toy.py data FOLDER # write toy images + captions (train.py's folder format)
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
MODEL_DIR = ASSETS / "toy-sd"
HELDOUT_PROMPTS = ASSETS / "toy-heldout-prompts.txt"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# ----------------------------------------------------------------------------------------- the data

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (50, 165, 70), "blue": (45, 90, 215),
           "yellow": (235, 205, 50), "purple": (145, 70, 185), "white": (240, 240, 240)}
SIZES = {"small": (4.0, 5.5), "large": (8.5, 11.0)}  # radius range in pixels (32 x 32 image)
TINT = 12  # each channel of a colour is jittered by up to this much
# (shape, colour, background) triples that never appear in training; each colour is held out twice as
# a shape colour and every word still occurs in training in other combinations.
HELDOUT = (("circle", "red", "blue"), ("circle", "yellow", "green"), ("circle", "white", "purple"),
           ("circle", "purple", "yellow"), ("square", "green", "red"), ("square", "blue", "white"),
           ("square", "purple", "green"), ("square", "yellow", "blue"), ("triangle", "red", "yellow"),
           ("triangle", "blue", "green"), ("triangle", "white", "red"), ("triangle", "green", "purple"))
WORDS = ["a", "on", "background", *SIZES, *COLOURS, *SHAPES]


def caption(a):
    """The caption of an attribute dict: "a small red circle on a blue background"."""
    return f"a {a['size']} {a['colour']} {a['shape']} on a {a['background']} background"


def triples(split):
    """The (shape, colour, background) triples of a split: "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    every = [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]
    return every if split == "all" else [t for t in every if (t in HELDOUT) == (split == "heldout")]


def heldout_prompts():
    """The captions never seen in training: each held-out triple, small and large (24 prompts)."""
    return [caption(dict(shape=s, colour=c, background=b, size=z)) for s, c, b in HELDOUT for z in SIZES]


def _outline(shape, cx, cy, r):
    """The shape's PIL outline (bounding box or polygon) around centre (cx, cy) with radius r."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":  # half side 0.88 r: about the circle's area
        h = 0.88 * r
        return [cx - h, cy - h, cx + h, cy + h]
    R = 1.2 * r  # equilateral triangle, pointing up, circumradius R; (cx, cy) is its centroid
    return [(cx + R * math.sin(a), cy - R * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]


def draw(a, supersample=4):
    """Render an attribute dict to a 32 x 32 RGB uint8 array (drawn 4x larger, box-filtered down)."""
    n, s = RESOLUTION * supersample, supersample
    image = Image.new("RGB", (n, n), tuple(a["background_rgb"]))
    pen = ImageDraw.Draw(image)
    outline = _outline(a["shape"], a["cx"] * s, a["cy"] * s, a["r"] * s)
    fill = tuple(a["colour_rgb"])
    if a["shape"] == "circle":
        pen.ellipse(outline, fill=fill)
    elif a["shape"] == "square":
        pen.rectangle(outline, fill=fill)
    else:
        pen.polygon(outline, fill=fill)
    return np.asarray(image.resize((RESOLUTION, RESOLUTION), Image.BOX))


def sample_attributes(rng, split="train"):
    """One random attribute dict of a split, drawn from a numpy Generator."""
    options = triples(split)
    shape, colour, background = options[rng.integers(len(options))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    r = float(rng.uniform(*SIZES[size]))
    margin = 1.2 * r + 1  # the triangle reaches furthest from its centre
    cx, cy = (float(v) for v in rng.uniform(margin, RESOLUTION - margin, size=2))
    tint = lambda name: [int(np.clip(v + rng.integers(-TINT, TINT + 1), 0, 255)) for v in COLOURS[name]]
    return dict(shape=shape, colour=colour, background=background, size=size, cx=cx, cy=cy, r=r,
                colour_rgb=tint(colour), background_rgb=tint(background))


def make_images(n, seed=0, split="train"):
    """n images of a split, deterministic from the seed: (uint8 [n, 32, 32, 3], list of attribute dicts)."""
    rng = np.random.default_rng(seed)
    attributes = [sample_attributes(rng, split) for _ in range(n)]
    return np.stack([draw(a) for a in attributes]), attributes


def prepare_data(folder, n=2000, seed=0, split="train"):
    """Write n images of a split as 00000.png + 00000.txt (the folder layout train.py reads).

    Nothing is written when the folder already holds images; returns the folder as a Path.
    """
    folder = Path(folder)
    if folder.is_dir() and any(folder.glob("*.png")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    images, attributes = make_images(n, seed, split)
    for i, (image, a) in enumerate(zip(images, attributes)):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption(a) + "\n")
    return folder


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
TEXT_CONFIG = dict(  # CLIP's text tower, 64 wide and 2 layers deep; 77 positions as in SD
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclass
class PretrainConfig:
    seed: int = 0
    images: int = 20_000  # training images, drawn once (seed) from the training triples
    vae_steps: int = 2500  # 1200 steps left small triangles as blobs (shape read right in 61% of VAE recons)
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # on the mean KL per latent element, against the mean squared error per pixel
    unet_steps: int = 2000
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
    import toy_metrics

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
    toy_metrics.save_classifier(toy_metrics.train_classifier(cfg.seed))
    HELDOUT_PROMPTS.write_text("\n".join(heldout_prompts()) + "\n")
    print(f"pretrained in {time.time() - t0:.0f} s: {out}, {toy_metrics.CLASSIFIER_PATH}, {HELDOUT_PROMPTS}")


# ------------------------------------------------------------------------------------ using the model

@torch.no_grad()
def generate(models, prompts, seed=0, steps=50, guidance=7.5, batch=48):
    """One image per prompt, [N, 3, 32, 32] in [0, 1]; the noise of image k is the k-th draw from seed."""
    import sampler

    schedule = sampler.make_schedule(models.scheduler_config)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), 4, RESOLUTION // 4, RESOLUTION // 4, generator=g)
    uncond = models.encode_prompt([""])
    images = []
    for i in range(0, len(prompts), batch):
        cond = models.encode_prompt(prompts[i:i + batch])
        z = sampler.ddim_sample(models.unet, latents[i:i + batch], cond, uncond, steps, guidance,
                                schedule=schedule, progress=False)
        images.append(sampler.decode_latents(models.vae, z))
    return torch.cat(images)


def evaluate(model=MODEL_DIR, out="runs/toy_eval", per_prompt=4, steps=50, guidance=7.5, seed=0):
    """The base model's numbers: VAE reconstruction, classifier accuracy on real held-out images, and
    caption accuracy / Frechet distance (the proxies of toy_metrics) of samples for the held-out and
    the training prompts. Writes OUT/samples.png (one sample per held-out prompt) and OUT/eval.json."""
    import checkpoint
    import sampler
    import toy_metrics

    models = checkpoint.load_models(model)
    real, attributes = make_images(1000, seed=seed + 7, split="heldout")
    real01 = toy_metrics.images01(real)
    recon = sampler.decode_latents(models.vae, sampler.encode_images(models.vae, real01))
    results = {"vae_reconstruction_heldout": {"mse": sampler.mse(recon, real01).mean().item(),
                                              "psnr": sampler.psnr(recon, real01).mean().item()},
               "classifier_heldout_real": toy_metrics.caption_accuracy(real01, [caption(a) for a in attributes]),
               "steps": steps, "guidance": guidance}
    train_prompts = sorted({caption(a) for a in make_images(200, seed=seed + 8)[1]})[:24]
    for name, prompts in (("heldout_prompts", heldout_prompts()), ("train_prompts", train_prompts)):
        prompts = [p for p in prompts for _ in range(per_prompt)]
        images = generate(models, prompts, seed, steps, guidance)
        results[name] = toy_metrics.caption_accuracy(images, prompts)
        if name == "heldout_prompts":
            results[name]["frechet_to_real"] = toy_metrics.frechet_distance(
                toy_metrics.features(images), toy_metrics.features(real01))
            Path(out).mkdir(parents=True, exist_ok=True)
            sampler.save_strip(images[::per_prompt], Path(out) / "samples.png")
    (Path(out) / "eval.json").write_text(json.dumps(results, indent=2))
    return results


# ------------------------------------------------------------------------------ hooks for train.py

# `python train.py` with no arguments: a Smooth-LoRA (lambda 1, rank 8) on the tiny model, in minutes.
TRAIN_DEFAULTS = dict(resolution=RESOLUTION, batch_size=16, grad_accum=1, max_steps=300, lr=1e-3,
                      save_every=100, lambda_reg=1.0, rank=8, num_workers=0)


def report(model_path, lora_path, out_dir, prompts=6, steps=50, guidance=7.5, seed=0):
    """Before/after of a LoRA on the held-out prompts: ISTD (Sec. 4.1 protocol, same noise pairs) and
    caption accuracy of the frames, printed and written to OUT/report.json; the first prompt's
    interpolation strip, base above and base + LoRA below, in OUT/interpolation_before_after.png."""
    import checkpoint
    import lora
    import sampler
    import toy_metrics

    out = Path(out_dir)
    models = checkpoint.load_models(model_path)
    schedule = sampler.make_schedule(models.scheduler_config)
    every = heldout_prompts()  # (triple, small), (triple, large), ...: spread the choice, alternate sizes
    chosen = [every[k * len(every) // prompts + k % 2] for k in range(prompts)]
    latent_shape = (4, RESOLUTION // 4, RESOLUTION // 4)
    results, strips = {}, []
    for name in ("base", "lora"):
        if name == "lora":
            lora.load_lora(models.unet, lora_path)
        r = sampler.evaluate_istd(models.unet, models.vae, models.encode_prompt, chosen, latent_shape,
                                  steps=steps, guidance=guidance, seed=seed, schedule=schedule, progress=False)
        noise_a, noise_b = sampler.noise_pair(seed, latent_shape)
        frames = sampler.interpolate(models.unet, models.vae, noise_a, noise_b, models.encode_prompt(chosen[:1]),
                                     uncond_a=models.encode_prompt([""]), steps=steps, guidance=guidance,
                                     schedule=schedule, progress=False)
        strips.append(frames)
        accuracy = toy_metrics.caption_accuracy(frames, chosen[:1] * len(frames))["caption"]
        results[name] = {"istd": r["istd"], "mean_adjacent_distance": r["mean_adjacent_distance"],
                         "caption_accuracy_first_strip": accuracy}
    results.update(prompts=chosen, steps=steps, guidance=guidance, seed=seed, lora_path=str(lora_path))
    out.mkdir(parents=True, exist_ok=True)
    sampler.save_strip(torch.cat([torch.cat(list(s), dim=2)[None] for s in strips], dim=2),
                       out / "interpolation_before_after.png")
    (out / "report.json").write_text(json.dumps(results, indent=2))
    print(f"ISTD on {len(chosen)} held-out prompts ({steps} DDIM steps, CFG {guidance}): "
          f"base {results['base']['istd']:.4f} -> LoRA {results['lora']['istd']:.4f} (mean adjacent distance "
          f"{results['base']['mean_adjacent_distance']:.3f} -> {results['lora']['mean_adjacent_distance']:.3f}); "
          f"strip in {out / 'interpolation_before_after.png'}, numbers in {out / 'report.json'}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train the tiny SD, the classifier; write assets/")
    pre.add_argument("--out", default=str(MODEL_DIR))
    pre.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    cls = sub.add_parser("classifier", help="train only the attribute classifier (part of pretrain)")
    cls.add_argument("--threads", type=int, default=1)
    ev = sub.add_parser("evaluate", help="VAE reconstruction, classifier accuracy, caption accuracy of samples")
    ev.add_argument("--model", default=str(MODEL_DIR))
    ev.add_argument("--out", default="runs/toy_eval")
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--guidance", type=float, default=7.5)
    ev.add_argument("--threads", type=int, default=1)
    data = sub.add_parser("data", help="write toy images + captions to a folder")
    data.add_argument("folder")
    data.add_argument("--n", type=int, default=2000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--split", choices=("train", "heldout"), default="train")
    args = p.parse_args(argv)
    if args.command == "data":
        print(prepare_data(args.folder, args.n, args.seed, args.split))
        return 0
    torch.set_num_threads(args.threads)
    if args.command == "pretrain":
        pretrain(args.out)
    elif args.command == "classifier":
        import toy_metrics

        toy_metrics.save_classifier(toy_metrics.train_classifier())
    else:
        print(json.dumps(evaluate(args.model, args.out, steps=args.steps, guidance=args.guidance), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
