"""Side-by-side benchmark: our models vs diffusers, and the cost of the paper's regularizer (issue 7).

    python -m bench --quick                  # small configs, ~1 min on 2 CPU cores
    python -m bench --json bench.json        # SD-1.5 configs (minutes on CPU)
    python -m bench --device cuda            # adds bf16/fp16 and 512 px, batch 3
    python -m bench --budget --threads 1     # the 512 px memory budget (SD-1.5 + LoRA; CPU: ~45 min)
    python -m bench --device cuda --gpu-check   # the prepared GPU check (README, Speed)

Measured, each in a fresh subprocess (so one case's memory does not leak into the next):
- UNet forward and VAE decode, ours and diffusers' (when installed) with the SAME random weights
  (a seeded diffusers model's state_dict loaded into ours; the names are identical);
- training steps with LoRA (SD-1.5 config) or all weights (a small config), in the `STEP_MODES`:
  plain eps-MSE; the paper's regularized step (`vjp`: Eq. 9/10, double backward through
  `ops.DoubleBackwardAttention`); the same with the old plain-ops attention (`vjp-math`) or
  with the UNet's gradient checkpointing (`vjp-ckpt`); the finite-difference form (`fd`); and the
  train.py options `--reg-every 4` (`reg-every4`: 3 plain steps and 1 vjp step with its penalty x 4,
  time per step = time of the 4 / 4) and `--reg-batch-frac 0.5` (`reg-frac0.5`: the vjp penalty on
  the first ceil(B / 2) samples; at batch 1 that is the vjp step, so it runs at batch 2).
  Each step is train.py's Eq. 14 loss (`train.smooth_diffusion_loss`, from a noise leaf) plus AdamW.
  Every ratio is against `plain` WITHOUT checkpointing: what a user pays for the option.

Time is the median of repeats; memory is the peak RSS (CPU, /proc/self/status VmHWM after resetting
it with /proc/self/clear_refs once the model is built) or torch.cuda.max_memory_allocated, and
"extra" is that peak minus the memory held before the first step. The printed table gives ratios:
ours/diffusers for forwards, regularized/plain for steps. Never run it alongside tests for timing.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lora
import ops
import regularizer
import sampler
import train
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]

# A small UNet (3 levels, 2 attention levels) and VAE for --quick; SD-1.5 is the configs' default.
SMALL_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4,
                  cross_attention_dim=64, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SMALL_VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
FD_H = train.TrainConfig.fd_h  # train.py's default fd step, relative to the noise norm sqrt(C H W)


def case_list(device, quick):
    """Every measurement as a dict; `impl` "diffusers" rows are skipped when it is not installed."""
    fwd = lambda name, model, cfg, **kw: [dict(name=name, kind=model, cfg=cfg, impl=impl, **kw)
                                          for impl in ("ours", "diffusers")]
    steps = lambda name, cfg, modes=tuple(STEP_MODES), **kw: [
        dict(name=name, kind="step", cfg=cfg, impl="ours", mode=m, **kw) for m in modes]
    if quick:
        return (fwd("unet fwd small 32x32 b2", "unet", "small", side=32, batch=2, repeats=5)
                + fwd("vae decode small 32x32 b1", "vae", "small", side=32, batch=1, repeats=5)
                + steps("step small 16x16 b2", "small", side=16, batch=2, lora=False, repeats=5))
    # At batch 1, reg-frac0.5 regularizes ceil(0.5) = 1 sample: the vjp step. It gets a batch-2 case.
    sd15_b1 = ("plain", "vjp", "vjp-math", "vjp-ckpt", "fd", "reg-every4")
    cases = (steps("step sd15+LoRA 32x32 b1", "sd15", sd15_b1, side=32, batch=1, lora=True, repeats=2)
             + steps("step sd15+LoRA 32x32 b2", "sd15", ("plain", "vjp", "reg-frac0.5"), side=32, batch=2,
                     lora=True, repeats=2)
             + fwd("unet fwd sd15 32x32 b2", "unet", "sd15", side=32, batch=2, repeats=3)
             + fwd("unet fwd sd15 64x64 b2", "unet", "sd15", side=64, batch=2, repeats=2)
             + fwd("vae decode sd15 64x64 b1", "vae", "sd15", side=64, batch=1, repeats=2)
             + steps("step small 32x32 b2", "small", side=32, batch=2, lora=False, repeats=5))
    if device == "cuda":
        for dtype in ("bfloat16", "float16"):
            cases += fwd(f"unet fwd sd15 64x64 b3 {dtype}", "unet", "sd15", side=64, batch=3, repeats=10,
                         dtype=dtype)
            cases += fwd(f"vae decode sd15 64x64 b3 {dtype}", "vae", "sd15", side=64, batch=3, repeats=10,
                         dtype=dtype)
            cases += steps(f"step sd15+LoRA 64x64 b3 {dtype}", "sd15", side=64, batch=3, lora=True,
                           repeats=5, dtype=dtype)
    return cases


# ----------------------------------------------------------------------------- one measurement

def memory_now(device):
    """(current, peak) memory in MiB."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Freed activations of the warm-up stay in glibc's heap (and in RSS) unless trimmed: without
        # this, "memory before the step" would count the previous step's leftovers.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build(case, device):
    """The model of `case`, with seeded random weights shared by ours and diffusers'."""
    ours_cls, cfg_cls = (UNet, UNetConfig) if case["kind"] in ("unet", "step") else (VAE, VAEConfig)
    cfg = cfg_cls(**(SMALL_UNET if ours_cls is UNet else SMALL_VAE)) if case["cfg"] == "small" else cfg_cls()
    torch.manual_seed(0)
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is None:
        model = ours_cls(cfg)
    else:
        ref_cls = diffusers.UNet2DConditionModel if ours_cls is UNet else diffusers.AutoencoderKL
        fields = dataclasses.asdict(cfg)
        if ours_cls is VAE:
            fields.pop("scaling_factor")
        model = ref_cls(**fields)
        if case["impl"] == "ours":
            ref, model = model, ours_cls(cfg)
            model.load_state_dict(ref.state_dict())
            del ref
    return model.to(device).eval(), cfg


