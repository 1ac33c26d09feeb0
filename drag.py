"""Drag editing: DragDiffusion (Shi et al., CVPR 2024, arXiv 2306.14435) on our UNet, VAE, LoRA and DDIM.

Smooth Diffusion's third application (paper Sec. 4.4, Fig. 1, Fig. 6) is DragDiffusion with the
Smooth-LoRA in the model. The user clicks handle points h_i and target points t_i (and may paint the
region that may change, the mask M); the edit moves the content at each h_i to t_i. DragDiffusion,
Sec. 3 of its paper, with the defaults of its code (Yujun-Shi/DragDiffusion):

  1. identity LoRA (Sec. 3.2): rank 16 on to_q/to_k/to_v/to_out of every attention, trained for 80
     AdamW steps (lr 5e-4, weight decay 1e-2) on the eps-MSE of the input image alone, 4 copies per
     batch (`train_identity_lora`; the loss is train.py's `smooth_diffusion_loss` without regularizer);
  2. DDIM inversion (guidance 1, 50 steps) to step 35 of 50 (inversion strength 0.7): z_t;
  3. motion supervision (Sec. 3.3, Eq. 3 of DragDiffusion): the UNet decoder's features F(z_t),
     bilinearly upsampled 4x (on SD-1.5: to half the image size); for each handle not yet within 2
     cells of its target, L1 between the stop-gradient patch around h_i (radius 1) and the patch at
     h_i + d_i, d_i the unit vector towards t_i (`motion_supervision_loss`); plus lambda = 0.1 times
     the L1 of one DDIM step's prediction z_{t-1} outside the mask against the unedited one's;
  4. point tracking (Sec. 3.3, Eq. 4): each handle moves to the nearest neighbour, in a 7 x 7 window
     (radius 3) around it, of its ORIGINAL feature F_{h_i^0}(z_t) (`track_points`);
  5. 3 and 4 alternate, Adam on z_t (lr 0.01), at most 80 iterations, stopping once every handle is
     within 2 units of its target (`optimise_latent`);
  6. denoising the remaining 35 steps (guidance 1) with the inverted z_t as a reference branch: in
     the decoder's last two up blocks, the self-attention of the edited branch takes its keys and
     values from the reference branch (mutual self-attention, Sec. 3.4; `mutual_self_attention`).
Units: points are (x, y) pixels in the API; 3-5 work in cells of the upsampled feature map.

Where the published code differs from its paper we follow the code, whose defaults are the published
ones: the motion loss is (2r + 1)^2 times the MEAN absolute difference (the paper's Eq. 3 sums over
channels too); a handle already within 2 cells of its target adds no motion term; the mask is
resized to the latent size by nearest neighbour. The LoRA's augmentation (resize then random crop to
512) is the identity on a square image of the model's size, so the 4 copies of a batch differ only in
their VAE posterior sample, timestep and noise, as there.

Scaling to other models. The supervised features are the output of the decoder's second-to-last up
block (`DragConfig.feature_block = -2`): on SD-1.5 that is `up_blocks[2]` (640 channels at 64 x 64,
the latent size: the code's `unet_feature_idx = 3`), on the toy model `up_blocks[1]` (64 channels at
8 x 8, also the latent size). The code resizes them to half the image, 256 x 256: 4x the latent grid.
We keep the 4x (`feature_upsample`), so the radii and the 2-cell stopping distance, counted in cells,
are the same fraction of a latent cell on both models: on the toy model (VAE factor 4, not 8) the
features are 32 x 32 and a cell is a pixel. Half the toy image (16 x 16) would make the stopping
distance 4 px of 32, 1/8 of the image. Mutual self-attention acts in the last two up blocks
(`mutual_blocks = 2`): SD-1.5's last 6 transformer blocks of 16 (the code's layers 10-15), all 4 of
the toy model's decoder.

Smooth-LoRA. The paper says only that Smooth Diffusion was integrated into DragDiffusion. We merge
the Smooth-LoRA into the base weights (`bake_lora`) and train the identity LoRA on top of that model,
so both apply; the paper does not say whether it did this, swapped the base, or stacked LoRAs.

    result = drag(unet, vae, image01, cond, handles=[(12, 16)], targets=[(20, 16)], mask01=mask)
    python sampler.py drag --image IMG --prompt P --points 12,16:20,16 [--mask M.png] [--lora FILE]

Tests: `python -m pytest -q tests/test_drag.py`. Benchmark on the toy world: `python -m toy.drag_bench`.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora
from sampler import (ddim_inversion_trajectory, ddim_sample, ddim_step, ddim_timesteps, decode_latents,
                     make_schedule)
from train import smooth_diffusion_loss
from unet import UNet


@dataclass
class DragConfig:
    """DragDiffusion's published defaults (its Gradio demo and DragBench script)."""
    lora_steps: int = 80  # identity LoRA: AdamW steps on the input image
    lora_lr: float = 5e-4  # its learning rate (constant)
    lora_rank: int = 16  # on to_q, to_k, to_v, to_out.0 of every attention
    lora_batch: int = 4  # copies of the image per step
    lora_weight_decay: float = 1e-2  # AdamW's, as the official LoRA script
    steps: int = 50  # DDIM steps of the inversion and of the denoising
    inversion_strength: float = 0.7  # invert round(0.7 * 50) = 35 steps: the drag acts at step 35 of 50
    feature_block: int = -2  # up block whose output is supervised (SD-1.5: up_blocks[2]; toy: up_blocks[1])
    feature_upsample: int = 4  # features bilinearly resized to 4x the latent grid (SD-1.5: half the image)
    motion_radius: int = 1  # r_1: patch radius of motion supervision, in feature cells
    track_radius: int = 3  # r_2: search radius of point tracking (a 7 x 7 window)
    lam: float = 0.1  # lambda: weight of the mask term
    latent_lr: float = 0.01  # Adam's learning rate on z_t
    max_iterations: int = 80  # motion supervision + tracking iterations at most
    reach: float = 2.0  # a handle this close to its target (feature cells) has arrived
    mutual_blocks: int = 2  # last up blocks whose self-attention reads the reference branch


