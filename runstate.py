"""A training run's state and its processes: what train.py writes to OUT and how it resumes.

- its inputs checked before anything is written: every numeric flag's range (`NUMBER_RANGES`), the flags
  that go together (`check_config`);
- the output folder belongs to one run: OUT/train.lock while a run writes there (rank 0 of a torchrun job
  holds it for every rank); a fresh run never replaces another run's files unless `--overwrite` says so;
- checkpoints: OUT/state.pt (LoRA, optimizer, scaler, the running mean a of Eq. 9, step, data position,
  RNG, config) and OUT/smooth_lora.safetensors, both written atomically; snapshots; a resume that
  refuses other optimization settings, or data whose fingerprint changed, unless `--resume-override` names them;
- validation strips: Sec. 4.1's interpolation strips of a few prompts while training, with their ISTD;
- processes: torchrun's ranks (NCCL between GPUs, gloo between CPU processes), the stop signals;
- the log: OUT/log.jsonl, one record per step, and the summary printed at the end.
"""
import dataclasses
import json
import math
import os
import pickle
import resource
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

import data
import lora
import metrics
import sampler

# Settings that change what a run optimizes: a --resume with other values is refused unless overridden.
OPTIMIZATION_SETTINGS = ("model", "data", "data_root", "resolution", "batch_size", "grad_accum", "lr",
                         "weight_decay", "rank", "lora_targets", "lambda_reg", "reg_every", "reg_decay",
                         "reg_timestep_buckets", "reg_normalize", "reg_mode", "reg_direction", "reg_batch_frac", "fd_h", "seed",
                         "mixed_precision")
SHAPE_SETTINGS = ("rank", "lora_targets", "reg_timestep_buckets")  # never changed by --resume-override
NEWER_SETTINGS = dict(reg_normalize="none", lora_targets="attention", reg_direction="random")  # older checkpoints trained like this


def saved_settings(config):
    """A checkpoint's config, with the settings added after it was written at the values it trained with."""
    return {**NEWER_SETTINGS, **config}


def overridden(cfg):
    return [name for name in (cfg.resume_override or "").split(",") if name]


# -------------------------------------------------------- checking a run's inputs

# Every numeric flag's range, (lowest, highest or None), ends included but for OPEN_AT_LOW; floats must be
# finite. The upper ends that are not None are far beyond any use (a typo, not a plan): SD-1.5 trains at 512 px,
# batch 3, rank 8; torch seeds are 64-bit. The model's own limits are in check_model_limits.
NUMBER_RANGES = dict(
    resolution=(1, 8192), batch_size=(1, 65536), grad_accum=(1, None), max_steps=(1, None), lr=(0, None),
    weight_decay=(0, None), rank=(1, 4096), lambda_reg=(0, None), reg_every=(1, None), reg_decay=(0, 1),
    reg_timestep_buckets=(1, None), reg_batch_frac=(0, 1), fd_h=(0, None), save_every=(1, None),
    snapshot_every=(0, None), keep_snapshots=(0, None), validate_every=(0, None), validation_steps=(1, None),
    seed=(0, 2**64 - 1), num_workers=(0, 1024), threads=(1, 1024))
OPEN_AT_LOW = ("lr", "reg_decay", "reg_batch_frac", "fd_h")  # > 0, not >= 0


def check_number(name, value):
    """ValueError unless `value` of --name is finite and in NUMBER_RANGES[name]."""
    low, high = NUMBER_RANGES[name]
    above_low = low < value if name in OPEN_AT_LOW else low <= value
    if math.isfinite(value) and above_low and (high is None or value <= high):
        return
    if high is not None:
        allowed = f"in {'(' if name in OPEN_AT_LOW else '['}{low}, {high}]"
    else:
        allowed = f"> {low}" if name in OPEN_AT_LOW else f"at least {low}"
    finite = " and finite" if isinstance(value, float) else ""
    raise ValueError(f"--{name.replace('_', '-')} must be {allowed}{finite}, got {value}.")


def check_numbers(cfg):
    for name in NUMBER_RANGES:
        if getattr(cfg, name) is not None:  # --threads: None is torch's choice
            check_number(name, getattr(cfg, name))


