"""Train a Smooth-LoRA: LoRA fine-tuning of SD-1.5's UNet with Step-wise Variation Regularization.

Smooth Diffusion (Guo et al., CVPR 2024), Sec. 3.3 and 4.1. Each micro-batch follows Fig. 2(d):

    z0 = VAE(image) * 0.18215;  eps ~ N(0, I) (a leaf: the regularizer differentiates w.r.t. it)
    x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                               # Eq. 2
    loss = ||eps - eps_theta(x_t, t, text)||^2 + lambda * L_reg                 # Eq. 14
    L_reg = (sqrt(1 - abar_t) ||J^T u|| - a)^2,  J = d x0_hat / d eps           # Eq. 9, 10

Only the LoRA on the UNet's attention projections trains (rank 8); the VAE and text encoder are frozen.
Defaults are the paper's (Sec. 4.1): AdamW lr 1e-4 constant, weight decay 1e-4, batch 3 per GPU x 4
GPUs x gradient accumulation 8, 30k steps, 512 px, lambda 1; plus gradient clipping 1.0 (official code).

Run it:
    python train.py                                     # the toy world on a CPU (minutes)
    python train.py --model PATH --data DATA --out OUT  # one process (GPU if there is one)
    torchrun --nproc_per_node 4 train.py --model PATH --data DATA --out OUT

Results do not depend on the number of processes: every sample's image, timestep, noise, posterior
sample and regularizer direction are functions of (seed, its position in the global data stream), and
the regularizer's running mean `a` is averaged over ranks. So 2 processes x batch 1 give the same LoRA
as 1 process x batch 2 (up to float summation order). `--resume` (= auto: OUT/state.pt) continues a
run exactly; it refuses other optimization settings (lr, lambda, batch, seed, ...) unless
`--resume-override` names them, and then the optimizer uses the new values; so does a dataset that
changed. An output folder belongs to one run (OUT/train.lock): a second run there is refused, and a
fresh run in a folder that holds a run needs `--overwrite`. SIGTERM / Ctrl-C save a checkpoint and exit
143 / 130.

Watching a long run (validation strips, snapshots, mixed precision) and the regularizer's cheaper
variants (not in the paper): docs/training.md; every flag: `python train.py --help`.
"""
import argparse
import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
import lora
import ops
import regularizer
import runstate
import sampler

ROOT = Path(__file__).resolve().parent


