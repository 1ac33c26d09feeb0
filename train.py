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
as 1 process x batch 2 (up to float summation order). `--resume auto` continues a run exactly.

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
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import ops
import checkpoint
import data
import lora
import regularizer
import sampler

ROOT = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    model: str = None  # SD-1.5 diffusers folder or single file; None = the toy world
    tokenizer: str = None  # tokenizer folder (vocab.json + merges.txt), needed with a single-file --model
    data: str = None  # folder of images + same-stem .txt captions, or a .jsonl of {"image", "text"}
    out: str = None  # output folder (default: out, or runs/toy in the toy world)
    resolution: int = 512  # images are resized and centre-cropped to this (a multiple of 8)
    batch_size: int = 3  # per process and micro-step (paper: 3 per GPU)
    grad_accum: int = 8  # micro-steps per optimizer step (paper: 8; 3 x 4 GPUs x 8 = 96)
    max_steps: int = 30_000  # optimizer steps (paper: 30k)
    lr: float = 1e-4  # AdamW, constant, no warm-up (paper)
    weight_decay: float = 1e-4  # paper, Sec. 4.1; the official script's default is 1e-2
    rank: int = 8  # LoRA rank (paper)
    lambda_reg: float = 1.0  # lambda in Eq. 14 (paper: 1); 0 trains the plain-LoRA control
    reg_every: int = 1  # regularize every k-th step, loss scaled by k (paper: 1 = every step)
    reg_decay: float = 0.01  # running-mean decay per regularized step (official code), 1-(1-d)^k if lazy
    reg_timestep_buckets: int = 1  # running means of the norm, one per range of t (paper: 1, a single a)
    reg_mode: str = "vjp"  # vjp = Eq. 10 (paper, double backward); fd = finite difference
    reg_batch_frac: float = 1.0  # regularize the first ceil(f * B) samples of each micro-batch (f < 1:
    # the result then depends on the per-process batch size, not only on the global batch)
    fd_h: float = 1e-2  # fd step, relative to the noise's expected norm sqrt(C*H*W)
    save_every: int = 500  # write the checkpoint every this many steps (and at the end)
    seed: int = 0
    resume: str = None  # state.pt to continue from, or "auto" = OUT/state.pt if it exists
    mixed_precision: str = "no"  # no | fp16 | bf16: frozen weights and autocast (GPU); LoRA stays fp32
    num_workers: int = 4  # data loader processes per rank
    gradient_checkpointing: bool = False  # recompute UNet blocks in backward to save memory


def parse_args(argv):
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model,
                   help="SD-1.5 folder in the diffusers layout; leave out to train on the toy world")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="tokenizer folder (vocab.json + merges.txt); needed when --model is a single file")
    p.add_argument("--data", default=d.data, help="image folder with .txt captions, or a .jsonl file")
    p.add_argument("--out", default=d.out, help="output folder (out, or runs/toy in the toy world)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="resize, centre crop (multiple of 8)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process and micro-step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW, constant")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="the paper's value; the official script used 1e-2")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--lambda-reg", type=float, default=d.lambda_reg, help="lambda of Eq. 14 (0: plain LoRA)")
    p.add_argument("--reg-every", type=int, default=d.reg_every,
                   help="regularize every k-th step, loss scaled by k (StyleGAN2's lazy regularization)")
    p.add_argument("--reg-decay", type=float, default=d.reg_decay,
                   help="decay of the running mean a of Eq. 9 per step; with --reg-every k it is applied as "
                        "1-(1-decay)^k per regularized step, so a follows the norm as fast in steps")
    p.add_argument("--reg-timestep-buckets", type=int, default=d.reg_timestep_buckets,
                   help="keep one running mean a per range of 1000/N timesteps (not in the paper: the norm's "
                        "scale depends strongly on t); 1 = the paper's single a")
    p.add_argument("--reg-mode", choices=("vjp", "fd"), default=d.reg_mode,
                   help="vjp: Eq. 10 by double backward (paper); fd: finite difference, two forwards")
    p.add_argument("--reg-batch-frac", type=float, default=d.reg_batch_frac,
                   help="regularize the first ceil(f * batch size) samples of each micro-batch")
    p.add_argument("--fd-h", type=float, default=d.fd_h,
                   help="fd step, relative to the noise's expected norm sqrt(C*H*W)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval in steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", default=d.resume, help='state.pt to continue from, or "auto" (OUT/state.pt '
                   "if it exists)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=d.mixed_precision,
                   help="frozen weights and autocast in this precision (GPU); the LoRA stays fp32")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader processes per rank")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in backward")
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    given = {s.split("=")[0] for s in argv}
    explicit = {a.dest for a in p._actions if given & set(a.option_strings)}
    return cfg, explicit


