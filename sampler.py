"""DDIM sampling, inversion, interpolation and editing of Smooth Diffusion (Sec. 3.1, 4).

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
as a [B] LongTensor. The demo CLI is in demos/cli.py: run `python sampler.py` for the toy
interpolation demo, or e.g.

    python sampler.py interpolate --model PATH --lora smooth_lora.safetensors --prompt "a cat"
    python sampler.py invert --model PATH --image photo.jpg --prompt "a photo of a cat" --inversion nti
    python sampler.py edit --model PATH --image cake.jpg --prompt "a cake" --target-prompt "a strawberry cake"
    python sampler.py istd --model PATH --prompts-file captions.txt

`python sampler.py COMMAND --help` lists every option with the paper's defaults.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import metrics

# SD-1.5's scheduler_config.json (a PNDM config; what DDIMScheduler.from_config reads from it).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                      timestep_spacing="leading", prediction_type="epsilon")


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
    """The `steps` DDIM timesteps, descending, "leading" spacing: t_k = k * (T // steps) + steps_offset.

    The offset shrinks where it would put the first timestep past the schedule's last, T - 1: at steps = T
    (stride 1) the grid is every timestep once, T-1..0. (diffusers' DDIMScheduler keeps the offset there,
    and its first step then indexes abar_T, one past the end: an IndexError.)
    """
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {schedule.num_train_timesteps}], got {steps}")
    stride = schedule.num_train_timesteps // steps
    offset = min(schedule.steps_offset, schedule.num_train_timesteps - 1 - (steps - 1) * stride)
    return torch.arange(steps - 1, -1, -1) * stride + offset


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
                generator=None, progress=True, start=0):
    """Run the backward process (Eq. 3) from x_T = latents with classifier-free guidance (Eq. 5).

    cond / uncond: [1 or B, 77, D] embeddings, or lists with one per step (null-text inversion's
    null embeddings; Eq. 15's prompt switch). generator: draws the eta > 0 noise (as diffusers does).
    start: skip the first `start` steps, latents being at that level (entry steps - start of
    `ddim_inversion_trajectory`: a partial inversion, as drag.py's). Returns x_0, the scaled latents
    for `decode_latents`.
    """
    schedule = schedule or make_schedule()
    _check_per_step("cond", cond, steps)
    _check_per_step("uncond", uncond, steps)
    stride = schedule.num_train_timesteps // steps
    x = latents
    timesteps = ddim_timesteps(steps, schedule).tolist()
    for i in tqdm(range(start, steps), desc="DDIM", disable=not progress):
        t = timesteps[i]
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


def _lerp(a, b, ts):
    """Embeddings (or per-step lists of them) lerped at each ratio in ts, stacked on the batch axis."""
    if isinstance(a, (list, tuple)):
        return [_lerp(x, y, ts) for x, y in zip(a, b)]
    return None if a is None else torch.cat([torch.lerp(a, b, t) for t in ts])


@torch.no_grad()
def interpolate(unet, vae, noise_a, noise_b, *, cond_a, cond_b=None, uncond_a=None, uncond_b=None, frames=11,
                steps=50, guidance=7.5, schedule=None, batch_size=1, progress=True):
    """Images along the slerp from noise_a to noise_b, [frames, 3, H, W] in [0, 1].

    The prompt embeddings (cond) and the null embeddings (uncond: a tensor, or per-step lists from
    null-text inversion) are lerped alongside; leave the *_b ones out to keep them fixed. For two
    real images pass their inverted x_T as the noises (the paper's Fig. 3 protocol). Frames go
    through the UNet batch_size at a time (1: each frame equals a lone sample bit for bit).
    """
    cond_b = cond_a if cond_b is None else cond_b
    uncond_b = uncond_a if uncond_b is None else uncond_b
    noises = interpolate_noises(noise_a, noise_b, frames=frames)
    ratios, images = torch.linspace(0, 1, frames).tolist(), []
    for k in tqdm(range(0, frames, batch_size), desc="frames", disable=not progress):
        ts = ratios[k:k + batch_size]
        cond, uncond = _lerp(cond_a, cond_b, ts), _lerp(uncond_a, uncond_b, ts)
        latents = ddim_sample(unet, noises[k:k + batch_size], cond, uncond, steps=steps, guidance=guidance,
                              schedule=schedule, progress=False)
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
                         guidance=7.5, seed=0, schedule=None, batch=12, uncond=None, progress=True):
    """The paper's ISTD protocol (Sec. 4.1) as images: strip k slerps between the noise pair of seed + k
    and is sampled with prompts[k] and CFG, [len(prompts), frames, 3, H, W] in [0, 1].

    Fixed seeds per strip let two models be compared on the same pairs, and any subset of prompts
    is reproducible. `batch` strips (x frames) go through the UNet together: the result is that of
    `interpolate` strip by strip up to float summation order (measured: 1.2e-5 relative on ISTD).
    uncond: the embedding of CFG's unconditional branch (default: the "" prompt's).
    """
    uncond = encode_prompt([""]) if uncond is None else uncond
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
                  guidance=7.5, seed=0, schedule=None, batch=12, uncond=None, progress=True):
    """ISTD over many prompts with the paper's protocol (Sec. 4.1): per prompt k, the strip of
    `interpolation_strips` (noise pair seed + k, 11 frames, CFG 7.5), then `istd`; averaged over prompts.
    The mean adjacent distance is reported beside it: a low ISTD can also come from uniformly large
    jumps. Returns a dict of per-prompt values and their means.
    """
    strips = interpolation_strips(unet, vae, encode_prompt, prompts, latent_shape=latent_shape, frames=frames,
                                  steps=steps, guidance=guidance, seed=seed, schedule=schedule, batch=batch,
                                  uncond=uncond, progress=progress)
    per_prompt = [metrics.istd(strip) for strip in strips]
    per_prompt_distance = [metrics.adjacent_distances(strip).mean().item() for strip in strips]
    return {"istd": float(np.mean(per_prompt)), "mean_adjacent_distance": float(np.mean(per_prompt_distance)),
            "prompts": list(prompts), "per_prompt_istd": per_prompt,
            "per_prompt_mean_adjacent_distance": per_prompt_distance,
            "protocol": {"frames": frames, "steps": steps, "guidance": guidance, "seed": seed,
                         "interpolation": "slerp", "pixel_range": "[0, 1]", "std": "population (ddof=0)"}}


if __name__ == "__main__":  # `python sampler.py COMMAND ...` runs the demo CLI (demos/cli.py); this module
    import runpy  # never imports it: the CLI imports the sampler, not the other way round

    runpy.run_module("demos", run_name="__main__")
