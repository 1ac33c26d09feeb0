"""DDIM sampling, inversion, interpolation and editing of Smooth Diffusion (Sec. 3.1, 4), and its demo CLI.

What is here, in the order of the paper:
  * the DDIM sampler (Eq. 3) with classifier-free guidance (Eq. 5), on SD-1.5's schedule;
  * DDIM inversion (Eq. 4) and null-text inversion (Mokady et al. 2023, Sec. 3.1), also in the
    "dual" form where two images share one null embedding per step (Fig. 3's real-image protocol);
  * interpolation: slerp between two noises, between two inverted real images, and the VAE-space
    baseline (Sec. 4.1, Fig. 3);
  * text-based editing by switching the prompt during the NTI reconstruction (Eq. 15, Sec. 4.4);
  * the ISTD protocol (Sec. 4.1): interpolation strips on fixed noise pairs, scored by metrics.py
    (which also holds Table 2's MSE / PSNR / SSIM / LPIPS).

`unet` is any callable `(x, t, context) -> eps` (our `unet.UNet` is one); timesteps are passed to it
as a [B] LongTensor. Run `python sampler.py` for the toy interpolation demo, or e.g.

    python sampler.py interpolate --model PATH --lora smooth_lora.safetensors --prompt "a cat"
    python sampler.py invert --model PATH --image photo.jpg --prompt "a photo of a cat" --inversion nti
    python sampler.py edit --model PATH --image cake.jpg --prompt "a cake" --target-prompt "a strawberry cake"
    python sampler.py istd --model PATH --prompts-file captions.txt

`python sampler.py COMMAND --help` lists every option with the paper's defaults.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import lora
import media
import metrics

# SD-1.5's scheduler_config.json (a PNDM config; what DDIMScheduler.from_config reads from it).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                      timestep_spacing="leading", prediction_type="epsilon")
ROOT = Path(__file__).resolve().parent
DEMO_MODEL = ROOT / "assets" / "toy-sd"  # built by `python toy.py pretrain`
DEMO_LORA = ROOT / "runs" / "toy" / "smooth_lora.safetensors"  # written by `python train.py`
DEMO_PROMPT = "a large red circle on a white background"  # a caption of the toy world


# ----------------------------------------------------------------------------------------- schedule

@dataclass
class Schedule:
    betas: torch.Tensor                # beta_t, the forward process's noise rates (index 0 is the paper's t=1)
    alphas_cumprod: torch.Tensor       # abar_t = prod_{s<=t} (1 - beta_s), [num_train_timesteps] float32
    final_alpha_cumprod: torch.Tensor  # abar used one step past t=0: abar_0 for SD-1.5 (set_alpha_to_one=False)
    num_train_timesteps: int = 1000    # T
    steps_offset: int = 1              # added to every DDIM timestep: SD-1.5's 50 steps are 981, 961, ..., 1


def make_schedule(scheduler_config: dict | None = None) -> Schedule:
    """The schedule of a diffusers `scheduler_config.json` dict (missing keys: SD-1.5's values).

    Betas are computed in float32 as diffusers does (CompVis uses float64; abar differs by <= 5e-7).
    """
    c = {**SD15_SCHEDULER, **(scheduler_config or {})}
    if c["prediction_type"] != "epsilon":
        raise ValueError(f"prediction_type {c['prediction_type']!r} is not supported: this sampler is for "
                         "epsilon-prediction models (SD-1.x). SD-2.x v-prediction models need another sampler.")
    if c["timestep_spacing"] != "leading":
        raise ValueError(f"timestep_spacing {c['timestep_spacing']!r} is not supported, only SD-1.5's "
                         "'leading'; set it in scheduler/scheduler_config.json.")
    T = c["num_train_timesteps"]
    if c["beta_schedule"] == "scaled_linear":  # linear in sqrt(beta): SD's schedule
        betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    elif c["beta_schedule"] == "linear":  # DDPM's schedule
        betas = torch.linspace(c["beta_start"], c["beta_end"], T, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {c['beta_schedule']!r} is not supported; use 'scaled_linear' or 'linear'.")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    final = torch.tensor(1.0) if c["set_alpha_to_one"] else alphas_cumprod[0]
    return Schedule(betas, alphas_cumprod, final, T, c["steps_offset"])


def ddim_timesteps(steps: int, schedule: Schedule) -> torch.Tensor:
    """The `steps` DDIM timesteps, descending, "leading" spacing: t_k = k * (T // steps) + steps_offset."""
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {schedule.num_train_timesteps}], got {steps}")
    stride = schedule.num_train_timesteps // steps
    return torch.arange(steps - 1, -1, -1) * stride + schedule.steps_offset


def _abar(schedule, t):
    """abar_t, or final_alpha_cumprod for the level below the last step (t < 0)."""
    return schedule.alphas_cumprod[t] if t >= 0 else schedule.final_alpha_cumprod


# ------------------------------------------------------------------------------------ DDIM sampling

def ddim_step(x, eps, abar_t, abar_prev, *, eta=0.0, noise=None):
    """Move x from noise level abar_t to abar_prev with the noise estimate eps (DDIM, Song et al. 2021).

    At eta=0 this is the paper's Eq. 3 and, with the levels swapped, Eq. 4.
    """
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()                     # 1. predicted x0 (Eq. 2 solved for x0)
    sigma = 0.0
    if eta > 0:                                                              # 2. sigma_t (0 for deterministic DDIM)
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    direction = (1 - abar_prev - sigma ** 2).sqrt() * eps                    # 3. direction pointing to x_t
    x_prev = abar_prev.sqrt() * x0 + direction                               # 4. Eq. 3
    if eta > 0:
        x_prev = x_prev + sigma * noise                                      # 5. fresh noise (eta > 0 only)
    return x_prev


def _batch(context, n):
    """Broadcast a [1, L, D] embedding to the batch size n."""
    return context.expand(n, -1, -1) if context.shape[0] == 1 and n > 1 else context


def _at(value, i):
    """A per-step list's i-th entry, or the value itself when it is the same at every step."""
    return value[i] if isinstance(value, (list, tuple)) else value


def _timestep(t, x):
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def guided_eps(unet, x, t, cond, uncond=None, *, guidance=7.5):
    """Eq. 5, w * eps(x, t, cond) + (1 - w) * eps(x, t, null), in one UNet call on the batch [uncond, cond].

    Without uncond (or at w = 1) this is the conditional prediction alone.
    """
    n = x.shape[0]
    if uncond is None or guidance == 1:
        return unet(x, _timestep(t, x), _batch(cond, n))
    context = torch.cat([_batch(uncond, n), _batch(cond, n)])
    eps_uncond, eps_cond = unet(torch.cat([x, x]), _timestep(t, context), context).chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)  # Eq. 5, written as diffusers does