def check_config(cfg):
    """Errors in flag values, before any data or model is touched."""
    for name in ("batch_size", "grad_accum", "max_steps", "rank", "reg_every", "save_every",
                 "reg_timestep_buckets"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    if cfg.resolution % 8:
        raise ValueError(f"--resolution {cfg.resolution} is not divisible by 8 (the VAE downsamples by "
                         f"8): use e.g. {max(8, cfg.resolution // 8 * 8)}.")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {cfg.seed}.")
    if not 0 < cfg.reg_decay <= 1:
        raise ValueError(f"--reg-decay must be in (0, 1], got {cfg.reg_decay}.")
    if not 0 < cfg.reg_batch_frac <= 1:
        raise ValueError(f"--reg-batch-frac must be in (0, 1], got {cfg.reg_batch_frac}.")
    if cfg.model is not None and cfg.data is None:
        raise ValueError("--data is required with --model (an image folder or a .jsonl file).")
    if cfg.mixed_precision != "no" and not torch.cuda.is_available():
        raise ValueError(f"--mixed-precision {cfg.mixed_precision} needs a CUDA GPU; "
                         "use --mixed-precision no.")


def use_toy_world(cfg, explicit, master):
    """No --model: train on the toy world (toy.py), with its smaller defaults unless a flag was given."""
    import toy

    cfg.model = str(ROOT / "assets" / "toy-sd")
    for name, value in toy.TRAIN_DEFAULTS.items():
        if name not in explicit:
            setattr(cfg, name, value)
    if cfg.data is None:
        cfg.data = str(ROOT / "data" / "toy")
        if master:
            toy.prepare_data(cfg.data)  # writes the images once; a no-op when they are there
    if cfg.out is None:
        cfg.out = str(ROOT / "runs" / "toy")


def per_sample_randomness(seed, keys, shape):
    """Timestep, noise, regularizer direction and VAE posterior noise for each sample.

    Drawn from a generator seeded by (seed, key), with key = the sample's position in the global data
    stream, so they do not depend on the rank, the world size or the micro-batch split.
    """
    t, noise, direction, posterior = [], [], [], []
    for key in keys.tolist():
        g = torch.Generator().manual_seed(data.derive_seed(seed, data.SAMPLE_STREAM, key))
        t.append(torch.randint(0, 1000, (), generator=g))  # t ~ U{0..999}, as the official code
        noise.append(torch.randn(shape, generator=g))
        direction.append(torch.randn(shape, generator=g))
        posterior.append(torch.randn(shape, generator=g))
    return torch.stack(t), torch.stack(noise), torch.stack(direction), torch.stack(posterior)


def micro_step(cfg, unet, models, reg, batch, alphas_cumprod, regularize, device, autocast):
    """Eq. 14 for one micro-batch -> (loss, base loss, reg loss, mean variation norm)."""
    with torch.no_grad(), autocast():
        pixels = batch["pixels"].to(device, next(models.vae.parameters()).dtype)
        mean, logvar = models.vae.encode(pixels)
        text = models.encode_prompt(batch["captions"])
    t, noise, direction, posterior = per_sample_randomness(cfg.seed, batch["keys"], mean.shape[1:])
    t, noise, direction, posterior = (x.to(device) for x in (t, noise, direction, posterior))
    # The VAE posterior sample, as the official code (.sample()), seeded per sample like the noise.
    latents = (mean.float() + (0.5 * logvar.float()).exp() * posterior) * models.vae.scaling_factor
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise  # Eq. 2
    b = len(t)
    n = math.ceil(cfg.reg_batch_frac * b) if regularize else 0  # the first n samples are regularized
    sigma = (1 - abar[:n]).sqrt().flatten()  # sqrt(1 - abar_t) of Eq. 9/10

    def forward(x, sl, double_backward=False):
        with ops.double_backward(double_backward), autocast():
            return unet(x, t[sl], text[sl]).float()

    if regularize and cfg.reg_mode == "vjp":
        # Fig. 2(d): x_t of the regularized samples as a function of their noise, the leaf of Eq. 10.
        noise_reg = noise[:n].clone().requires_grad_()
        x_reg = abar[:n].sqrt() * latents[:n] + (1 - abar[:n]).sqrt() * noise_reg  # Eq. 2
        eps_reg = forward(x_reg, slice(0, n), double_backward=True)
        # The others get a separate plain forward, so the double backward costs only n samples.
        eps_pred = torch.cat([eps_reg, forward(x_t[n:], slice(n, b))]) if n < b else eps_reg
        x0_pred = regularizer.predict_x0(x_reg, eps_reg, abar[:n].flatten())
        norms = regularizer.variation_norm(x0_pred, noise_reg, sigma, direction[:n])  # Eq. 10
    elif regularize:  # fd: one batched forward for x_t and for x_t(eps + h v)
        h = cfg.fd_h * math.sqrt(noise[0].numel())
        v = direction[:n] / direction[:n].flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # unit length
        x_shift = abar[:n].sqrt() * latents[:n] + (1 - abar[:n]).sqrt() * (noise[:n] + h * v)  # Eq. 2
        with ops.double_backward(False), autocast():
            eps_all = unet(torch.cat([x_t, x_shift]), torch.cat([t, t[:n]]),
                           torch.cat([text, text[:n]])).float()
        eps_pred = eps_all[:b]
        x0_pred = regularizer.predict_x0(x_t[:n], eps_pred[:n], abar[:n].flatten())
        x0_shift = regularizer.predict_x0(x_shift, eps_all[b:], abar[:n].flatten())
        norms = regularizer.fd_variation_norm(x0_pred, x0_shift, h, sigma)
    else:
        eps_pred = forward(x_t, slice(0, b))
    loss_base = F.mse_loss(eps_pred, noise)  # L_base of Eq. 14
    if not regularize:
        zero = loss_base.new_zeros(())
        return loss_base, loss_base.detach(), zero, zero
    loss_reg = reg.penalty(norms, t[:n])  # Eq. 9 (updates the running mean a, averaged over ranks)
    loss = loss_base + cfg.lambda_reg * cfg.reg_every * loss_reg  # Eq. 14, lazy: scaled by k
    return loss, loss_base.detach(), loss_reg.detach(), norms.detach().mean()


def atomic_save(path, write):
    """write(tmp) then rename: a kill at any moment leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out, unet, optimizer, scaler, reg, step, samples_seen, cfg, skipped):
    atomic_save(out / "smooth_lora.safetensors", lambda p: lora.save_lora(unet, p, layout="official"))
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


def load_checkpoint(path, unet, optimizer, scaler, reg):
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = {k: v for k, v in unet.named_parameters() if v.requires_grad}
    if set(params) != set(state["lora"]):
        raise ValueError(f"{path} holds a different LoRA (another --rank or model?): cannot resume.")
    with torch.no_grad():
        for k, v in state["lora"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    reg.load_state_dict(state["regularizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def all_gather_union(items, world):
    if world == 1:
        return set(items)
    gathered = [None] * world
    dist.all_gather_object(gathered, sorted(items))
    return set().union(*gathered)


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA max allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS"


def main(argv=None):
    cfg, explicit = parse_args(argv)
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is a world of one.
    distributed = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    # ---- everything that can be wrong with the input fails here, before any training ----
    toy_world = cfg.model is None
    try:
        if toy_world:
            use_toy_world(cfg, explicit, master)
            if distributed:
                dist.barrier()  # rank 0 may have written the toy data
        check_config(cfg)
        dataset = data.CaptionDataset(cfg.data, cfg.resolution)
        frozen_dtype = dict(no=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)[cfg.mixed_precision]
        models = checkpoint.load_models(cfg.model, tokenizer=cfg.tokenizer, device=device, dtype=frozen_dtype)
    except (ValueError, OSError) as e:
        raise SystemExit(f"train.py: error: {e}")
    out = Path(cfg.out or "out")
    resume = cfg.resume
    if resume == "auto":
        resume = out / "state.pt" if (out / "state.pt").exists() else None
    if resume is not None and not Path(resume).exists():
        raise SystemExit(f"train.py: error: --resume {resume} does not exist.")

    # ---- model: frozen SD-1.5 + trainable fp32 LoRA on the UNet's attention projections ----
    torch.manual_seed(cfg.seed)  # the LoRA init; identical on every rank
    for part in (models.unet, models.vae, models.text_encoder):
        part.requires_grad_(False).eval()
    unet = models.unet
    lora.inject_lora(unet, rank=cfg.rank)
    lora_params = lora.freeze_all_but_lora(unet)  # fp32, whatever the frozen weights' dtype
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    # Lazy regularization updates a only every k-th step: compound the decay so that a keeps pace.
    reg = regularizer.StepwiseVariationRegularizer(decay=1 - (1 - cfg.reg_decay) ** cfg.reg_every,
                                                   timestep_buckets=cfg.reg_timestep_buckets).to(device).train()
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    step, samples_seen, skipped = 0, 0, set()
    if resume is not None:
        try:
            state = load_checkpoint(resume, unet, optimizer, scaler, reg)
        except (ValueError, OSError, KeyError) as e:
            raise SystemExit(f"train.py: error: cannot resume from {resume}: {e!r}")
        step, samples_seen, skipped = state["step"], state["samples_seen"], set(state["skipped"])
        if master:
            print(f"resumed from {resume} at step {step}")
    model = DDP(unet, device_ids=[local_rank] if device.type == "cuda" else None,
                find_unused_parameters=False) if distributed else unet
    alphas_cumprod = sampler.make_schedule(models.scheduler_config).alphas_cumprod.to(device)

    def autocast():
        if cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=frozen_dtype)

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, collate_fn=data.collate, num_workers=cfg.num_workers,
        worker_init_fn=data.ignore_stop_signals,
        sampler=data.stream_keys(len(dataset), cfg.seed, samples_seen, rank, world, cfg.batch_size),
        pin_memory=device.type == "cuda")
    batches = iter(loader)

    stop = {"signal": None}
    for s in (signal.SIGTERM, signal.SIGINT):  # finish the step, save, exit
        signal.signal(s, lambda signum, frame: stop.update(signal=signum))

    if master:
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / "log.jsonl"
        if resume is not None and log_path.exists():  # drop log lines of steps after the checkpoint
            lines = log_path.read_text().splitlines()
            log_path.write_text("".join(l + "\n" for l in lines if json.loads(l).get("step", 0) <= step))
        elif resume is None:
            log_path.write_text("")
        print(f"training {sum(p.numel() for p in lora_params):,} LoRA parameters on {world} x {device.type}, "
              f"global batch {cfg.batch_size * world * cfg.grad_accum}, {len(dataset)} images -> {out}")
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    start_step, t0, exit_code = step, time.time(), 0
    while step < cfg.max_steps:
        regularize = cfg.lambda_reg > 0 and step % cfg.reg_every == 0
        stats = torch.zeros(4, device=device)  # loss, base loss, reg loss, variation norm (sums)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            for path in batch["skipped"]:
                if path not in skipped:
                    skipped.add(path)
                    tqdm.write(f"skipping unreadable image {path}", file=sys.stderr)
            last = micro == cfg.grad_accum - 1
            # Gradients are all-reduced only on the last micro-step.
            with contextlib.nullcontext() if last or not distributed else model.no_sync():
                loss, loss_base, loss_reg, norm = micro_step(
                    cfg, model, models, reg, batch, alphas_cumprod, regularize, device, autocast)
                scaler.scale(loss / cfg.grad_accum).backward()
            stats += torch.stack([loss.detach(), loss_base, loss_reg, norm]) / cfg.grad_accum
        samples_seen += cfg.grad_accum * world * cfg.batch_size
        flags = torch.tensor([float(stop["signal"] is not None)], device=device)
        if distributed:  # mean over ranks, and one shared decision to stop
            dist.all_reduce(stats)
            stats /= world
            dist.all_reduce(flags)
        loss, loss_base, loss_reg, norm = stats.tolist()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, 1.0).item()
        # (With fp16 the scaler skips steps with inf gradients by itself; a non-finite loss still stops.)
        if not math.isfinite(loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
            if master:
                tqdm.write(f"train.py: loss is {loss} at step {step + 1} (base {loss_base}, reg {loss_reg}, "
                           f"gradient norm {grad_norm}); stopping. The last good checkpoint in {out} is "
                           "kept; try a lower --lr or --mixed-precision no/bf16.", file=sys.stderr)
            exit_code = 1
            break
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        a = reg.a.mean().item()  # with timestep buckets: their mean (each bucket in a_per_bucket)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", reg=f"{loss_reg:.3g}", var=f"{norm:.3g}", a=f"{a:.3g}")
        if master:
            record = dict(step=step, loss=loss, loss_base=loss_base, loss_reg=loss_reg, var_norm=norm,
                          a=a, regularized=regularize, grad_norm=grad_norm, lr=cfg.lr,
                          samples_seen=samples_seen, time=round(time.time() - t0, 3))
            if reg.a.ndim:
                record["a_per_bucket"] = [round(x, 6) for x in reg.a.tolist()]
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        stopping = flags.item() > 0
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
            skipped = all_gather_union(skipped, world)
            if master:
                save_checkpoint(out, unet, optimizer, scaler, reg, step, samples_seen, cfg, skipped)
        if stopping:
            if master:
                tqdm.write(f"stopped by signal at step {step}; checkpoint saved in {out} "
                           "(continue with --resume auto)")
            break
    bar.close()

    skipped = all_gather_union(skipped, world)
    if master:
        elapsed = time.time() - t0
        images = (step - start_step) * cfg.grad_accum * world * cfg.batch_size
        print(f"skipped {len(skipped)} unreadable images" + (f": {sorted(skipped)[:5]}" if skipped else ""))
        print(f"done: {step - start_step} steps (to step {step}) in {elapsed:.1f} s, "
              f"{images / max(elapsed, 1e-9):.2f} images/s, {peak_memory(device)}; LoRA in "
              f"{out / 'smooth_lora.safetensors'}")
    if distributed:
        del model  # DDP's reducer must go before its process group (else gloo may abort at exit)
        dist.barrier()
        dist.destroy_process_group()
    if toy_world and master and exit_code == 0 and step == cfg.max_steps:
        import toy

        toy.report(cfg.model, str(out / "smooth_lora.safetensors"), str(out))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