def check_config(cfg, device):
    """Errors in flag values, before any data or model is touched."""
    check_numbers(cfg)
    if cfg.overwrite and cfg.resume:
        raise ValueError("--overwrite starts afresh and --resume continues: give one of them.")
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
    if cfg.validation_prompts is not None:
        validation_prompts(cfg.validation_prompts)  # at least one prompt
    unknown = set(overridden(cfg)) - set(OPTIMIZATION_SETTINGS)
    if unknown:
        raise ValueError(f"--resume-override {cfg.resume_override}: {', '.join(sorted(unknown))} is not a "
                         f"setting a resume checks; those are {', '.join(OPTIMIZATION_SETTINGS)}.")
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU (CPU autocast has no fp16); use "
                         "--mixed-precision bf16 or no.")


# ---------------------------------------------------- the output folder's owner

LOCK = "train.lock"
RUN_FILES = ("state.pt", "log.jsonl", "smooth_lora.safetensors")  # a folder with any of these holds a run


def lock_out(out, world):
    """Rank 0 creates OUT/train.lock (atomically: of two processes, one wins) and holds it for the whole
    torchrun job -> its path (None on the other ranks); ValueError, on every rank, if another run holds it."""
    error, lock = "", None
    if world.master:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(pid=os.getpid(), host=socket.gethostname(), started=time.time()), f)
            lock = out / LOCK
        except FileExistsError:
            error = lock_holder_message(out) if out.is_dir() else \
                f"--out {out} is a file, not a folder: name a folder (it is created if needed)."
        except OSError as e:
            error = f"--out {out}: cannot write there ({e.strerror or e})."
    if world.distributed:  # every rank learns rank 0's answer (they agree on everything before this point)
        answer = [error]
        dist.broadcast_object_list(answer, src=0)
        error = answer[0]
    if error:
        raise ValueError(error)
    return lock


def unlock_out(lock, remove_folder=False):
    """Remove the lock (rank 0); with remove_folder, also OUT if that leaves it empty (a refused run that
    created it leaves nothing behind)."""
    if lock is None:
        return
    lock.unlink(missing_ok=True)
    if remove_folder and not any(lock.parent.iterdir()):
        lock.parent.rmdir()


def lock_holder_message(out):
    """Why OUT is taken: by a live run (wait or choose another --out), or by one that is gone (how to clear it)."""
    lock = out / LOCK
    try:
        holder = json.loads(lock.read_text())
        pid, host, started = int(holder["pid"]), str(holder["host"]), float(holder["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return (f"--out {out} is locked by {lock}, which is unreadable: if no run writes to {out}, remove it "
                f"(rm {lock}) and start again.")
    who = f"PID {pid} on {host}, started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}"
    if host == socket.gethostname() and not process_alive(pid):
        return (f"--out {out} holds the lock of a run that is no longer running ({who}: killed or crashed?). "
                f"If no other run writes there, remove the lock (rm {lock}) and start again; --resume "
                "continues that run from its last checkpoint.")
    return (f"--out {out} is in use by another run ({who}; its lock: {lock}). Wait for it to finish, or "
            "choose another --out.")


def process_alive(pid):
    """Whether a process of this PID exists on this machine (signal 0 only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def check_fresh_start(out, overwrite):
    """A run without --resume must not replace another run's files: ValueError naming --resume and
    --overwrite, unless `overwrite`."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise ValueError(f"--out {out} holds another run ({', '.join(found)}). Continue it with --resume, "
                         "start over with --overwrite (which deletes that run's files), or choose another "
                         "--out.")


def discard_run(out):
    """--overwrite: remove the files of the run in OUT (not its lock, not other folders such as control/)."""
    for path in [out / name for name in RUN_FILES] + list(out.glob("smooth_lora-step*.safetensors")):
        path.unlink(missing_ok=True)
    for path in (out / "validation").glob("step-*.png"):
        path.unlink()
    (out / "validation" / "progress.png").unlink(missing_ok=True)


# -------------------------------------------------------- checkpoints and resume

STATE_KEYS = {"lora", "optimizer", "scaler", "regularizer", "step", "samples_seen", "rng", "config", "skipped"}