def _check_per_step(name, value, steps):
    if isinstance(value, (list, tuple)) and len(value) != steps:
        raise ValueError(f"{name} has {len(value)} per-step embeddings but steps={steps}; "
                         "pass one per step (e.g. the null embeddings of an inversion with the same steps)")


@torch.no_grad()
def ddim_sample(unet, latents, cond, uncond=None, *, steps=50, guidance=7.5, eta=0.0, schedule=None,
                generator=None, progress=True):
    """Run the backward process (Eq. 3) from x_T = latents with classifier-free guidance (Eq. 5).

    cond / uncond: [1 or B, 77, D] embeddings, or lists with one per step (null-text inversion's
    null embeddings; Eq. 15's prompt switch). generator: draws the eta > 0 noise (as diffusers does).
    Returns x_0, the scaled latents for `decode_latents`.
    """
    schedule = schedule or make_schedule()
    _check_per_step("cond", cond, steps)
    _check_per_step("uncond", uncond, steps)
    stride = schedule.num_train_timesteps // steps
    x = latents
    for i, t in enumerate(tqdm(ddim_timesteps(steps, schedule).tolist(), desc="DDIM", disable=not progress)):
        eps = guided_eps(unet, x, t, _at(cond, i), _at(uncond, i), guidance=guidance)
        noise = None
        if eta > 0:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        x = ddim_step(x, eps, _abar(schedule, t), _abar(schedule, t - stride), eta=eta, noise=noise)
    return x


# -------------------------------------------------------------------------------------- inversion