def forward_fn(case, model, cfg, device, dtype):
    g = torch.Generator().manual_seed(1)
    b, side = case["batch"], case["side"]
    if case["kind"] == "vae":
        z = torch.randn(b, cfg.latent_channels, side, side, generator=g).to(device, dtype)
        call = (lambda: model.decode(z)) if case["impl"] == "ours" else (lambda: model.decode(z).sample)
    else:
        x = torch.randn(b, cfg.in_channels, side, side, generator=g).to(device, dtype)
        text = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
        t = torch.randint(0, sampler.make_schedule().num_train_timesteps, (b,), generator=g).to(device)
        call = (lambda: model(x, t, text)) if case["impl"] == "ours" else (lambda: model(x, t, text).sample)

    def run():
        with torch.no_grad():
            return call()
    return run


class MathAttention:
    """Stands in for DoubleBackwardAttention: the plain-ops path, to measure what the new one saves."""

    @staticmethod
    def apply(q, k, v, chunk):
        return ops.math_attention(q, k, v)


# Step modes: the train.py options each one stands for. A "repeat" of a mode is `every` optimizer
# steps, the first regularized (train.py regularizes when step % reg_every == 0), and its time is
# reported per optimizer step.
STEP_MODES = {
    "plain": dict(reg=None),  # --lambda-reg 0
    "vjp": dict(reg="vjp"),  # the paper: --reg-mode vjp, every step, the whole batch
    "vjp-math": dict(reg="vjp", math=True),  # same, attention by plain ops (before ops.py's path)
    "vjp-ckpt": dict(reg="vjp", ckpt=True),  # + --gradient-checkpointing
    "fd": dict(reg="fd"),  # --reg-mode fd
    "reg-every4": dict(reg="vjp", every=4),  # --reg-every 4
    "reg-frac0.5": dict(reg="vjp", frac=0.5),  # --reg-batch-frac 0.5 (needs batch >= 2 to differ from vjp)
}