def _option(default, help, **argparse_kwargs):
    """A TrainConfig field: its default, its --help text and any extra argparse settings (choices)."""
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class TrainConfig:
    """One training run; every field is a command-line flag (`lambda_reg` -> `--lambda-reg`)."""
    model: str = _option(None, "SD-1.5 folder in the diffusers layout or a single file; leave out to train "
                               "on the toy world")
    tokenizer: str = _option(None, "tokenizer folder (vocab.json + merges.txt); needed when --model is a "
                                   "single file")
    data: str = _option(None, "folder of images + same-stem .txt captions, or a .jsonl of {file_name, "
                              "caption} (the official format) or {image, text}")
    data_root: str = _option(None, "folder that a --data JSONL's relative paths are read from (default: the "
                                   "JSONL's folder)")
    out: str = _option(None, "output folder (default: out, or runs/toy in the toy world)")
    device: str = _option(None, "cpu, cuda (cuda:LOCAL_RANK under torchrun); default: cuda if available")
    resolution: int = _option(512, "images are resized and centre-cropped to this (a multiple of the "
                                   "model's downsampling: 64 for SD-1.5)")
    batch_size: int = _option(3, "per process and micro-step (paper: 3 per GPU)")
    grad_accum: int = _option(8, "micro-steps per optimizer step (paper: 8; 3 x 4 GPUs x 8 = 96)")
    max_steps: int = _option(30_000, "optimizer steps (paper: 30k)")
    lr: float = _option(1e-4, "AdamW, constant, no warm-up (paper)")
    weight_decay: float = _option(1e-4, "paper, Sec. 4.1; the official script's default is 1e-2")
    rank: int = _option(8, "LoRA rank (paper)")
    lora_targets: str = _option("attention", "attention: to_q, to_k, to_v, to_out of every attention layer "
                                             "(paper; the official file layout); all-linear: every nn.Linear "
                                             "of the UNet (also feed-forward and time embedding; peft layout)",
                                choices=("attention", "all-linear"))
    lambda_reg: float = _option(1.0, "lambda of Eq. 14 (paper: 1); 0 trains the plain-LoRA control")
    reg_every: int = _option(1, "regularize every k-th step, loss scaled by k (StyleGAN2's lazy "
                                "regularization; paper: 1 = every step)")
    reg_decay: float = _option(0.01, "decay of the running mean a of Eq. 9 per step (official code); with "
                                     "--reg-every k it is applied as 1-(1-decay)^k per regularized step")
    reg_timestep_buckets: int = _option(1, "keep one running mean a per range of T/N timesteps (not in the "
                                           "paper: the norm's scale depends strongly on t); 1 = the paper's a")
    reg_normalize: str = _option("none", "none: Eq. 9 as in the paper; analytic: divide the norm by "
                                         "sigma^2/sqrt(abar_t) (regularizer.identity_path_scale); relative: "
                                         "penalise (norm / a - 1)^2 (not in the paper)",
                                 choices=("none", "analytic", "relative"))
    reg_mode: str = _option("vjp", "vjp: Eq. 10 by double backward (paper); fd: finite difference, two "
                                   "forwards", choices=("vjp", "fd"))
    reg_direction: str = _option("random", "random: Eq. 10's random unit direction (paper); trajectory: the "
                                           "direction x_t moves along the DDIM path through (x0, eps), where "
                                           "DDIM inversion errs (not in the paper; issue 21: use with --reg-mode fd)",
                                 choices=("random", "trajectory"))
    reg_batch_frac: float = _option(1.0, "regularize the first ceil(f * batch size) samples of each "
                                         "micro-batch (f < 1: the result then depends on the per-process "
                                         "batch size, not only on the global batch)")
    fd_h: float = _option(1e-2, "fd step, relative to the noise's expected norm sqrt(C*H*W)")
    save_every: int = _option(500, "write the checkpoint every this many steps (and at the end)")
    snapshot_every: int = _option(0, "also keep OUT/smooth_lora-stepN.safetensors every this many steps "
                                     "(0: never)")
    keep_snapshots: int = _option(0, "keep only the newest K snapshots (0: all)")
    validate_every: int = _option(0, "every this many steps (and at steps 0 and the last), an interpolation "
                                     "strip per validation prompt in OUT/validation/step-N.png, its ISTD "
                                     "in log.jsonl, all steps in OUT/validation/progress.png (0: never)")
    validation_prompts: str = _option(None, "file with one validation prompt per line (few: each costs "
                                            "11 frames x --validation-steps x 2 UNet passes)")
    validation_steps: int = _option(10, "DDIM steps of the validation strips (fixed noise pairs, so "
                                        "strips compare across steps; the paper's ISTD uses 50)")
    seed: int = _option(0, "seeds the LoRA init, the data order and every sample's noise")
    resume: str = _option(None, 'state.pt to continue from, or "auto" (the default with no value) = '
                                "OUT/state.pt if it exists", nargs="?", const="auto")
    resume_override: str = _option(None, "comma-separated settings a --resume may change, e.g. lr,lambda_reg "
                                         "(without it, a resume with other optimization settings is refused)")
    overwrite: bool = _option(False, "start afresh in an --out that holds another run, deleting that run's "
                                     "files (without it, a run without --resume is refused there)")
    mixed_precision: str = _option("no", "frozen weights and autocast in this precision; the LoRA, its "
                                         "optimizer state and the regularizer stay fp32 (fp16: CUDA only)",
                                   choices=("no", "fp16", "bf16"))
    num_workers: int = _option(4, "data loader processes per rank")
    gradient_checkpointing: bool = _option(False, "recompute UNet blocks in backward to save memory")
    threads: int = _option(None, "torch CPU threads (default: torch's choice; 1 in the toy world, where a "
                                 "second thread gains ~6%% on an idle 2-core CPU but costs 3x beside another "
                                 "busy process)")


# --lora-targets -> (inject_lora's targets, save_lora's layout): the official layout names attention only.
LORA_TARGETS = {"attention": (lora.ATTENTION_TARGETS, "official"), "all-linear": (None, "peft")}


def build_parser(defaults=None):
    """One flag per TrainConfig field; `defaults` (name -> value) replaces the dataclass defaults."""
    from toy import main_job  # the toy world's defaults, shown in --help

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    toy = main_job.toy_defaults()
    for f in dataclasses.fields(TrainConfig):
        flag, extra = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.name in toy:
            extra["help"] += f"; toy world (no --model): {toy[f.name]}"
        default = f.default if defaults is None else defaults[f.name]
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", default=default, **extra)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=kind, default=default, **extra)
    return p