def atomic_save(path, write):
    """write(tmp) then rename: a kill at any moment leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out, unet, optimizer, scaler, reg, step, samples_seen, cfg, skipped, layout, data_fingerprint):
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
        "data": data_fingerprint,  # data.fingerprint: a resume checks it (absent in older checkpoints)
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


def data_change(cfg, state, fingerprint):
    """{"data_fingerprint": (saved, now)} if the data changed since the checkpoint, else {}; ValueError unless
    --resume-override names data. Checkpoints older than the fingerprint are not checked."""
    saved = state.get("data")
    if saved is None or saved == fingerprint:
        return {}
    if "data" not in overridden(cfg):
        raise ValueError(f"--resume: the data changed since the checkpoint ({saved['count']} images then, "
                         f"{fingerprint['count']} now; names, file sizes or captions differ), so the run would "
                         "not continue as it was. Resume with the data it trained on, or accept the change with "
                         "--resume-override data (recorded in log.jsonl).")
    return {"data_fingerprint": (saved, fingerprint)}


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


# ------------------------------------------------------------- validation strips

@torch.no_grad()
def validate(cfg, sd, schedule, latent_shape, step, out, world, autocast):
    """Rank 0: one interpolation strip per validation prompt with the current LoRA (the same noise pairs
    every time) -> {istd, mean_adjacent_distance} (means over prompts); OUT/validation/step-N.png and
    progress.png. The training RNG is left as it was, so a resumed run stays bit-exact."""
    prompts = validation_prompts(cfg.validation_prompts)
    with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []), autocast():
        strips = sampler.interpolation_strips(sd.unet, sd.vae, sd.encode_prompt, prompts,
                                              latent_shape=latent_shape, steps=cfg.validation_steps,
                                              schedule=schedule, progress=False).float().cpu()
    per_strip = [metrics.istd(s) for s in strips]
    folder = out / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"step {step}\nISTD {istd:.3f}", strip) for istd, strip in zip(per_strip, strips)]
    scale = max(1, 64 // strips.shape[-2])  # toy frames (32 px) drawn 2x; SD's 512 px as they are
    data.labelled_grid(rows, scale=scale, label_width=90).save(folder / f"step-{step}.png")  # a row per prompt
    stages = sorted((int(p.stem.split("-")[1]), p) for p in folder.glob("step-*.png"))
    stages = [Image.open(p).convert("RGB") for n, p in stages if n <= step]  # a resume rewrites later ones
    progress = Image.new("RGB", (max(im.width for im in stages), sum(im.height + 2 for im in stages)), "white")
    for k, im in enumerate(stages):
        progress.paste(im, (0, sum(s.height + 2 for s in stages[:k])))
    progress.save(folder / "progress.png")
    return {"istd": sum(per_strip) / len(strips),
            "mean_adjacent_distance": sum(metrics.adjacent_distances(s).mean().item() for s in strips) / len(strips)}


def validation_prompts(path):
    """The non-blank lines of --validation-prompts; ValueError if there is none or the file is not UTF-8."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--validation-prompts {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if not prompts:
        raise ValueError(f"--validation-prompts {path} has no prompts: write one prompt per line.")
    return prompts


# --------------------------------------------------------------------- processes

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


def reduce_over_ranks(stats, stop, world):
    """Mean of the step's stats over ranks, and one shared decision to stop: the signal any rank got."""
    signum = torch.tensor([stop["signal"]], device=world.device)
    if world.distributed:
        dist.all_reduce(stats)
        stats /= world.size
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    return stats.tolist(), int(signum.item())


def catch_stop_signals():
    """SIGTERM / Ctrl-C: finish the step, save, exit 128 + signal. Returns where the signal is recorded."""
    stop = {"signal": 0}
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.update(signal=signum))
    return stop


# ------------------------------------------------------- the log and the summary

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


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA max allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS"


def print_summary(cfg, steps_done, step, elapsed, skipped, world, out):
    images = steps_done * cfg.grad_accum * world.size * cfg.batch_size
    print(f"skipped {len(skipped)} unreadable images" + (f": {sorted(skipped)[:5]}" if skipped else ""))
    print(f"done: {steps_done} steps (to step {step}) in {elapsed:.1f} s, "
          f"{images / max(elapsed, 1e-9):.2f} images/s, {peak_memory(world.device)}; LoRA in "
          f"{out / 'smooth_lora.safetensors'}")


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