@torch.no_grad()
def ddim_inversion_trajectory(unet, latents, cond, *, steps=50, schedule=None, progress=True):
    """DDIM inversion (Eq. 4) as in null-text inversion's code: conditional branch only, no guidance.

    The step to timestep t uses eps(x, t, cond) evaluated on the latent still at the level below t
    (the "local linear approximation" of Eq. 4). Returns [x_0, x_{t_1}, ..., x_T]: steps + 1 latents,
    increasing noise; entry k is the level that ddim_sample reaches after steps - k steps.
    """
    schedule = schedule or make_schedule()
    stride = schedule.num_train_timesteps // steps
    trajectory = [latents]
    for t in tqdm(ddim_timesteps(steps, schedule).flip(0).tolist(), desc="DDIM inversion", disable=not progress):
        eps = unet(trajectory[-1], _timestep(t, trajectory[-1]), _batch(cond, latents.shape[0]))
        trajectory.append(ddim_step(trajectory[-1], eps, _abar(schedule, t - stride), _abar(schedule, t)))  # Eq. 4
    return trajectory


def ddim_invert(unet, latents, cond, *, steps=50, schedule=None, progress=True):
    """x_T from DDIM inversion (Eq. 4); see `ddim_inversion_trajectory` for the convention."""
    return ddim_inversion_trajectory(unet, latents, cond, steps=steps, schedule=schedule, progress=progress)[-1]


def null_text_invert(unet, latents, cond, uncond, *, steps=50, guidance=7.5, inner_steps=10, lr=1e-2,
                     early_stop=1e-5, schedule=None, progress=True):
    """Null-text inversion (Mokady et al. 2023): x_T and one optimised null embedding per step.

    The DDIM inversion trajectory (guidance 1) is the target. Walking down from x_T with guidance w,
    each step's null embedding is optimised so that the guided DDIM step (Eq. 5, Eq. 3) lands on the
    inverted latent one level below. The defaults are the published ones: a fresh Adam per step i,
    warm-started from the previous step's null, with learning rate lr * (1 - i/100); at most
    inner_steps iterations, stopping once the loss is below early_stop + i * 2e-5. Then x advances
    with the optimised null, so that later steps correct the errors of earlier ones.

    latents [B, 4, h, w] with cond [B or 1, 77, D]: all B images share ONE null per step, optimised
    on the sum of their MSEs (B=2 is the dual form; see `null_text_invert_dual`). uncond: the
    initial null, CLIP(""), [1, 77, D]. Run in float32. Returns (x_T, [null_t for each step]).
    """
    schedule = schedule or make_schedule()
    stride = schedule.num_train_timesteps // steps
    trajectory = ddim_inversion_trajectory(unet, latents, cond, steps=steps, schedule=schedule, progress=progress)
    cond = _batch(cond, latents.shape[0])
    x, null, nulls = trajectory[-1], uncond.detach(), []
    for i, t in enumerate(tqdm(ddim_timesteps(steps, schedule).tolist(), desc="null-text inversion",
                               disable=not progress)):
        target = trajectory[steps - 1 - i]
        abar_t, abar_prev = _abar(schedule, t), _abar(schedule, t - stride)
        with torch.no_grad():
            eps_cond = unet(x, _timestep(t, x), cond)
        null = null.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=lr * (1 - i / 100))
        for _ in range(inner_steps):
            eps_uncond = unet(x, _timestep(t, x), _batch(null, x.shape[0]))
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)  # Eq. 5
            x_prev = ddim_step(x, eps, abar_t, abar_prev)          # Eq. 3
            loss = F.mse_loss(x_prev, target, reduction="none").flatten(1).mean(1).sum()
            # autograd.grad, not backward: the UNet's weights need no gradient.
            null.grad, = torch.autograd.grad(loss, null)
            optimizer.step()
            if loss.item() < early_stop + i * 2e-5:
                break
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            x = ddim_step(x, guided_eps(unet, x, t, cond, null, guidance=guidance), abar_t, abar_prev)
    return trajectory[-1], nulls


def null_text_invert_dual(unet, latents_a, latents_b, cond_a, cond_b, uncond, **kwargs):
    """Null-text inversion of two images (each with its own prompt) sharing one null per step.

    This is Smooth Diffusion's protocol for interpolating real images (`null_invert_dual`): the
    shared nulls make the two reconstructions' guidance identical, so only x_T and the prompt vary
    along the path. Returns (x_T of both images, [2, 4, h, w]; [null_t for each step]).
    """
    return null_text_invert(unet, torch.cat([latents_a, latents_b]), torch.cat([cond_a, cond_b]), uncond,
                            **kwargs)


# --------------------------------------------------------------------------------- VAE in and out