def parse_args(argv):
    """-> (TrainConfig, the names of the fields given on the command line); a number out of its range ends
    here, before torch threads or the toy world use it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    try:
        runstate.check_numbers(cfg)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")
    # A second parse with every default suppressed holds only the flags the user gave.
    given = build_parser(defaults={f.name: argparse.SUPPRESS for f in dataclasses.fields(TrainConfig)})
    return cfg, set(vars(given.parse_args(argv)))


def check_model_limits(cfg, sd):
    """Flags the loaded model bounds: the resolution must pass the VAE's and the UNet's downsamplings; DDIM
    steps and timestep buckets are at most the schedule's T -> the latent shape."""
    steps = sampler.make_schedule(sd.scheduler_config).num_train_timesteps
    for name in ("validation_steps", "reg_timestep_buckets"):
        if getattr(cfg, name) > steps:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: this model's schedule has {steps} "
                             f"timesteps; use 1 to {steps}.")
    vae_factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)  # 8 for SD-1.5
    unet_factor = 2 ** (len(sd.unet.config.block_out_channels) - 1)  # 8 for SD-1.5
    multiple = vae_factor * unet_factor
    if cfg.resolution % multiple:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of {multiple} (this model's VAE "
                         f"downsamples by {vae_factor} and its UNet by {unet_factor}): use e.g. "
                         f"{max(multiple, round(cfg.resolution / multiple) * multiple)}.")
    return (sd.unet.config.in_channels, cfg.resolution // vae_factor, cfg.resolution // vae_factor)


# ---------------------------------------------------------- data, model and LoRA

def load_inputs(cfg, world, out):
    """Everything that can be wrong with the input fails here, before anything is written but OUT's lock ->
    (dataset, its fingerprint, sd, the state to resume from or None, latent shape, the lock)."""
    lock, new_folder = None, not out.exists()
    try:
        runstate.check_config(cfg, world.device)
        lock = runstate.lock_out(out, world)  # from here on, no other run writes to OUT
        resume = out / "state.pt" if cfg.resume == "auto" else cfg.resume and Path(cfg.resume)
        if resume is not None and not resume.exists():
            if cfg.resume != "auto":
                raise ValueError(f"--resume {resume} does not exist.")
            resume = None  # auto: nothing to continue, start afresh
        state = None if resume is None else runstate.read_state(resume)
        changes = {} if state is None else runstate.resume_changes(cfg, state["config"])
        dataset = data.CaptionDataset(cfg.data, cfg.resolution, root=cfg.data_root)
        fingerprint = data.fingerprint(dataset.items, dataset.root)
        if state is not None:
            changes.update(runstate.data_change(cfg, state, fingerprint))
        sd = checkpoint.load_models(cfg.model, tokenizer=cfg.tokenizer, device=world.device,
                                    dtype=frozen_dtype(cfg))
        latent_shape = check_model_limits(cfg, sd)
        if state is None:
            runstate.check_fresh_start(out, cfg.overwrite)  # last: a wrong input is named first
    except (ValueError, OSError) as e:
        runstate.unlock_out(lock, remove_folder=new_folder)
        raise SystemExit(f"train.py: error: {e}")
    if state is not None and world.master:
        print(f"resumed from {resume} at step {state['step']}" + "".join(
            f"; {k} {old} -> {new} (--resume-override)" for k, (old, new) in changes.items()))
    return dataset, fingerprint, sd, state and dict(state, changes=changes), latent_shape, lock


def frozen_dtype(cfg):
    return dict(no=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)[cfg.mixed_precision]


def add_lora(cfg, sd, world, num_train_timesteps):
    """Frozen SD-1.5 + a trainable fp32 LoRA on the UNet's attention projections -> (params, reg, optimizer,
    scaler)."""
    torch.manual_seed(cfg.seed)  # the LoRA init; identical on every rank
    for part in (sd.unet, sd.vae, sd.text_encoder):
        part.requires_grad_(False).eval()
    lora.inject_lora(sd.unet, rank=cfg.rank, targets=LORA_TARGETS[cfg.lora_targets][0])
    lora_params = lora.freeze_all_but_lora(sd.unet)  # fp32, whatever the frozen weights' dtype
    if cfg.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
    sd.unet.train()
    # Lazy regularization updates a only every k-th step: compound the decay so that a keeps pace.
    reg = regularizer.StepwiseVariationRegularizer(
        decay=1 - (1 - cfg.reg_decay) ** cfg.reg_every, timestep_buckets=cfg.reg_timestep_buckets,
        num_train_timesteps=num_train_timesteps, relative=cfg.reg_normalize == "relative").to(world.device).train()
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(world.device.type, enabled=cfg.mixed_precision == "fp16")
    return lora_params, reg, optimizer, scaler


def make_loader(cfg, dataset, samples_seen, world):
    """Batches from the global seeded stream at `samples_seen`, this rank's slice of each global batch."""
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, collate_fn=data.collate, num_workers=cfg.num_workers,
        worker_init_fn=data.ignore_stop_signals,
        sampler=data.stream_keys(len(dataset), cfg.seed, samples_seen, world.rank, world.size, cfg.batch_size),
        pin_memory=world.device.type == "cuda"))