@dataclass
class DragResult:
    image: torch.Tensor  # the edited image, [1, 3, H, W] in [0, 1]
    handles: list  # where each handle ended up, (x, y) in pixels (point tracking's last estimate)
    iterations: int  # latent optimisation steps taken
    latents: torch.Tensor  # the edited z_0, [1, 4, h, w]


# --------------------------------------------------------------------------------- the model

def bake_lora(unet):
    """A copy of `unet` with every LoRA it carries (e.g. a Smooth-LoRA) folded into plain weights."""
    merged = copy.deepcopy(unet)
    lora.merge_lora(merged)
    state = {k: v for k, v in merged.state_dict().items() if "lora" not in k}
    with torch.device("meta"):
        plain = UNet(unet.config)
    plain.load_state_dict(state, assign=True)
    return plain.eval().requires_grad_(False)


def autocast_for(unet):
    """A zero-argument context factory: autocast in the UNet's dtype when its weights are half precision."""
    weight = next(unet.parameters())
    if weight.dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(weight.device.type, dtype=weight.dtype)


def train_identity_lora(unet, mean, std, cond, schedule, cfg, *, generator, progress=True):
    """Fit a fresh rank-cfg.lora_rank LoRA of `unet` (in place, then merged) to one image (Sec. 3.2).

    mean, std: the image's VAE posterior [1, 4, h, w], scaled as the UNet's latents; each step draws
    cfg.lora_batch posterior samples, timesteps t ~ U{0..T-1} and noises from `generator`, as the
    official script.
    """
    params = lora.inject_lora(unet, rank=cfg.lora_rank)
    lora.freeze_all_but_lora(unet)
    optimizer = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=cfg.lora_weight_decay)
    shape, n = tuple(mean.shape[1:]), cfg.lora_batch
    text = cond.expand(n, -1, -1)
    alphas_cumprod = schedule.alphas_cumprod.to(mean.device)
    for _ in tqdm(range(cfg.lora_steps), desc="identity LoRA", disable=not progress):
        posterior, noise = (torch.randn((n, *shape), generator=generator).to(mean.device) for _ in range(2))
        t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator).to(mean.device)
        latents = mean + std * posterior
        loss, _, _, _ = smooth_diffusion_loss(unet, latents, noise, t, text, None, alphas_cumprod,
                                              reg_mode="none", autocast=autocast_for(unet))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    lora.merge_lora(unet)
    unet.requires_grad_(False)
    return unet


# ------------------------------------------------------------------------ features and attention

def feature_module(unet, block):
    """The last module run in up block `block`: its output is the block's output."""
    up = unet.up_blocks[block]
    for name in ("upsamplers", "attentions", "resnets"):
        if hasattr(up, name):
            return getattr(up, name)[-1]