def step_fn(case, unet, cfg, device, dtype):
    """One repeat of a training mode: `every` optimizer steps of train.py's Eq. 14 loss + AdamW.

    `train.smooth_diffusion_loss` (the function train.py's micro_step calls) on fixed random latents,
    noise, directions, timesteps and text, lambda = 1, the penalty scaled by `every` (lazy) on the first
    ceil(frac * B) samples, with the Eq. 10 norm (vjp) or its finite difference (fd).
    """
    mode = {**dict(every=1, frac=1.0, math=False, ckpt=False), **STEP_MODES[case["mode"]]}
    if case["lora"]:
        params = lora.inject_lora(unet, rank=8)
        lora.freeze_all_but_lora(unet)
        unet.to(device)
    else:
        params = list(unet.parameters())
    unet.train()
    unet.enable_gradient_checkpointing(mode["ckpt"])
    opt = torch.optim.AdamW(params, lr=1e-5)
    reg = regularizer.StepwiseVariationRegularizer().to(device)
    if mode["math"]:
        ops.DoubleBackwardAttention = MathAttention
    schedule = sampler.make_schedule()  # SD-1.5's
    g = torch.Generator().manual_seed(1)
    b, side = case["batch"], case["side"]
    shape = (b, cfg.in_channels, side, side)
    latents, noise, direction = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    text = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(device)
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g).to(device)
    alphas_cumprod = schedule.alphas_cumprod.to(device)
    autocast = lambda: torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def run():
        for i in range(mode["every"]):
            opt.zero_grad(set_to_none=True)
            regularize = mode["reg"] is not None and i == 0
            loss, *_ = train.smooth_diffusion_loss(
                unet, latents, noise, t, text, direction, alphas_cumprod, reg=reg,
                reg_mode=mode["reg"] if regularize else "none", reg_batch_frac=mode["frac"],
                lazy_scale=mode["every"], fd_h=FD_H, autocast=autocast)
            loss.backward()
            opt.step()
    return run