def make_autocast(cfg, device):
    """A function returning the autocast context of --mixed-precision (a no-op for "no")."""
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=frozen_dtype(cfg))


# ------------------------------------------- the loss: Eq. 14 on one micro-batch

def smooth_diffusion_loss(unet, latents, noise, timesteps, text, direction, alphas_cumprod, *, reg=None,
                          reg_mode="vjp", reg_batch_frac=1.0, lambda_reg=1.0, lazy_scale=1, fd_h=1e-2,
                          reg_normalize="none", autocast=contextlib.nullcontext):
    """Eq. 14 for one micro-batch -> (loss, base loss, reg loss, mean variation norm).

    latents z0, noise eps, direction u: [B, C, h, w]; timesteps, text: per sample. reg_mode "vjp" is
    Eq. 10 by double backward (the paper), "fd" its finite difference (step fd_h relative to the noise's
    expected norm), "none" the plain eps-MSE. reg_normalize "analytic" divides the norm by
    regularizer.identity_path_scale (not in the paper). The first ceil(reg_batch_frac * B) samples are regularized,
    and the penalty is scaled by lambda_reg and by lazy_scale (k of --reg-every k). `reg` is the
    StepwiseVariationRegularizer holding the running mean a of Eq. 9 (updated in training mode).
    """
    abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise  # Eq. 2
    b = len(timesteps)
    n = math.ceil(reg_batch_frac * b) if reg_mode != "none" else 0  # the first n samples are regularized
    sigma = (1 - abar[:n]).sqrt().flatten()  # sqrt(1 - abar_t) of Eq. 9/10

    def forward(x, sl, double_backward=False):
        with ops.double_backward(double_backward), autocast():
            return unet(x, timesteps[sl], text[sl]).float()

    if reg_mode == "vjp":
        # Fig. 2(d): x_t of the regularized samples as a function of their noise, the leaf of Eq. 10.
        noise_reg = noise[:n].clone().requires_grad_()
        x_reg = abar[:n].sqrt() * latents[:n] + (1 - abar[:n]).sqrt() * noise_reg  # Eq. 2
        eps_reg = forward(x_reg, slice(0, n), double_backward=True)
        # The others get a separate plain forward, so the double backward costs only n samples.
        eps_pred = torch.cat([eps_reg, forward(x_t[n:], slice(n, b))]) if n < b else eps_reg
        x0_pred = regularizer.predict_x0(x_reg, eps_reg, abar[:n].flatten())
        norms = regularizer.variation_norm(x0_pred, noise_reg, sigma, direction[:n])  # Eq. 10
    elif reg_mode == "fd":  # one batched forward for x_t and for x_t(eps + h v)
        h = fd_h * math.sqrt(noise[0].numel())
        v = direction[:n] / direction[:n].flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # unit length
        x_shift = abar[:n].sqrt() * latents[:n] + (1 - abar[:n]).sqrt() * (noise[:n] + h * v)  # Eq. 2
        with ops.double_backward(False), autocast():
            eps_all = unet(torch.cat([x_t, x_shift]), torch.cat([timesteps, timesteps[:n]]),
                           torch.cat([text, text[:n]])).float()
        eps_pred = eps_all[:b]
        x0_pred = regularizer.predict_x0(x_t[:n], eps_pred[:n], abar[:n].flatten())
        x0_shift = regularizer.predict_x0(x_shift, eps_all[b:], abar[:n].flatten())
        norms = regularizer.fd_variation_norm(x0_pred, x0_shift, h, sigma)
    elif reg_mode == "none":
        eps_pred = forward(x_t, slice(0, b))
    else:
        raise ValueError(f"reg_mode must be vjp, fd or none, got {reg_mode!r}")
    loss_base = F.mse_loss(eps_pred, noise)  # L_base of Eq. 14
    if reg_mode == "none":
        zero = loss_base.new_zeros(())
        return loss_base, loss_base.detach(), zero, zero
    if reg_normalize == "analytic":  # leaves ||(I - sigma D)^T u||, see regularizer.identity_path_scale
        norms = norms / regularizer.identity_path_scale(abar[:n].flatten())
    loss_reg = reg.penalty(norms, timesteps[:n])  # Eq. 9 (updates the running mean a, averaged over ranks)
    loss = loss_base + lambda_reg * lazy_scale * loss_reg  # Eq. 14, lazy: scaled by k
    return loss, loss_base.detach(), loss_reg.detach(), norms.detach().mean()