@torch.no_grad()
def decode_latents(vae, latents):
    """Scaled latents -> images in [0, 1], [B, 3, H, W] float32."""
    dtype = next(vae.parameters()).dtype
    images = vae.decode((latents / vae.scaling_factor).to(dtype))
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_images(vae, images01):
    """Images in [0, 1] -> scaled latents: the posterior mean times scaling_factor (as NTI does)."""
    dtype = next(vae.parameters()).dtype
    mean, _ = vae.encode((images01 * 2 - 1).to(dtype))
    return mean.float() * vae.scaling_factor


# ----------------------------------------------------------------------------------- interpolation

def slerp(t, v0, v1, *, dot_threshold=0.9995):
    """Spherical interpolation between two tensors, each treated as one flat vector (Stable Diffusion Walk).

    Falls back to linear interpolation when the vectors are nearly parallel (|cos| > dot_threshold),
    where sin(theta) ~ 0 makes the spherical formula unstable. Computed in float64.
    """
    a, b = v0.double(), v1.double()
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    if cos.abs() > dot_threshold:
        out = torch.lerp(a, b, t)
    else:
        theta = torch.arccos(cos)
        out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.to(v0.dtype)


def interpolate_noises(noise_a, noise_b, *, frames=11):
    """[frames, ...] noises slerped at ratios 0, 1/(frames-1), ..., 1 (11 frames: 0, 0.1, ..., 1, Sec. 4.1)."""
    return torch.cat([slerp(t, noise_a, noise_b) for t in torch.linspace(0, 1, frames).tolist()])


def _lerp(a, b, t):
    """Linear interpolation of embeddings, or of per-step lists of them."""
    if isinstance(a, (list, tuple)):
        return [torch.lerp(x, y, t) for x, y in zip(a, b)]
    return None if a is None else torch.lerp(a, b, t)


@torch.no_grad()
def interpolate(unet, vae, noise_a, noise_b, *, cond_a, cond_b=None, uncond_a=None, uncond_b=None, frames=11,
                steps=50, guidance=7.5, schedule=None, progress=True):
    """Images along the slerp from noise_a to noise_b, [frames, 3, H, W] in [0, 1].

    The prompt embeddings (cond) and the null embeddings (uncond: a tensor, or per-step lists from
    null-text inversion) are lerped alongside; leave the *_b ones out to keep them fixed. For two
    real images pass their inverted x_T as the noises (the paper's Fig. 3 protocol).
    """
    cond_b = cond_a if cond_b is None else cond_b
    uncond_b = uncond_a if uncond_b is None else uncond_b
    noises = interpolate_noises(noise_a, noise_b, frames=frames)
    images = []
    for k, t in enumerate(tqdm(torch.linspace(0, 1, frames).tolist(), desc="frames", disable=not progress)):
        latents = ddim_sample(unet, noises[k:k + 1], _lerp(cond_a, cond_b, t), _lerp(uncond_a, uncond_b, t),
                              steps=steps, guidance=guidance, schedule=schedule, progress=False)
        images.append(decode_latents(vae, latents))
    return torch.cat(images)


@torch.no_grad()
def interpolate_vae(vae, images_a, images_b, *, frames=11):
    """The VAE-space baseline of Fig. 3: lerp the two images' VAE latents and decode, [frames, 3, H, W]."""
    za, zb = encode_images(vae, images_a), encode_images(vae, images_b)
    return torch.cat([decode_latents(vae, torch.lerp(za, zb, t)) for t in torch.linspace(0, 1, frames).tolist()])


# ------------------------------------------------------------------------------------------ editing

def edit_conds(cond_src, cond_trg, *, r=0.8, steps=50, schedule=None):
    """Eq. 15 as one embedding per step: the source prompt while t > T * r, the target once t <= T * r."""
    schedule = schedule or make_schedule()
    threshold = schedule.num_train_timesteps * r
    return [cond_src if t > threshold else cond_trg for t in ddim_timesteps(steps, schedule).tolist()]


def edit(unet, latents_T, nulls, cond_src, cond_trg, *, r=0.8, steps=50, guidance=7.5, schedule=None, progress=True):
    """Text-based editing (Sec. 4.4): the NTI reconstruction from (x_T, nulls), switching prompts by Eq. 15.

    r = 0 is the reconstruction itself; r = 1 samples the target prompt from the same x_T and nulls.
    The paper picks r in {0.6, 0.7, 0.8, 0.9} per image; the official demo's default is 0.8.
    """
    conds = edit_conds(cond_src, cond_trg, r=r, steps=steps, schedule=schedule)
    return ddim_sample(unet, latents_T, conds, nulls, steps=steps, guidance=guidance, schedule=schedule,
                       progress=progress)


