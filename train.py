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
`--resume-override` names them, and then the optimizer uses the new values. SIGTERM / Ctrl-C save a
checkpoint and exit 143 / 130.

Watching a long run: `--validate-every N --validation-prompts FILE` writes an interpolation strip per
prompt (fixed noise pairs, `--validation-steps` DDIM steps) to OUT/validation/step-N.png, their ISTD
and mean adjacent distance to log.jsonl, and all steps stacked to OUT/validation/progress.png (rank 0;
the training RNG is untouched, so a resume stays exact). `--snapshot-every N` keeps
OUT/smooth_lora-stepN.safetensors (the newest `--keep-snapshots K`). `--mixed-precision bf16` runs on
CPU and GPU (frozen weights bf16; LoRA, AdamW state and a stay fp32); fp16 needs CUDA.

Cheaper regularizer variants (not in the paper): `--reg-every k` regularizes every k-th step with the
loss scaled by k (StyleGAN2's lazy regularization); `--reg-batch-frac f` regularizes only the first
ceil(f * B) samples of each micro-batch; `--reg-mode fd` replaces the vector-Jacobian product of
Eq. 10 by a finite difference (a second forward pass at eps + h v, no double backward).
`--reg-timestep-buckets N` (not in the paper) keeps a running mean a per range of timesteps: the
norm's scale grows by orders of magnitude with t, which a single a cannot follow.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image
from tqdm import tqdm

import checkpoint
import data
import lora
import metrics
import ops
import regularizer
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
    mixed_precision: str = _option("no", "frozen weights and autocast in this precision; the LoRA, its "
                                         "optimizer state and the regularizer stay fp32 (fp16: CUDA only)",
                                   choices=("no", "fp16", "bf16"))
    num_workers: int = _option(4, "data loader processes per rank")
    gradient_checkpointing: bool = _option(False, "recompute UNet blocks in backward to save memory")
    threads: int = _option(None, "torch CPU threads (default: torch's choice; 1 in the toy world, where a "
                                 "second thread gains ~6%% on an idle 2-core CPU but costs 3x beside another "
                                 "busy process)")


# Settings that change what a run optimizes: a --resume with other values is refused unless overridden.
OPTIMIZATION_SETTINGS = ("model", "data", "data_root", "resolution", "batch_size", "grad_accum", "lr",
                         "weight_decay", "rank", "lora_targets", "lambda_reg", "reg_every", "reg_decay",
                         "reg_timestep_buckets", "reg_normalize", "reg_mode", "reg_batch_frac", "fd_h", "seed",
                         "mixed_precision")
SHAPE_SETTINGS = ("rank", "lora_targets", "reg_timestep_buckets")  # never changed by --resume-override
NEWER_SETTINGS = dict(reg_normalize="none", lora_targets="attention")  # older checkpoints trained like this
# --lora-targets -> (inject_lora's targets, save_lora's layout): the official layout names attention only.
LORA_TARGETS = {"attention": (lora.ATTENTION_TARGETS, "official"), "all-linear": (None, "peft")}


def saved_settings(config):
    """A checkpoint's config, with the settings added after it was written at the values it trained with."""
    return {**NEWER_SETTINGS, **config}


# The toy world's validation defaults, unless main_job.TRAIN_DEFAULTS sets them.
TOY_VALIDATION = dict(validate_every=50)


def toy_defaults():
    """The values a run without --model uses where no flag is given (main_job.TRAIN_DEFAULTS)."""
    from toy import main_job

    return {**TOY_VALIDATION, **main_job.TRAIN_DEFAULTS}


def build_parser(defaults=None):
    """One flag per TrainConfig field; `defaults` (name -> value) replaces the dataclass defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    toy = toy_defaults()
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
    """-> (TrainConfig, the names of the fields given on the command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    # A second parse with every default suppressed holds only the flags the user gave.
    given = build_parser(defaults={f.name: argparse.SUPPRESS for f in dataclasses.fields(TrainConfig)})
    return cfg, set(vars(given.parse_args(argv)))


def check_config(cfg, device):
    """Errors in flag values, before any data or model is touched."""
    for name in ("batch_size", "grad_accum", "max_steps", "rank", "reg_every", "save_every",
                 "reg_timestep_buckets", "validation_steps", "resolution"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    for name in ("seed", "snapshot_every", "keep_snapshots", "validate_every", "num_workers"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(cfg, name)}.")
    if not 0 < cfg.reg_decay <= 1:
        raise ValueError(f"--reg-decay must be in (0, 1], got {cfg.reg_decay}.")
    if not 0 < cfg.reg_batch_frac <= 1:
        raise ValueError(f"--reg-batch-frac must be in (0, 1], got {cfg.reg_batch_frac}.")
    if cfg.model is not None and cfg.data is None:
        raise ValueError("--data is required with --model (an image folder or a .jsonl file).")
    if cfg.model is not None and Path(cfg.model).is_file() and cfg.tokenizer is None:
        raise ValueError(f"--model {cfg.model} is a single-file checkpoint, and those carry no tokenizer: "
                         "pass --tokenizer FOLDER, a folder with vocab.json and merges.txt (e.g. SD-1.5's "
                         "tokenizer/).")
    if cfg.validate_every and cfg.validation_prompts is None:
        raise ValueError("--validate-every needs --validation-prompts FILE (one prompt per line).")
    if cfg.validation_prompts is not None and not Path(cfg.validation_prompts).is_file():
        raise ValueError(f"--validation-prompts {cfg.validation_prompts} is not a file.")
    unknown = set(overridden(cfg)) - set(OPTIMIZATION_SETTINGS)
    if unknown:
        raise ValueError(f"--resume-override {cfg.resume_override}: {', '.join(sorted(unknown))} is not a "
                         f"setting a resume checks; those are {', '.join(OPTIMIZATION_SETTINGS)}.")
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU (CPU autocast has no fp16); use "
                         "--mixed-precision bf16 or no.")


def check_resolution(cfg, sd):
    """The resolution must pass the VAE's and the UNet's downsamplings of the loaded model."""
    vae_factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)  # 8 for SD-1.5
    unet_factor = 2 ** (len(sd.unet.config.block_out_channels) - 1)  # 8 for SD-1.5
    multiple = vae_factor * unet_factor
    if cfg.resolution % multiple:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of {multiple} (this model's VAE "
                         f"downsamples by {vae_factor} and its UNet by {unet_factor}): use e.g. "
                         f"{max(multiple, round(cfg.resolution / multiple) * multiple)}.")
    return (sd.unet.config.in_channels, cfg.resolution // vae_factor, cfg.resolution // vae_factor)


def resolve_device(cfg, local_rank):
    """--device, default cuda when available; cuda means cuda:LOCAL_RANK under torchrun."""
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device: use cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but this machine has no usable CUDA GPU "
                         "(torch.cuda.is_available() is False): use --device cpu, or leave --device out.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: train.py runs on cpu or cuda.")
    return torch.device("cuda", local_rank if device.index is None else device.index) \
        if device.type == "cuda" else device


def overridden(cfg):
    return [name for name in (cfg.resume_override or "").split(",") if name]


# ------------------------------------------------------------------------------ the toy world (toy.py)

def use_toy_world(cfg, explicit, master):
    """No --model: train on the toy world (toy.py), with its smaller defaults unless a flag was given,
    and validation strips on 4 of its held-out prompts."""
    from toy import world

    cfg.model = str(ROOT / "assets" / "toy-sd")
    for name, value in toy_defaults().items():
        if name not in explicit:
            setattr(cfg, name, value)
    if cfg.data is None:
        cfg.data = str(ROOT / "data" / "toy")
        if master:
            try:
                world.prepare_data(cfg.data)  # writes the images once; then checks they are this toy.py's
            except ValueError as e:
                raise SystemExit(f"train.py: error: {e}")
    if cfg.out is None:
        cfg.out = str(ROOT / "runs" / "toy")
    if cfg.validate_every and cfg.validation_prompts is None:
        cfg.validation_prompts = str(Path(cfg.out) / "validation" / "prompts.txt")
        if master:
            every = world.heldout_prompts()  # spread over the held-out triples, alternating sizes
            Path(cfg.validation_prompts).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.validation_prompts).write_text("".join(every[k * len(every) // 4 + k % 2] + "\n"
                                                            for k in range(4)))


def control_config(cfg):
    """The lambda-0 control of a toy-world run: the same flags, data, seed and steps, without the
    regularizer, in OUT/control. Fine-tuning alone moves ISTD, so the Smooth-LoRA is judged against it."""
    return dataclasses.replace(cfg, lambda_reg=0.0, out=str(Path(cfg.out) / "control"), resume=None,
                               validate_every=0)  # the Smooth-LoRA's run shows the validation strips


def finished_run(cfg):
    """True when cfg.out already holds a finished run of exactly this config (reused, not retrained)."""
    state_path = Path(cfg.out) / "state.pt"
    if not state_path.is_file():
        return False
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: train it again
        return False
    same = {k: v for k, v in saved_settings(state.get("config", {})).items() if k != "resume"} == \
        {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    return same and state.get("step") == cfg.max_steps


def report_toy_world(cfg, control_out, result):
    """After a finished toy-world run: toy.py's paired report, Smooth-LoRA against the lambda-0 control."""
    from toy import report

    loras = {"control": str(Path(control_out) / "smooth_lora.safetensors") if control_out else None,
             "smooth": str(result.lora_path)}
    if control_out is None:  # the run itself has lambda 0: compare it with the base model instead
        loras = {"base": None, "lora (lambda 0)": str(result.lora_path)}
    report.report(cfg.model, loras, cfg.out, reference=next(iter(loras)))


# ------------------------------------------------------------------------------ one micro-step

def per_sample_randomness(seed, keys, shape, num_train_timesteps):
    """Timestep, noise, regularizer direction and VAE posterior noise for each sample.

    Drawn from a generator seeded by (seed, key), with key = the sample's position in the global data
    stream, so they do not depend on the rank, the world size or the micro-batch split.
    """
    t, noise, direction, posterior = [], [], [], []
    for key in keys.tolist():
        g = torch.Generator().manual_seed(data.derive_seed(seed, data.SAMPLE_STREAM, key))
        t.append(torch.randint(0, num_train_timesteps, (), generator=g))  # t ~ U{0..T-1}, as the official code
        noise.append(torch.randn(shape, generator=g))
        direction.append(torch.randn(shape, generator=g))
        posterior.append(torch.randn(shape, generator=g))
    return torch.stack(t), torch.stack(noise), torch.stack(direction), torch.stack(posterior)


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
    t, noise, direction, posterior = per_sample_randomness(cfg.seed, batch["keys"], mean.shape[1:],
                                                           schedule.num_train_timesteps)
    t, noise, direction, posterior = (x.to(device) for x in (t, noise, direction, posterior))
    # The VAE posterior sample, as the official code (.sample()), seeded per sample like the noise.
    latents = (mean.float() + (0.5 * logvar.float()).exp() * posterior) * sd.vae.scaling_factor
    return smooth_diffusion_loss(
        ddp_unet, latents, noise, t, text, direction, schedule.alphas_cumprod.to(device), reg=reg,
        reg_mode=cfg.reg_mode if regularize else "none", reg_batch_frac=cfg.reg_batch_frac,
        lambda_reg=cfg.lambda_reg, lazy_scale=cfg.reg_every, fd_h=cfg.fd_h, reg_normalize=cfg.reg_normalize,
        autocast=autocast)


# ------------------------------------------------------------------------------ checkpoints

STATE_KEYS = {"lora", "optimizer", "scaler", "regularizer", "step", "samples_seen", "rng", "config", "skipped"}


def atomic_save(path, write):
    """write(tmp) then rename: a kill at any moment leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out, unet, optimizer, scaler, reg, step, samples_seen, cfg, skipped):
    layout = LORA_TARGETS[cfg.lora_targets][1]
    atomic_save(out / "smooth_lora.safetensors", lambda p: lora.save_lora(unet, p, layout=layout))
    state = {
        "lora": {k: v.detach().cpu() for k, v in unet.named_parameters() if v.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "regularizer": reg.state_dict(),  # the running mean a (the official script loses it)
        "step": step,
        "samples_seen": samples_seen,  # data position: the next global stream position
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": dataclasses.asdict(cfg),
        "skipped": sorted(skipped),
    }
    atomic_save(out / "state.pt", lambda p: torch.save(state, p))


def save_snapshot(out, unet, step, keep, layout):
    """OUT/smooth_lora-step{N}.safetensors, then the oldest removed beyond the newest `keep` (0: keep all)."""
    atomic_save(out / f"smooth_lora-step{step}.safetensors", lambda p: lora.save_lora(unet, p, layout=layout))
    snapshots = sorted(out.glob("smooth_lora-step*.safetensors"), key=lambda p: int(p.stem.split("-step")[1]))
    for old in snapshots[:-keep] if keep else []:
        old.unlink()


def read_state(path):
    """state.pt -> dict; ValueError (the file untouched) if it is not a whole train.py checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a hostile pickle: torch raises many types
        # Not torch's advice to retry with weights_only=False: that would run whatever code a pickle holds.
        reason = ("the safe loader refused it: not tensors only" if isinstance(e, pickle.UnpicklingError)
                  else str(e).strip().split(". ")[0][:160])
        raise ValueError(f"cannot resume from {path}: it is not a readable train.py checkpoint "
                         f"({type(e).__name__}: {reason}). Truncated or overwritten? Point --resume at "
                         "another state.pt, or start afresh in a new --out (the file is left as it is).") from None
    missing = STATE_KEYS - set(state) if isinstance(state, dict) else STATE_KEYS
    if missing:
        raise ValueError(f"cannot resume from {path}: it lacks {', '.join(sorted(missing))}; it is not a "
                         "state.pt written by train.py.")
    return state


def _same_setting(name, saved, now):
    if name in ("model", "data", "data_root") and saved is not None and now is not None:
        return Path(saved).resolve() == Path(now).resolve()
    return saved == now


def resume_changes(cfg, saved_config):
    """{setting: (saved, now)} for the optimization settings that differ; ValueError for those not named
    by --resume-override (a resume does not silently train something else)."""
    saved_config = saved_settings(saved_config)
    changes = {name: (saved_config.get(name), getattr(cfg, name)) for name in OPTIMIZATION_SETTINGS
               if not _same_setting(name, saved_config.get(name), getattr(cfg, name))}
    refused = {k: v for k, v in changes.items() if k not in overridden(cfg) or k in SHAPE_SETTINGS}
    if refused:
        listed = "; ".join(f"--{k.replace('_', '-')}: saved {old}, now {new}" for k, (old, new) in refused.items())
        raise ValueError(f"--resume: the checkpoint was trained with other settings ({listed}). Resume with "
                         "the saved values, or name the settings to change with --resume-override "
                         f"{','.join(refused)} ({', '.join(SHAPE_SETTINGS)} cannot change: they "
                         "fix the shapes of the LoRA and of a).")
    return changes


def restore(state, cfg, unet, optimizer, scaler, reg):
    """Load the LoRA, optimizer, scaler, running mean a and RNG of `state`; the optimizer then uses the
    current lr and weight decay (equal to the saved ones unless overridden)."""
    params = {k: v for k, v in unet.named_parameters() if v.requires_grad}
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if shapes != {k: tuple(v.shape) for k, v in state["lora"].items()}:
        raise ValueError("the checkpoint holds a LoRA of other names or shapes (another --rank or model?).")
    with torch.no_grad():
        for k, v in state["lora"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler.load_state_dict(state["scaler"])
    reg.load_state_dict(state["regularizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["samples_seen"], set(state["skipped"])


# ------------------------------------------------------------------------------ validation strips

@torch.no_grad()
def validate(cfg, sd, schedule, latent_shape, step, out, world, autocast):
    """Rank 0: one interpolation strip per validation prompt with the current LoRA (the same noise pairs
    every time) -> {istd, mean_adjacent_distance} (means over prompts); OUT/validation/step-N.png and
    progress.png. The training RNG is left as it was, so a resumed run stays bit-exact."""
    prompts = [line.strip() for line in Path(cfg.validation_prompts).read_text().splitlines() if line.strip()]
    with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []), autocast():
        strips = sampler.interpolation_strips(sd.unet, sd.vae, sd.encode_prompt, prompts,
                                              latent_shape=latent_shape, steps=cfg.validation_steps,
                                              schedule=schedule, progress=False).float().cpu()
    folder = out / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    _grid(strips).save(folder / f"step-{step}.png")  # a row per prompt, a column per frame
    stages = sorted((int(p.stem.split("-")[1]), p) for p in folder.glob("step-*.png"))
    stages = [Image.open(p).convert("RGB") for n, p in stages if n <= step]  # a resume rewrites later ones
    progress = Image.new("RGB", (max(im.width for im in stages), sum(im.height + 2 for im in stages)), "white")
    for k, im in enumerate(stages):
        progress.paste(im, (0, sum(s.height + 2 for s in stages[:k])))
    progress.save(folder / "progress.png")
    return {"istd": sum(metrics.istd(s) for s in strips) / len(strips),
            "mean_adjacent_distance": sum(metrics.adjacent_distances(s).mean().item() for s in strips) / len(strips)}


def _grid(strips):
    """[P, F, 3, H, W] in [0, 1] -> one PIL image, P rows of F frames."""
    p, f, c, h, w = strips.shape
    grid = strips.permute(0, 3, 1, 4, 2).reshape(p * h, f * w, c)  # [P*H, F*W, 3]
    return Image.fromarray((grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


# ------------------------------------------------------------------------------ processes and logs

@dataclass
class World:
    """This process's place among the torchrun processes (a world of one without torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def master(self):
        return self.rank == 0


def process_group_backend(device):
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup_distributed(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is a world of one."""
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", 0))
    try:
        device = resolve_device(cfg, local_rank)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")
    world = World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), local_rank, device, "RANK" in env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world.distributed:
        dist.init_process_group(process_group_backend(device))
    return world


def teardown_distributed(world):
    if world.distributed:
        dist.barrier()
        dist.destroy_process_group()


def all_gather_union(items, world):
    if world.size == 1:
        return set(items)
    gathered = [None] * world.size
    dist.all_gather_object(gathered, sorted(items))
    return set().union(*gathered)


def open_log(out, resumed_at):
    """OUT/log.jsonl, one JSON record per step; a resume drops the lines of steps after its checkpoint."""
    log_path = out / "log.jsonl"
    if resumed_at is not None and log_path.exists():
        lines = log_path.read_text().splitlines()
        log_path.write_text("".join(l + "\n" for l in lines if json.loads(l).get("step", 0) <= resumed_at))
    elif resumed_at is None:
        log_path.write_text("")
    return log_path


def append_log(log_path, record):
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA max allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS"


def catch_stop_signals():
    """SIGTERM / Ctrl-C: finish the step, save, exit 128 + signal. Returns where the signal is recorded."""
    stop = {"signal": 0}
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.update(signal=signum))
    return stop


# ------------------------------------------------------------------------------ the training run

def load_inputs(cfg, world, out):
    """Everything that can be wrong with the input fails here, before anything is written ->
    (dataset, sd, the state to resume from or None, latent shape)."""
    try:
        check_config(cfg, world.device)
        resume = out / "state.pt" if cfg.resume == "auto" else cfg.resume and Path(cfg.resume)
        if resume is not None and not resume.exists():
            if cfg.resume != "auto":
                raise ValueError(f"--resume {resume} does not exist.")
            resume = None  # auto: nothing to continue, start afresh
        state = None if resume is None else read_state(resume)
        changes = {} if state is None else resume_changes(cfg, state["config"])
        dataset = data.CaptionDataset(cfg.data, cfg.resolution, root=cfg.data_root)
        sd = checkpoint.load_models(cfg.model, tokenizer=cfg.tokenizer, device=world.device,
                                    dtype=frozen_dtype(cfg))
        latent_shape = check_resolution(cfg, sd)
    except (ValueError, OSError) as e:
        raise SystemExit(f"train.py: error: {e}")
    if state is not None and world.master:
        print(f"resumed from {resume} at step {state['step']}" + "".join(
            f"; {k} {old} -> {new} (--resume-override)" for k, (old, new) in changes.items()))
    return dataset, sd, state and dict(state, changes=changes), latent_shape


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


def reduce_over_ranks(stats, stop, world):
    """Mean of the step's stats over ranks, and one shared decision to stop: the signal any rank got."""
    signum = torch.tensor([stop["signal"]], device=world.device)
    if world.distributed:
        dist.all_reduce(stats)
        stats /= world.size
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    return stats.tolist(), int(signum.item())


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


@dataclass
class TrainResult:
    exit_code: int  # 0: finished; 1: a non-finite loss stopped it; 128 + signal: stopped by SIGTERM/SIGINT
    step: int  # the last optimizer step done
    out: Path

    @property
    def lora_path(self):
        return self.out / "smooth_lora.safetensors"


def due(step, every, last):
    return every > 0 and (step % every == 0 or step == last)


def train(cfg, world):
    """One whole training run of `cfg` (a Smooth-LoRA, or with lambda_reg 0 its plain-LoRA control)."""
    out = Path(cfg.out or "out")
    dataset, sd, state, latent_shape = load_inputs(cfg, world, out)
    schedule = sampler.make_schedule(sd.scheduler_config)
    lora_params, reg, optimizer, scaler = add_lora(cfg, sd, world, schedule.num_train_timesteps)
    step, samples_seen, skipped = (0, 0, set()) if state is None else restore(state, cfg, sd.unet, optimizer,
                                                                              scaler, reg)
    ddp_unet = DDP(sd.unet, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                   find_unused_parameters=False) if world.distributed else sd.unet
    autocast = make_autocast(cfg, world.device)
    batches = make_loader(cfg, dataset, samples_seen, world)
    stop = catch_stop_signals()
    if world.master:
        log_path = start_log(cfg, out, state, world, len(dataset), lora_params)
        if state is None and cfg.validate_every:  # the base model's strips: where smoothing starts from
            append_log(log_path, dict(step=0, **validate(cfg, sd, schedule, latent_shape, 0, out, world, autocast)))
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not world.master, dynamic_ncols=True)
    start_step, t0, exit_code = step, time.time(), 0
    while step < cfg.max_steps:
        regularize = cfg.lambda_reg > 0 and step % cfg.reg_every == 0
        stats = accumulate_gradients(cfg, ddp_unet, sd, reg, batches, schedule, regularize, world, autocast,
                                     scaler, skipped)
        samples_seen += cfg.grad_accum * world.size * cfg.batch_size
        (loss, loss_base, loss_reg, norm), stop_signal = reduce_over_ranks(stats, stop, world)
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
            if due(step, cfg.validate_every, cfg.max_steps):
                record.update(validate(cfg, sd, schedule, latent_shape, step, out, world, autocast))
            append_log(log_path, record)
            if due(step, cfg.snapshot_every, 0):
                save_snapshot(out, sd.unet, step, cfg.keep_snapshots, LORA_TARGETS[cfg.lora_targets][1])
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop_signal:
            skipped = all_gather_union(skipped, world)
            if world.master:
                save_checkpoint(out, sd.unet, optimizer, scaler, reg, step, samples_seen, cfg, skipped)
        if stop_signal:
            if world.master:
                tqdm.write(f"stopped by signal {stop_signal} at step {step}; checkpoint saved in {out} "
                           "(continue with --resume)")
            exit_code = 128 + stop_signal  # 143 for SIGTERM, 130 for Ctrl-C: a scheduler sees "not finished"
            break
    bar.close()
    skipped = all_gather_union(skipped, world)
    if world.master:
        print_summary(cfg, step - start_step, step, time.time() - t0, skipped, world, out)
    del ddp_unet  # DDP's reducer must go before its process group (else gloo may abort at exit)
    return TrainResult(exit_code, step, out)


def start_log(cfg, out, state, world, num_images, lora_params):
    """Rank 0: create OUT and its log.jsonl (trimmed to the checkpoint on a resume, with a record of the
    overridden settings), and print what is trained."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = open_log(out, None if state is None else state["step"])
    if state is not None and state["changes"]:
        append_log(log_path, dict(step=state["step"], resume_override={k: list(v) for k, v in state["changes"].items()}))
    print(f"training {sum(p.numel() for p in lora_params):,} LoRA parameters on {world.size} x "
          f"{world.device.type}, global batch {cfg.batch_size * world.size * cfg.grad_accum}, "
          f"{num_images} images -> {out}")
    return log_path


def print_summary(cfg, steps_done, step, elapsed, skipped, world, out):
    images = steps_done * cfg.grad_accum * world.size * cfg.batch_size
    print(f"skipped {len(skipped)} unreadable images" + (f": {sorted(skipped)[:5]}" if skipped else ""))
    print(f"done: {steps_done} steps (to step {step}) in {elapsed:.1f} s, "
          f"{images / max(elapsed, 1e-9):.2f} images/s, {peak_memory(world.device)}; LoRA in "
          f"{out / 'smooth_lora.safetensors'}")


def main(argv=None):
    cfg, explicit = parse_args(argv)
    world = setup_distributed(cfg)
    # ---- the toy world: no --model trains on toy.py's tiny SD with its defaults, then reports ----
    toy_world = cfg.model is None
    if toy_world:
        use_toy_world(cfg, explicit, world.master)
        if world.distributed:
            dist.barrier()  # rank 0 may have written the toy data
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    control = control_config(cfg) if toy_world and cfg.lambda_reg > 0 else None
    if control is not None and finished_run(control):
        if world.master:
            print(f"reusing the lambda-0 control in {control.out} (same flags, finished)")
    elif control is not None:
        if world.master:
            print(f"training the lambda-0 control first (same flags, --lambda-reg 0) in {control.out}")
        if train(control, world).exit_code != 0:
            teardown_distributed(world)
            return 1
    result = train(cfg, world)
    teardown_distributed(world)
    if toy_world and world.master and result.exit_code == 0 and result.step == cfg.max_steps:
        report_toy_world(cfg, control and control.out, result)
    # ---- end of the toy world ----
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