def micro_step(cfg, ddp_unet, sd, reg, batch, schedule, regularize, device, autocast):
    """The data part of a micro-step (VAE encode, per-sample randomness), then Eq. 14 ->
    (loss, base loss, reg loss, mean variation norm). `ddp_unet` is the UNet, DDP-wrapped when distributed;
    `sd` holds the frozen VAE and text encoder."""
    with torch.no_grad(), autocast():
        pixels = batch["pixels"].to(device, next(sd.vae.parameters()).dtype)
        mean, logvar = sd.vae.encode(pixels)
        text = sd.encode_prompt(batch["captions"])
    t, noise, direction, posterior = data.per_sample_randomness(cfg.seed, batch["keys"], mean.shape[1:],
                                                                schedule.num_train_timesteps)
    t, noise, direction, posterior = (x.to(device) for x in (t, noise, direction, posterior))
    # The VAE posterior sample, as the official code (.sample()), seeded per sample like the noise.
    latents = (mean.float() + (0.5 * logvar.float()).exp() * posterior) * sd.vae.scaling_factor
    if cfg.reg_direction == "trajectory":
        direction = regularizer.trajectory_direction(latents, noise, t, schedule.alphas_cumprod.to(device))
    return smooth_diffusion_loss(
        ddp_unet, latents, noise, t, text, direction, schedule.alphas_cumprod.to(device), reg=reg,
        reg_mode=cfg.reg_mode if regularize else "none", reg_batch_frac=cfg.reg_batch_frac,
        lambda_reg=cfg.lambda_reg, lazy_scale=cfg.reg_every, fd_h=cfg.fd_h, reg_normalize=cfg.reg_normalize,
        autocast=autocast)


# ------------------------------------------------------------- the training loop

def accumulate_gradients(cfg, ddp_unet, sd, reg, batches, schedule, regularize, world, autocast, scaler,
                         skipped):
    """grad_accum micro-steps; gradients are all-reduced only on the last -> mean stats over micro-steps
    (loss, base loss, reg loss, variation norm)."""
    stats = torch.zeros(4, device=world.device)
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        for path in batch["skipped"]:
            if path not in skipped:
                skipped.add(path)
                tqdm.write(f"skipping unreadable image {path}", file=sys.stderr)
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if last or not world.distributed else ddp_unet.no_sync():
            loss, loss_base, loss_reg, norm = micro_step(
                cfg, ddp_unet, sd, reg, batch, schedule, regularize, world.device, autocast)
            scaler.scale(loss / cfg.grad_accum).backward()
        stats += torch.stack([loss.detach(), loss_base, loss_reg, norm]) / cfg.grad_accum
    return stats