# ----------------------------------------------------------------------- the ISTD protocol (Sec. 4.1)

def noise_pair(seed, shape):
    """Two standard normal noises [1, *shape] from a CPU generator seeded with `seed`."""
    noises = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    return noises[:1], noises[1:]


@torch.no_grad()
def interpolation_strips(unet, vae, encode_prompt, prompts, *, latent_shape=(4, 64, 64), frames=11, steps=50,
                         guidance=7.5, seed=0, schedule=None, batch=12, progress=True):
    """The paper's ISTD protocol (Sec. 4.1) as images: strip k slerps between the noise pair of seed + k
    and is sampled with prompts[k] and CFG, [len(prompts), frames, 3, H, W] in [0, 1].

    Fixed seeds per strip let two models be compared on the same pairs, and any subset of prompts
    is reproducible. `batch` strips (x frames) go through the UNet together: the result is that of
    `interpolate` strip by strip up to float summation order (measured: 1.2e-5 relative on ISTD).
    """
    uncond = encode_prompt([""])
    strips = []
    for start in tqdm(range(0, len(prompts), batch), desc="ISTD strips", disable=not progress):
        ks = range(start, min(len(prompts), start + batch))
        cond = encode_prompt([prompts[k] for k in ks]).repeat_interleave(frames, 0)
        noises = torch.cat([interpolate_noises(*noise_pair(seed + k, latent_shape), frames=frames) for k in ks])
        latents = ddim_sample(unet, noises.to(cond.device, cond.dtype), cond, uncond, steps=steps, guidance=guidance,
                              schedule=schedule, progress=False)
        images = decode_latents(vae, latents)
        strips.append(images.view(len(ks), frames, *images.shape[1:]))
    return torch.cat(strips)


def evaluate_istd(unet, vae, encode_prompt, prompts, *, latent_shape=(4, 64, 64), frames=11, steps=50,
                  guidance=7.5, seed=0, schedule=None, progress=True):
    """ISTD over many prompts with the paper's protocol (Sec. 4.1): per prompt k, the strip of
    `interpolation_strips` (noise pair seed + k, 11 frames, CFG 7.5), then `istd`; averaged over prompts.
    The mean adjacent distance is reported beside it: a low ISTD can also come from uniformly large
    jumps. Returns a dict of per-prompt values and their means.
    """
    strips = interpolation_strips(unet, vae, encode_prompt, prompts, latent_shape=latent_shape, frames=frames,
                                  steps=steps, guidance=guidance, seed=seed, schedule=schedule, progress=progress)
    per_prompt = [metrics.istd(strip) for strip in strips]
    per_prompt_distance = [metrics.adjacent_distances(strip).mean().item() for strip in strips]
    return {"istd": float(np.mean(per_prompt)), "mean_adjacent_distance": float(np.mean(per_prompt_distance)),
            "prompts": list(prompts), "per_prompt_istd": per_prompt,
            "per_prompt_mean_adjacent_distance": per_prompt_distance,
            "protocol": {"frames": frames, "steps": steps, "guidance": guidance, "seed": seed,
                         "interpolation": "slerp", "pixel_range": "[0, 1]", "std": "population (ddof=0)"}}


# ---------------------------------------------------------------------------------------------- CLI

def _number(kind, low, high=None, message=None):
    """An argparse type: `kind` (int or float) in [low, high]; a value outside gets `message` or the range."""
    message = message or (f"must be in [{low}, {high}]" if high is not None else
                          f"must be {'an integer ' if kind is int else ''}>= {low}")

    def parse(text):
        value = kind(text)  # a ValueError here becomes argparse's "invalid int value"
        if not (low <= value and (high is None or value <= high)):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{message}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE = _number(int, 1)