def measure(case, device):
    """Run one case in this process -> dict with time (s, median, per optimizer step) and memory (MiB)."""
    torch.manual_seed(0)
    steps = STEP_MODES[case["mode"]].get("every", 1) if case["kind"] == "step" else 1
    dtype = getattr(torch, case.get("dtype", "float32"))
    model, cfg = build(case, device)
    if case["kind"] == "step":
        run = step_fn(case, model, cfg, device, dtype)
    else:
        model.to(dtype)
        run = forward_fn(case, model, cfg, device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run()  # warm-up (and AdamW state allocation)
    sync()
    reset_peak(device)
    base, _ = memory_now(device)
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) / steps)
    _, peak = memory_now(device)
    return dict(case, time_s=statistics.median(times), times_s=times, peak_mb=peak, extra_mb=peak - base,
                base_mb=base, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- the 512 px budget

# The paper's setting: SD-1.5 + rank-8 LoRA at 64x64 latents (512 px images), one step per variant
# (step mode, autocast dtype, gradient checkpointing). bf16 variants keep the frozen weights in bf16 as
# train.py --mixed-precision bf16 does; the LoRA and AdamW's state stay fp32. Slowest last.
BUDGET_VARIANTS = [(mode, dtype, ckpt) for dtype in ("float32", "bfloat16") for ckpt in (False, True)
                   for mode in ("plain", "vjp")]


def budget_cases(batches=(1,), variants=BUDGET_VARIANTS, cfg="sd15", side=64):
    return [dict(name=f"budget {side}x{side} b{b} {dtype}{' ckpt' if ckpt else ''}", kind="budget", cfg=cfg,
                 impl="ours", mode=mode, dtype=dtype, ckpt=ckpt, side=side, batch=b, lora=True, repeats=1)
            for b in batches for mode, dtype, ckpt in variants]


def random_unet(cfg_name, device, dtype):
    """Our UNet ("sd15" or "small") with its default random init, made directly on `device` (no CPU
    copy of the 860M weights first) and cast to `dtype`: the frozen weights of a training run."""
    cfg = UNetConfig(**SMALL_UNET) if cfg_name == "small" else UNetConfig()
    with torch.device("meta"):
        unet = UNet(cfg)
    unet.to_empty(device=device)
    with torch.no_grad():
        for module in unet.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return unet.to(dtype), cfg


def measure_budget(case, device):
    """One budget case in this process: a warm-up step, then one timed step -> time, images/s and
    memory (peak; "base" = weights + LoRA + AdamW state before the step; extra = peak - base)."""
    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    unet, cfg = random_unet(case["cfg"], device, dtype)
    run = step_fn(case, unet, cfg, device, dtype)  # "plain" or "vjp": train.py's step + AdamW
    unet.enable_gradient_checkpointing(case["ckpt"])  # after step_fn, which sets it from the mode
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run()  # warm-up (and AdamW state allocation)
    sync()
    reset_peak(device)
    base, _ = memory_now(device)
    start = time.perf_counter()
    run()
    sync()
    elapsed = time.perf_counter() - start
    _, peak = memory_now(device)
    return dict(case, time_s=elapsed, images_per_s=case["batch"] / elapsed, peak_mb=peak, base_mb=base,
                extra_mb=peak - base, threads=torch.get_num_threads())


def run_budget(cases, device, json_path=None):
    """Each case in a fresh subprocess, printed (and saved) as it finishes; then the table."""
    results = []
    for case in cases:
        r = run_case(case, device)
        if r is None:
            continue
        results.append(r)
        print(f"  {r['name']:30} {r['mode']:6} {r['time_s']:8.2f} s peak {r['peak_mb']:7.0f} MiB "
              f"extra {r['extra_mb']:7.0f} MiB", flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(dict(device=device, torch=torch.__version__, threads=torch.get_num_threads(),
                               results=results), f, indent=1)
    print_budget(results)
    return results


def print_budget(results):
    """One row per case, with the regularized / plain ratios of time and extra memory."""
    plain = {(r["batch"], r["dtype"], r["ckpt"]): r for r in results if r["mode"] == "plain"}
    print(f"\n{'case':30} {'mode':6} {'time s':>8} {'img/s':>7} {'peak MiB':>9} {'base MiB':>9} "
          f"{'extra MiB':>10} {'time x':>7} {'extra x':>8}")
    for r in results:
        ref = plain.get((r["batch"], r["dtype"], r["ckpt"]))
        ratio = (lambda key: f"{r[key] / ref[key]:.2f}") if ref and r is not ref else (lambda key: "-")
        print(f"{r['name']:30} {r['mode']:6} {r['time_s']:8.2f} {r['images_per_s']:7.3f} {r['peak_mb']:9.0f} "
              f"{r['base_mb']:9.0f} {r['extra_mb']:10.0f} {ratio('time_s'):>7} {ratio('extra_mb'):>8}")


# ----------------------------------------------------------------------------- the GPU check

GPU_CHECK_BUDGET = [("plain", "bfloat16", False), ("vjp", "bfloat16", False), ("vjp", "float16", False),
                    ("vjp", "float32", False)]  # at batch 1 and 3 (the paper's batch per GPU)
# fp32: both models run cuDNN's TF32 convolutions on the same inputs, so they differ only where the
# order of operations does; a wrong layer gives an error of order 1.
FP32_PARITY = 1e-3


def parity_models(cfg_name, device):
    """diffusers' UNet2DConditionModel with seeded random weights, and ours with the same weights."""
    import diffusers
    cfg = UNetConfig(**SMALL_UNET) if cfg_name == "small" else UNetConfig()
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**dataclasses.asdict(cfg))
    ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict())
    return ref.to(device).eval(), ours.to(device).eval(), cfg


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unet_parity(device, cfg_name="sd15", side=64, batch=2, dtypes=("float32", "float16", "bfloat16")):
    """Our UNet forward against diffusers' on `device`, per dtype: both against diffusers in fp32.

    fp32 must agree within FP32_PARITY. In half precision both models round, so ours passes when
    its error is at most twice diffusers' own in the same dtype (or 4 unit roundoffs of the dtype,
    when diffusers happens to be very close): as accurate as the reference, not bit-equal to it.
    """
    ref, ours, cfg = parity_models(cfg_name, device)
    weights = {k: v.clone() for k, v in ref.state_dict().items()}  # fp32, to cast from afresh
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    rows = []
    with torch.no_grad():
        exact = ref(x, t, text).sample
        for name in dtypes:
            dtype = getattr(torch, name)
            for model in (ref, ours):
                model.to(dtype).load_state_dict(weights)  # one rounding of the fp32 weights
            ours_out = ours(x.to(dtype), t, text.to(dtype))
            ours_err = relative_error(ours_out, exact)
            ref_err = relative_error(ref(x.to(dtype), t, text.to(dtype)).sample, exact)
            tol = FP32_PARITY if dtype == torch.float32 else max(2 * ref_err, 2 * torch.finfo(dtype).eps)
            rows.append(dict(dtype=name, ours_error=ours_err, diffusers_error=ref_err, tolerance=tol,
                             ok=bool(torch.isfinite(ours_out).all()) and ours_err <= tol))
    return rows