def optimizer_step(optimizer, scaler, params, loss):
    """Clip to norm 1 and step -> the gradient norm, or None (no step) if the loss or gradient is not finite.
    (With fp16 the scaler skips steps with inf gradients by itself; a non-finite loss still stops.)"""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    if not math.isfinite(loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
        return None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train(cfg, world):
    """One whole training run of `cfg` (a Smooth-LoRA, or with lambda_reg 0 its plain-LoRA control)."""
    out = Path(cfg.out or "out")
    dataset, fingerprint, sd, state, latent_shape, lock = load_inputs(cfg, world, out)
    try:
        return train_loaded(cfg, world, out, dataset, fingerprint, sd, state, latent_shape)
    finally:
        runstate.unlock_out(lock)


def train_loaded(cfg, world, out, dataset, fingerprint, sd, state, latent_shape):
    """The run of `train`, once its inputs are checked and loaded and OUT is locked."""
    if state is None and cfg.overwrite and world.master:
        runstate.discard_run(out)
    schedule = sampler.make_schedule(sd.scheduler_config)
    lora_params, reg, optimizer, scaler = add_lora(cfg, sd, world, schedule.num_train_timesteps)
    step, samples_seen, skipped = (0, 0, set()) if state is None else runstate.restore(
        state, cfg, sd.unet, optimizer, scaler, reg)
    ddp_unet = DDP(sd.unet, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                   find_unused_parameters=False) if world.distributed else sd.unet
    autocast = make_autocast(cfg, world.device)
    layout = LORA_TARGETS[cfg.lora_targets][1]  # of the saved LoRA files
    batches = make_loader(cfg, dataset, samples_seen, world)
    stop = runstate.catch_stop_signals()
    if world.master:
        log_path = runstate.start_log(cfg, out, state, world, len(dataset), lora_params)
        if state is None and cfg.validate_every:  # the base model's strips: where smoothing starts from
            strips = runstate.validate(cfg, sd, schedule, latent_shape, 0, out, world, autocast)
            runstate.append_log(log_path, dict(step=0, **strips))
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not world.master, dynamic_ncols=True)
    start_step, t0, exit_code = step, time.time(), 0
    while step < cfg.max_steps:
        regularize = cfg.lambda_reg > 0 and step % cfg.reg_every == 0
        stats = accumulate_gradients(cfg, ddp_unet, sd, reg, batches, schedule, regularize, world, autocast,
                                     scaler, skipped)
        samples_seen += cfg.grad_accum * world.size * cfg.batch_size
        (loss, loss_base, loss_reg, norm), stop_signal = runstate.reduce_over_ranks(stats, stop, world)
        grad_norm = optimizer_step(optimizer, scaler, lora_params, loss)
        if grad_norm is None:
            if world.master:
                tqdm.write(f"train.py: loss is {loss} at step {step + 1} (base {loss_base}, reg {loss_reg}); "
                           f"stopping. The last good checkpoint in {out} is kept; try a lower --lr or "
                           "--mixed-precision no/bf16.", file=sys.stderr)
            exit_code = 1
            break
        step += 1
        a = reg.a.mean().item()  # with timestep buckets: their mean (each bucket in a_per_bucket)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", reg=f"{loss_reg:.3g}", var=f"{norm:.3g}", a=f"{a:.3g}")
        if world.master:
            record = dict(step=step, loss=loss, loss_base=loss_base, loss_reg=loss_reg, var_norm=norm,
                          a=a, regularized=regularize, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"],
                          samples_seen=samples_seen, time=round(time.time() - t0, 3))
            if reg.a.ndim:
                record["a_per_bucket"] = [round(x, 6) for x in reg.a.tolist()]
            if runstate.due(step, cfg.validate_every, cfg.max_steps):
                record.update(runstate.validate(cfg, sd, schedule, latent_shape, step, out, world, autocast))
            runstate.append_log(log_path, record)
            if runstate.due(step, cfg.snapshot_every, 0):
                runstate.save_snapshot(out, sd.unet, step, cfg.keep_snapshots, layout)
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop_signal:
            skipped = runstate.all_gather_union(skipped, world)
            if world.master:
                runstate.save_checkpoint(out, sd.unet, optimizer, scaler, reg, step, samples_seen, cfg, skipped,
                                         layout, fingerprint)
        if stop_signal:
            if world.master:
                tqdm.write(f"stopped by signal {stop_signal} at step {step}; checkpoint saved in {out} "
                           "(continue with --resume)")
            exit_code = 128 + stop_signal  # 143 for SIGTERM, 130 for Ctrl-C: a scheduler sees "not finished"
            break
    bar.close()
    skipped = runstate.all_gather_union(skipped, world)
    if world.master:
        runstate.print_summary(cfg, step - start_step, step, time.time() - t0, skipped, world, out)
    del ddp_unet  # DDP's reducer must go before its process group (else gloo may abort at exit)
    return runstate.TrainResult(exit_code, step, out)


def main(argv=None):
    cfg, explicit = parse_args(argv)
    world = runstate.setup_distributed(cfg)
    if cfg.model is None:  # the toy world: its lambda-0 control, this Smooth-LoRA, then the paired report
        from toy import main_job

        return main_job.run(cfg, explicit, world, train)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = train(cfg, world)
    runstate.teardown_distributed(world)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