FRAMES = _number(int, 2, message="need at least 2 frames to interpolate")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=str(DEMO_MODEL),
                        help="diffusers model folder or single-file checkpoint (default: the toy model, "
                             "assets/toy-sd)")
    common.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (vocab.json + merges.txt); needed for single-file checkpoints")
    common.add_argument("--config", default=None,
                        help="diffusers folder whose configs describe a single-file checkpoint (default: SD-1.5)")
    common.add_argument("--lora", default=None, help="Smooth Diffusion LoRA .safetensors to apply to the UNet")
    common.add_argument("--prompt", default=DEMO_PROMPT,
                        help="the prompt (for images: their caption); default %(default)r")
    common.add_argument("--steps", type=POSITIVE, default=50, help="DDIM steps (paper: %(default)s)")
    common.add_argument("--guidance", type=_number(float, 0), default=7.5,
                        help="CFG scale w of Eq. 5 (paper: %(default)s)")
    common.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    common.add_argument("--out", default=None, help="output folder (default: out/COMMAND)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--size", type=POSITIVE, default=None,
                        help="image side in pixels (default: the model's native size, e.g. 512 for SD-1.5)")
    images.add_argument("--inversion", choices=("nti", "ddim"), default="nti",
                        help="null-text inversion or plain DDIM inversion (default: %(default)s)")
    images.add_argument("--inner-steps", type=POSITIVE, default=10,
                        help="null-text inversion: Adam steps per timestep (paper: %(default)s)")

    parser = argparse.ArgumentParser(description="Smooth Diffusion sampler. With no arguments: the toy "
                                                 "interpolation demo (`interpolate` with every default).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", parents=[common], help="sample one image from --seed")
    p = sub.add_parser("interpolate", parents=[common, images],
                       help="interpolate two noises drawn with --seed or, with --image-a/--image-b, two real "
                            "images; writes a PNG strip and a GIF")
    p.add_argument("--frames", type=FRAMES, default=11, help="frames, mix ratios 0..1 (paper: %(default)s)")
    p.add_argument("--image-a", default=None, help="first real image (needs --image-b)")
    p.add_argument("--image-b", default=None, help="second real image")
    p.add_argument("--prompt-b", default=None, help="caption of --image-b (default: --prompt)")
    p.add_argument("--compare-base", action="store_true",
                   help="with --lora: also render the same interpolation without the LoRA (*_base.png/gif)")
    p = sub.add_parser("invert", parents=[common, images],
                       help="invert --image and reconstruct it; writes input | reconstruction and MSE/PSNR/SSIM"
                            " (and LPIPS with --lpips-weights)")
    p.add_argument("--image", required=True, help="the image to invert")
    p.add_argument("--lpips-weights", nargs="+", default=None, metavar="FILE",
                   help="report LPIPS too (metrics.py): torchvision's alexnet (or vgg16) ImageNet weights "
                        "and the lpips package's weights/v0.1/alex.pth (or vgg.pth), in any order; "
                        "nothing is downloaded")
    p = sub.add_parser("edit", parents=[common, images],
                       help="edit --image from --prompt to --target-prompt by Eq. 15; "
                            "writes source | reconstruction | edit")
    p.add_argument("--image", required=True, help="the image to edit (--prompt is its caption)")
    p.add_argument("--target-prompt", required=True, help="the edited caption")
    p.add_argument("--r", type=_number(float, 0, 1), default=0.8,
                   help="Eq. 15 switch point: the target prompt for t <= T*r (paper: 0.6-0.9; default %(default)s)")
    p = sub.add_parser("istd", parents=[common], help="ISTD over the prompts of --prompts-file (Sec. 4.1)")
    p.add_argument("--prompts-file", required=True, help="text file, one prompt per line")
    p.add_argument("--frames", type=FRAMES, default=11, help="frames per prompt (paper: %(default)s)")
    return parser


def _check_inputs(args):
    """Refuse missing files and contradictory options before any model is loaded."""
    for name in ("image", "image_a", "image_b", "prompts_file"):
        if getattr(args, name, None) and not Path(getattr(args, name)).is_file():
            raise SystemExit(f"error: --{name.replace('_', '-')} not found: {getattr(args, name)}")
    if args.command == "istd":
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        args.prompts = [line.strip() for line in lines if line.strip()]
        if not args.prompts:
            raise SystemExit(f"error: {args.prompts_file} has no prompts; write one prompt per line")
    if args.command == "interpolate" and (args.image_a is None) != (args.image_b is None):
        raise SystemExit("error: real-image interpolation needs both --image-a and --image-b")
    if args.command == "interpolate" and args.compare_base and not args.lora:
        raise SystemExit("error: --compare-base compares with and without --lora; pass --lora FILE")