def eps_and_features(unet, z, t, cond, *, block, size):
    """(eps, F): the UNet's prediction and up block `block`'s output, bilinearly resized to `size` (h, w)."""
    captured = []
    hook = feature_module(unet, block).register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        eps = unet(z, t, cond)
    finally:
        hook.remove()
    return eps, F.interpolate(captured[0].float(), size, mode="bilinear")  # [B, C, size]


@contextlib.contextmanager
def mutual_self_attention(unet, blocks=2):
    """Inside, in the last `blocks` up blocks, every self-attention (attn1) of the batch takes its keys
    and values from batch item 0, the reference branch (Sec. 3.4): item 0 is computed as before, the
    others' queries attend to the reference's keys and values. Done by forward pre-hooks that pass
    `Attention`'s own `context` argument; removed on exit."""
    def reference_context(module, args, kwargs):
        x = args[0]  # [B, L, C]
        return (x,), {**kwargs, "context": x[:1].expand_as(x)}

    layers = [transformer.attn1 for up in unet.up_blocks[-blocks:] for attention in getattr(up, "attentions", [])
              for transformer in attention.transformer_blocks]
    hooks = [layer.register_forward_pre_hook(reference_context, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------- motion supervision, tracking

def feature_patch(features, centre, offset, radius):
    """Bilinear samples of features [B, C, H, W] on the (2r+1)^2 grid around centre + offset, (x, y) cells."""
    H, W = features.shape[-2:]
    d = torch.arange(-radius, radius + 1, dtype=torch.float32, device=features.device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    x, y = centre[0] + offset[0] + dx, centre[1] + offset[1] + dy
    grid = torch.stack([2 * x / (W - 1) - 1, 2 * y / (H - 1) - 1], dim=-1)  # [k, k, 2], (x, y) in [-1, 1]
    grid = grid[None].expand(features.shape[0], -1, -1, -1).to(features.dtype)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)  # [B, C, k, k]


def motion_supervision_loss(features, handles, targets, *, radius=1, reach=2.0):
    """DragDiffusion's Eq. 3, first term: sum_i (2r+1)^2 * mean |F_{q + d_i} - sg(F_q)| over the patch
    q around h_i, d_i = (t_i - h_i) / ||t_i - h_i||; handles within `reach` of their target are skipped."""
    loss = features.new_zeros(())
    for h, t in zip(handles, targets):
        if (t - h).norm() < reach:
            continue
        d = (t - h) / (t - h).norm()
        still = feature_patch(features, h, torch.zeros_like(d), radius).detach()  # sg(F_q)
        moved = feature_patch(features, h, d, radius)
        loss = loss + (2 * radius + 1) ** 2 * F.l1_loss(moved, still)
    return loss


@torch.no_grad()
def track_points(features0, features, handles, handles0, *, radius=3):
    """DragDiffusion's Eq. 4: each handle moves to the cell, within `radius` of it, whose feature in
    `features` is nearest (L1) to the ORIGINAL handle's feature in features0. [N, 2] (x, y) cells."""
    H, W = features.shape[-2:]
    moved = []
    for h, h0 in zip(handles.long().tolist(), handles0.long().tolist()):
        f0 = features0[:, :, h0[1], h0[0]]  # [B, C]
        x1, x2 = max(0, h[0] - radius), min(W, h[0] + radius + 1)
        y1, y2 = max(0, h[1] - radius), min(H, h[1] + radius + 1)
        distance = (features[:, :, y1:y2, x1:x2] - f0[:, :, None, None]).abs().sum(dim=(0, 1))  # [rows, cols]
        row, col = divmod(distance.argmin().item(), distance.shape[1])
        moved.append([x1 + col, y1 + row])
    return torch.tensor(moved, dtype=handles.dtype, device=handles.device)


def arrived(handles, targets, reach=2.0):
    return bool(((handles - targets).norm(dim=1) < reach).all())


def optimise_latent(unet, z, t, abar_t, abar_prev, cond, handles, targets, mask, cfg, *, feature_size,
                    progress=True):
    """Steps 3-5 of the module docstring: Adam on z_t -> (edited z_t, final handles, iterations).

    handles, targets: [N, 2] (x, y) feature cells; mask [1, 1, h, w] at the latent size, 1 where the
    image may change, or None (no mask term).
    """
    autocast = autocast_for(unet)
    kw = dict(block=cfg.feature_block, size=feature_size)
    with torch.no_grad(), autocast():
        eps0, features0 = eps_and_features(unet, z, t, cond, **kw)
        z_prev0 = ddim_step(z, eps0.float(), abar_t, abar_prev)
    z = z.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=cfg.latent_lr)
    handles0, handles = handles.clone(), handles.clone()
    bar = tqdm(range(cfg.max_iterations), desc="drag", disable=not progress)
    iteration = 0
    for iteration in bar:
        with autocast():
            eps, features = eps_and_features(unet, z, t, cond, **kw)
        if iteration > 0:
            handles = track_points(features0, features, handles, handles0, radius=cfg.track_radius)
        if arrived(handles, targets, cfg.reach):
            break
        loss = motion_supervision_loss(features, handles, targets, radius=cfg.motion_radius, reach=cfg.reach)
        if mask is not None:  # DragDiffusion's Eq. 3, second term
            z_prev = ddim_step(z, eps.float(), abar_t, abar_prev)
            loss = loss + cfg.lam * ((z_prev - z_prev0) * (1 - mask)).abs().sum()
        z.grad, = torch.autograd.grad(loss, z)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    else:
        iteration = cfg.max_iterations
    return z.detach(), handles, iteration


# ------------------------------------------------------------------------------------- the drag

def drag(unet, vae, image01, cond, handles, targets, mask01=None, *, cfg=None, schedule=None, seed=0,
         progress=True):
    """Drag the content at each handle (x, y pixels) to its target in image01 [1, 3, H, W] ([0, 1]).

    cond: the prompt's embedding [1, 77, D]; mask01: [1, 1, H, W], 1 where the image may change (None or
    all zero: no mask term). `unet` is not changed: the drag works on a copy with its LoRA baked in and
    the identity LoRA trained on top. seed: the identity LoRA's randomness (the rest is deterministic).
    """
    cfg = cfg or DragConfig()
    schedule = schedule or make_schedule()
    if len(handles) != len(targets) or not handles:
        raise ValueError(f"need one target per handle and at least one pair; got {len(handles)} handles "
                         f"and {len(targets)} targets")
    device = image01.device
    unet = bake_lora(unet)
    with torch.no_grad():
        mean, logvar = (m.float() for m in vae.encode((image01 * 2 - 1).to(next(vae.parameters()).dtype)))
    z_0 = mean * vae.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    train_identity_lora(unet, z_0, (0.5 * logvar).exp() * vae.scaling_factor, cond, schedule, cfg,
                        generator=generator, progress=progress)

    inverted = round(cfg.inversion_strength * cfg.steps)  # steps of inversion; the drag acts at step steps - inverted
    start = cfg.steps - inverted
    autocast = autocast_for(unet)
    with autocast():
        z_t = ddim_inversion_trajectory(unet, z_0, cond, steps=cfg.steps, schedule=schedule,
                                        progress=progress)[inverted]
    t = ddim_timesteps(cfg.steps, schedule)[start].item()
    t_prev = t - schedule.num_train_timesteps // cfg.steps
    abar_t = schedule.alphas_cumprod[t]
    abar_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else schedule.final_alpha_cumprod

    H, W = image01.shape[-2:]
    feature_size = (z_t.shape[-2] * cfg.feature_upsample, z_t.shape[-1] * cfg.feature_upsample)
    to_cells = torch.tensor([feature_size[1] / W, feature_size[0] / H])
    handle_cells = (torch.tensor(handles, dtype=torch.float32) * to_cells).round().to(device)
    target_cells = (torch.tensor(targets, dtype=torch.float32) * to_cells).round().to(device)
    mask = None
    if mask01 is not None and mask01.sum() > 0:
        mask = F.interpolate(mask01.float().to(device), z_t.shape[-2:], mode="nearest")
    z_edit, handle_cells, iterations = optimise_latent(
        unet, z_t, t, abar_t, abar_prev, cond, handle_cells, target_cells, mask, cfg, feature_size=feature_size,
        progress=progress)

    with torch.no_grad(), autocast(), mutual_self_attention(unet, cfg.mutual_blocks):
        edited = ddim_sample(unet, torch.cat([z_t, z_edit]), cond, steps=cfg.steps, guidance=1.0,
                             schedule=schedule, start=start, progress=progress)[1:]
    final = (handle_cells.cpu() / to_cells).tolist()
    return DragResult(decode_latents(vae, edited), [tuple(p) for p in final], iterations, edited)