def toy_run(precision, steps, out, extra=()):
    """`train.py --mixed-precision P --max-steps N` with the toy world's settings, in a subprocess -> its
    last log line (loss, Eq. 9 penalty, ...) and ok = exit status 0 with a finite loss.

    The toy model and images are named with --model and --data, so train.py trains this one LoRA and
    stops: none of the toy world's extras (the lambda-0 control, validation strips, the paired report),
    which are CPU-bound minutes and no test of the GPU path."""
    from toy import main_job, world
    from toy.tables import train_flags

    here = ROOT
    data = os.path.join(here, "data", "toy")
    world.prepare_data(data)
    settings = {**main_job.TRAIN_DEFAULTS, "max_steps": steps, "save_every": steps}
    cmd = [sys.executable, os.path.join(here, "train.py"), "--model", str(world.MODEL_DIR), "--data", data,
           *train_flags(settings), "--mixed-precision", precision, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(precision=precision, ok=False, error=proc.stderr[-2000:])
    with open(os.path.join(out, "log.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    return dict(precision=precision, ok=math.isfinite(last["loss"]), step=last["step"], loss=last["loss"],
                loss_reg=last["loss_reg"], var_norm=last["var_norm"], time_s=last["time"])


def gpu_check(device, json_path=None, toy_steps=20):
    """`--gpu-check`: UNet parity with diffusers (fp32/fp16/bf16), the 512 px regularized step at batch 1
    and 3 (peak memory, images/s), and 20-step toy runs in fp32, bf16 and fp16. Exits non-zero on a
    failed parity or toy run."""
    import tempfile
    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else device, torch=torch.__version__)
    report["parity"] = unet_parity(device)
    for r in report["parity"]:
        print(f"  UNet forward {r['dtype']:8}: ours {r['ours_error']:.2e}, diffusers {r['diffusers_error']:.2e} "
              f"(vs diffusers fp32; tolerance {r['tolerance']:.2e}) {'ok' if r['ok'] else 'FAILED'}", flush=True)
    report["budget"] = run_budget(budget_cases(batches=(1, 3), variants=GPU_CHECK_BUDGET), device)
    with tempfile.TemporaryDirectory() as tmp:
        report["toy"] = [toy_run(p, toy_steps, os.path.join(tmp, p)) for p in ("no", "bf16", "fp16")]
    for r in report["toy"]:
        print(f"  toy {toy_steps} steps --mixed-precision {r['precision']:4}: "
              + (f"loss {r['loss']:.4f}, reg {r['loss_reg']:.4g}, {r['time_s']:.1f} s" if "loss" in r
                 else f"FAILED\n{r['error']}"), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    failed = [r["dtype"] for r in report["parity"] if not r["ok"]] + [r["precision"] for r in report["toy"]
                                                                       if not r["ok"]]
    if failed:
        sys.exit(f"python -m bench: the GPU check failed for {', '.join(failed)} (details above).")
    return report


# ----------------------------------------------------------------------------- driver

def run_case(case, device):
    """One case in a fresh interpreter; None if it failed (the error is printed)."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--one", json.dumps(case),
                           "--device", device, "--threads", str(torch.get_num_threads())],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(f"  {case['name']} [{case['impl']} {case.get('mode', '')}] failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(results):
    """Rows of the summary table: ours/diffusers for forwards, mode/plain for steps."""
    by = {(r["name"], r["impl"], r.get("mode")): r for r in results}
    rows = []
    for (name, impl, mode), r in by.items():
        if r["kind"] != "step" and impl == "ours":
            ref = by.get((name, "diffusers", None))
            rows.append(dict(case=name, what="ours / diffusers", time_s=r["time_s"],
                             time_ratio=ref and r["time_s"] / ref["time_s"],
                             peak_mb=r["peak_mb"], mem_ratio=ref and r["peak_mb"] / ref["peak_mb"]))
        elif r["kind"] == "step" and mode != "plain":
            plain = by.get((name, impl, "plain"))
            rows.append(dict(case=name, what=f"{mode} / plain", time_s=r["time_s"],
                             time_ratio=plain and r["time_s"] / plain["time_s"], peak_mb=r["peak_mb"],
                             mem_ratio=plain and r["extra_mb"] / max(plain["extra_mb"], 1e-9)))
    return rows


def print_table(rows):
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    print(f"\n{'case':34} {'ratio':20} {'time s':>8} {'time x':>7} {'peak MiB':>9} {'mem x':>6}")
    for r in rows:
        print(f"{r['case']:34} {r['what']:20} {r['time_s']:8.3f} {fmt(r['time_ratio'], '7.3f')} "
              f"{r['peak_mb']:9.0f} {fmt(r['mem_ratio'], '6.2f')}")
    print("mem x: peak RSS ratio for forwards; EXTRA peak (peak - memory before the step) ratio for steps.")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small configs only (~1 min on 2 CPU cores)")
    p.add_argument("--json", help="write all measurements and the ratio table to this file")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--only", help="run only cases whose name contains this text")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is steadier on a "
                   "shared machine, where idle-spinning OpenMP threads slow small ops many-fold")
    p.add_argument("--budget", action="store_true", help="the 512 px memory budget: SD-1.5 + rank-8 LoRA, "
                   "64x64 latents, batch 1, plain / regularized x fp32 / bf16 x checkpointing (CPU: ~20 min)")
    p.add_argument("--gpu-check", action="store_true", help="with --device cuda: UNet parity with diffusers "
                   "(fp32/fp16/bf16), the 512 px regularized step at batch 1 and 3, 20-step toy runs")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case as JSON, in this process
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m bench: error: --device cuda but torch.cuda.is_available() is False: no CUDA GPU (or "
                 "a CPU-only torch) here; run the GPU check on a machine with one, or use --device cpu.")
    if args.gpu_check and args.device != "cuda":
        p.error("--gpu-check runs on a GPU: add --device cuda (the CPU parts are in the test suite).")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        case = json.loads(args.one)
        print(json.dumps((measure_budget if case["kind"] == "budget" else measure)(case, args.device)))
        return
    if args.budget:
        run_budget(budget_cases(), args.device, args.json)
        return
    if args.gpu_check:
        gpu_check(args.device, args.json)
        return
    try:
        import diffusers  # noqa: F401  (test/bench-only oracle)
        have_diffusers = True
    except ImportError:
        have_diffusers = False
        print("diffusers not installed: measuring ours alone.")
    cases = [c for c in case_list(args.device, args.quick)
             if (have_diffusers or c["impl"] != "diffusers") and (not args.only or args.only in c["name"])]
    results = []
    for case in cases:
        r = run_case(case, args.device)
        if r is not None:
            results.append(r)
            print(f"  {r['name']:34} {r['impl']:9} {r.get('mode', ''):11} {r['time_s']:8.3f} s "
                  f"peak {r['peak_mb']:7.0f} MiB extra {r['extra_mb']:7.0f} MiB", flush=True)
    rows = ratios(results)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                           results=results, ratios=rows), f, indent=1)


if __name__ == "__main__":
    main()