@dataclass
class Loaded:
    """What every command works with: the models, their schedule and geometry, the prompt's embeddings."""
    models: checkpoint.Models
    schedule: Schedule
    size: int             # image side in pixels
    latent_shape: tuple   # (C, h, w) of one latent
    cond: torch.Tensor    # --prompt, [1, 77, D]
    uncond: torch.Tensor  # the "" prompt, [1, 77, D]
    out: Path


def _load(args):
    """Models, schedule and the latent/image geometry for a CLI command."""
    if args.model == str(DEMO_MODEL) and not (DEMO_MODEL / "model_index.json").exists():
        raise SystemExit(f"error: the toy model is not built yet ({DEMO_MODEL} has no model_index.json). "
                         "Build it with `python toy.py pretrain` (CPU, ~25 min), or pass --model PATH.")
    if not Path(args.model).exists():
        raise SystemExit(f"error: model not found: {args.model}. Pass --model PATH "
                         "(a diffusers folder or a single-file checkpoint).")
    try:  # a wrong checkpoint, tokenizer or LoRA is the user's input: say what is wrong, no traceback
        models = checkpoint.load_models(args.model, tokenizer=args.tokenizer, device=args.device, config=args.config)
        if args.lora:
            if not Path(args.lora).is_file():
                raise SystemExit(f"error: LoRA file not found: {args.lora}")
            lora.load_lora(models.unet, args.lora)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)  # 8 for SD-1.5
    sample_size = models.unet.config.sample_size
    size = getattr(args, "size", None) or sample_size * factor
    multiple = factor * 2 ** (len(models.unet.config.block_out_channels) - 1)  # 64 for SD-1.5
    if size % multiple:
        raise SystemExit(f"error: --size {size} must be a multiple of {multiple} for this model")
    latent_shape = (models.unet.config.in_channels, size // factor, size // factor)
    out = Path(args.out or Path("out") / args.command)
    out.mkdir(parents=True, exist_ok=True)
    return Loaded(models, make_schedule(models.scheduler_config), size, latent_shape,
                  models.encode_prompt([args.prompt]), models.encode_prompt([""]), out)


def invert_images(args, s, latents, cond):
    """(x_T, per-step nulls or the fixed "" embedding); a batch of images shares the nulls (dual NTI)."""
    if args.inversion == "ddim":
        return ddim_invert(s.models.unet, latents, cond, steps=args.steps, schedule=s.schedule), s.uncond
    return null_text_invert(s.models.unet, latents, cond, s.uncond, steps=args.steps, guidance=args.guidance,
                            inner_steps=args.inner_steps, schedule=s.schedule)


def _scores(x, y, lpips_model=None):
    scores = {"mse": metrics.mse(x, y).item(), "psnr": metrics.psnr(x, y).item(), "ssim": metrics.ssim(x, y).item()}
    if lpips_model is not None:
        scores["lpips"] = metrics.lpips(lpips_model, x, y).item()
    return scores


def _strip_report(frames, suffix=""):
    return {f"istd{suffix}": metrics.istd(frames),
            f"mean_adjacent_distance{suffix}": metrics.adjacent_distances(frames).mean().item()}


# Each command: (args, Loaded) -> (files written, report for metrics.json).

def run_generate(args, s):
    noise = noise_pair(args.seed, s.latent_shape)[0].to(args.device)
    latents = ddim_sample(s.models.unet, noise, s.cond, s.uncond, steps=args.steps, guidance=args.guidance,
                          schedule=s.schedule)
    return [media.save_strip(decode_latents(s.models.vae, latents), s.out / "sample.png")], {}


def run_interpolate(args, s):
    """Two noises of --seed, or two real images (Fig. 3: invert both, slerp x_T, lerp prompts and nulls)."""
    unet, vae, written, report = s.models.unet, s.models.vae, [], {}
    if args.image_a:  # the VAE-space baseline of Fig. 3
        images_a, images_b = (media.load_image01(p, s.size).to(args.device) for p in (args.image_a, args.image_b))
        baseline = interpolate_vae(vae, images_a, images_b, frames=args.frames)
        written.append(media.save_strip(baseline, s.out / "vae_interpolation.png"))
        report["vae_interpolation_istd"] = metrics.istd(baseline)
    # With --compare-base, the same path again with the LoRA switched off: Stable vs Smooth Diffusion.
    for suffix, lora_scale in [("", 1.0)] + [("_base", 0.0)] * args.compare_base:
        if args.lora:
            lora.set_lora_scale(unet, lora_scale)
        kw = dict(frames=args.frames, steps=args.steps, guidance=args.guidance, schedule=s.schedule)
        if args.image_a:
            cond_b = s.models.encode_prompt([args.prompt_b or args.prompt])
            # Both images in one batch: NTI then shares one null per step (the dual form).
            latents = encode_images(vae, torch.cat([images_a, images_b]))
            x_T, nulls = invert_images(args, s, latents, torch.cat([s.cond, cond_b]))
            frames = interpolate(unet, vae, x_T[:1], x_T[1:], cond_a=s.cond, cond_b=cond_b, uncond_a=nulls, **kw)
        else:
            noise_a, noise_b = (n.to(args.device) for n in noise_pair(args.seed, s.latent_shape))
            frames = interpolate(unet, vae, noise_a, noise_b, cond_a=s.cond, uncond_a=s.uncond, **kw)
        written += [media.save_strip(frames, s.out / f"interpolation{suffix}.png"),
                    media.save_gif(frames, s.out / f"interpolation{suffix}.gif")]
        report.update(_strip_report(frames, suffix))
    return written, report


def _reconstruct(args, s):
    """(image, its latents, x_T, nulls, the reconstruction) of --image."""
    image = media.load_image01(args.image, s.size).to(args.device)
    latents = encode_images(s.models.vae, image)
    x_T, nulls = invert_images(args, s, latents, s.cond)
    recon = ddim_sample(s.models.unet, x_T, s.cond, nulls, steps=args.steps, guidance=args.guidance,
                        schedule=s.schedule)
    return image, latents, x_T, nulls, decode_latents(s.models.vae, recon)


def run_invert(args, s):
    image, latents, _, _, recon = _reconstruct(args, s)
    vae_recon = decode_latents(s.models.vae, latents)
    report = {"inversion": args.inversion, "reconstruction": _scores(recon, image, args.lpips_model),
              "vae_reconstruction": _scores(vae_recon, image, args.lpips_model),
              "lpips_net": args.lpips_model.net if args.lpips_model else
              "skipped: pass --lpips-weights (LPIPS needs ImageNet weights, which are not shipped)"}
    return [media.save_strip(torch.cat([image, recon]), s.out / "reconstruction.png")], report


def run_edit(args, s):
    image, _, x_T, nulls, recon = _reconstruct(args, s)
    edited = edit(s.models.unet, x_T, nulls, s.cond, s.models.encode_prompt([args.target_prompt]), r=args.r,
                  steps=args.steps, guidance=args.guidance, schedule=s.schedule)
    edited = decode_latents(s.models.vae, edited)
    return [media.save_strip(torch.cat([image, recon, edited]), s.out / "edit.png")], {}


def run_istd(args, s):
    report = evaluate_istd(s.models.unet, s.models.vae, s.models.encode_prompt, args.prompts,
                           latent_shape=s.latent_shape, frames=args.frames, steps=args.steps,
                           guidance=args.guidance, seed=args.seed, schedule=s.schedule)
    print("\n".join(f"{v:10.4f}  {p}" for p, v in zip(args.prompts, report["per_prompt_istd"])))
    return [], report


COMMANDS = {"generate": run_generate, "interpolate": run_interpolate, "invert": run_invert, "edit": run_edit,
            "istd": run_istd}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = not argv
    if demo:  # the toy interpolation demo, with the Smooth LoRA once `make run` has trained it
        argv = ["interpolate"] + (["--lora", str(DEMO_LORA), "--compare-base"] if DEMO_LORA.is_file() else [])
    args = build_parser().parse_args(argv)
    _check_inputs(args)
    args.lpips_model = None
    if getattr(args, "lpips_weights", None):  # before the long inversion: bad files fail at once
        try:
            args.lpips_model = metrics.load_lpips(args.lpips_weights, device=args.device)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"error: --lpips-weights: {error}") from None
    s = _load(args)
    written, report = COMMANDS[args.command](args, s)
    if report:
        report = {"command": args.command, "model": args.model, "lora": args.lora, "steps": args.steps,
                  "guidance": args.guidance, "seed": args.seed,
                  **({} if args.command == "istd" else {"prompt": args.prompt}), **report}
        written.append(s.out / "metrics.json")
        (s.out / "metrics.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if not k.startswith("per_prompt")}, indent=2))
    for path in written:
        print(f"wrote {path}")
    if demo:
        print("(the toy demo: `python sampler.py interpolate --help` for the options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
