"""The paper's Tables 1-4 in miniature, on the toy world, by one command (Smooth Diffusion, Sec. 4).

    python tables.py            # 17 LoRA runs + every evaluation; 2 CPU cores, under an hour
    python tables.py --quick    # the same pipeline with tiny step counts (a smoke test, minutes)

What it does, in order, writing `OUT/results.json` and `OUT/tables.md` after every model it scores:
  * trains (in a background process, one after another) LoRAs on the tiny base `assets/toy-sd` with
    `train.py`, every run with the same data, steps and seed (`toy.TRAIN_DEFAULTS`), differing only in
    the flags of `RUNS`: lambda 0 (the honest control: the same fine-tune without the regularizer),
    lambda 1 (Smooth-LoRA), lambda 0.1, 10 and 100 (Table 3), rank 4 and 16 (Table 4), the cheaper
    regularizer variants of train.py (fd, every 4th step, half the batch), a running mean a per
    tenth of the timesteps at lambda 1, 10, 30 and 100 (not in the paper), and the control, lambda 1
    and per-t lambda 30 again with another seed (how far fine-tuning alone moves ISTD);
  * Table 1: ISTD with the paper's protocol (Sec. 4.1) on the 24 held-out prompts
    (`toy.heldout_prompts()`, = assets/toy-heldout-prompts.txt): strip k uses prompt k mod 24 and the
    noise pair `sampler.noise_pair(seed + k)`, 11 frames along their slerp, DDIM 50 steps, CFG 7.5.
    Every model sees the SAME strips, so models are compared by the paired per-strip difference
    (mean +- standard error). Beside ISTD: the mean adjacent distance (a low ISTD can also be
    uniformly large jumps), and the quality proxies of toy_metrics on all frames: caption accuracy
    (CLIP-score proxy) and the Frechet distance of classifier features to real held-out images
    (FID proxy);
  * Table 2: reconstruction MSE / PSNR / SSIM of real held-out images through DDIM inversion and
    null-text inversion, plus the VAE reconstruction (the optimum); and Eq. 15 edits of the same
    images (shape colour changed) scored by the classifier;
  * Tables 3, 4 and the cheaper-variant table: ISTD and the proxies against the control;
  * figures: interpolation strips (the same noise pairs and prompts for every model) and an Eq. 15
    edit, "a large red circle" -> "a large blue circle".
LoRA runs and evaluations are cached under `--cache` (keyed by the flags, the training code, the base
model's and the LoRA's bytes and the protocol), so an interrupted command continues where it stopped when run again.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import checkpoint
import lora
import metrics
import sampler
import toy
import toy_metrics

ROOT = Path(__file__).resolve().parent

# name -> the train.py flags that differ from toy.TRAIN_DEFAULTS (lambda 1, rank 8, vjp every step).
RUNS = {
    "control": dict(lambda_reg=0.0),
    "smooth": dict(lambda_reg=1.0),
    # One running mean a per tenth of the timesteps (--reg-timestep-buckets, not in the paper).
    "ts_lambda30": dict(lambda_reg=30.0, reg_timestep_buckets=10),
    "lambda10": dict(lambda_reg=10.0),
    "lambda0.1": dict(lambda_reg=0.1),
    "lambda100": dict(lambda_reg=100.0),
    "ts_lambda1": dict(lambda_reg=1.0, reg_timestep_buckets=10),
    "ts_lambda10": dict(lambda_reg=10.0, reg_timestep_buckets=10),
    "ts_lambda100": dict(lambda_reg=100.0, reg_timestep_buckets=10),
    "rank4": dict(lambda_reg=1.0, rank=4),
    "rank16": dict(lambda_reg=1.0, rank=16),
    "fd": dict(lambda_reg=1.0, reg_mode="fd"),
    "every4": dict(lambda_reg=1.0, reg_every=4),
    "half_batch": dict(lambda_reg=1.0, reg_batch_frac=0.5),
    "control_seed1": dict(lambda_reg=0.0, seed=1),  # another seed (data order, noises, LoRA init): how much
    "smooth_seed1": dict(lambda_reg=1.0, seed=1),  # does fine-tuning alone move ISTD?
    "ts_lambda30_seed1": dict(lambda_reg=30.0, reg_timestep_buckets=10, seed=1),
}
# The control each model is paired with (default: "control").
REFERENCE = {"smooth_seed1": "control_seed1", "ts_lambda30_seed1": "control_seed1"}
LABELS = {"base": "base (no LoRA)", "control": "LoRA, lambda 0 (control)", "smooth": "Smooth-LoRA, lambda 1",
          "lambda10": "lambda 10", "lambda0.1": "lambda 0.1", "rank4": "rank 4", "rank16": "rank 16",
          "fd": "--reg-mode fd", "every4": "--reg-every 4", "half_batch": "--reg-batch-frac 0.5",
          "control_seed1": "lambda 0, seed 1", "smooth_seed1": "lambda 1, seed 1", "lambda100": "lambda 100",
          "ts_lambda1": "per-t a, lambda 1", "ts_lambda10": "per-t a, lambda 10",
          "ts_lambda30": "per-t a, lambda 30", "ts_lambda100": "per-t a, lambda 100",
          "ts_lambda30_seed1": "per-t a, lambda 30, seed 1"}
TABLES = {  # table -> the models in its rows (the control is every table's reference)
    "table1": ["base", "control", "smooth", "ts_lambda30"],
    "table3": ["control", "lambda0.1", "smooth", "lambda10", "lambda100"],
    "timestep": ["control", "ts_lambda1", "ts_lambda10", "ts_lambda30", "ts_lambda100"],
    "table4": ["rank4", "smooth", "rank16"],
    "variants": ["smooth", "fd", "every4", "half_batch"],
    "seeds": ["control", "smooth", "ts_lambda30", "control_seed1", "smooth_seed1", "ts_lambda30_seed1"],
}
RECONSTRUCTED = ["control", "smooth", "ts_lambda30", "base"]  # Table 2's models, in the order they are scored
SHORT = {"base": "base", "control": "control (lambda 0)", "smooth": "Smooth-LoRA (lambda 1)",
         "ts_lambda30": "per-t a, lambda 30"}  # row labels of the figures
FIGURE_ROWS = ["base", "control", "smooth", "ts_lambda30"]
EDIT_SOURCE = dict(shape="circle", colour="red", background="white", size="large", cx=16.0, cy=16.0, r=9.5,
                   colour_rgb=toy.COLOURS["red"], background_rgb=toy.COLOURS["white"])
EDIT_TARGET_COLOUR = "blue"


TRAINING_CODE = ("train.py", "regularizer.py", "lora.py", "ops.py", "unet.py")


@dataclass
class Protocol:
    strips: int = 72  # interpolation strips (>= 60): 3 noise pairs for each of the 24 held-out prompts
    frames: int = 11  # mix ratios 0, 0.1, ..., 1 (paper)
    steps: int = 50  # DDIM steps of sampling and inversion (as toy.report and the paper)
    guidance: float = 7.5  # CFG scale (paper)
    seed: int = 0  # strip k uses sampler.noise_pair(seed + k)
    real: int = 1000  # real held-out images: the reference set of the FID proxy
    recon_images: int = 32  # real held-out images inverted and reconstructed (Table 2)
    nti_inner_steps: int = 10  # null-text inversion's Adam steps per timestep (published value)
    edit_r: float = 0.8  # Eq. 15 switch point (the official demo's default)
    chunk: int = 12  # strips sampled in one batch
    train: dict = field(default_factory=dict)  # train.py flags on top of toy.TRAIN_DEFAULTS


QUICK = Protocol(strips=3, steps=2, real=64, recon_images=2, nti_inner_steps=2,
                 train=dict(max_steps=2, batch_size=2, save_every=2))


# -------------------------------------------------------------------------------------- statistics

def paired_difference(values, reference):
    """Mean and standard error of values - reference over paired samples (the same strips)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two equal-length lists of at least 2 paired values (the same strips or "
                         f"images for both models), got shapes {a.shape} and {b.shape}.")
    d = a - b
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "n": len(d)}


def mean_se(values):
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0}


# ---------------------------------------------------------------------------------------- training

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_flags(name, overrides=None):
    """The train.py flags of a run: toy.TRAIN_DEFAULTS, then the protocol's overrides, then RUNS[name]."""
    flags = {**toy.TRAIN_DEFAULTS, **(overrides or {}), **RUNS[name]}
    return [s for k, v in flags.items() for s in (f"--{k.replace('_', '-')}", str(v))]


def train_run(name, model, data, cache, overrides=None, threads=1):
    """Train one LoRA with train.py in a subprocess, or reuse it: a run is cached when its
    smooth_lora.safetensors exists and was made by the same flags, from the same base UNet, by the same
    training code (TRAINING_CODE).
    Returns {"lora", "wall_s" (of the subprocess), "train_loop_s" (train.py's own clock), "cached"}."""
    out = Path(cache) / name
    args = ["--model", str(model), "--data", str(data), "--out", str(out), *train_flags(name, overrides)]
    key = {"args": args, "base_unet": sha256(Path(model) / "unet" / "diffusion_pytorch_model.safetensors"),
           "code": {f: sha256(ROOT / f) for f in TRAINING_CODE}}  # a changed training step retrains
    record_path = out / "tables_run.json"
    if (out / "smooth_lora.safetensors").is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["key"] == key:
            return {**record["result"], "cached": True}
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # 1 thread is fastest on a busy 2-core machine
    t0 = time.time()
    with open(out / "train_stdout.txt", "w") as log:
        code = subprocess.call([sys.executable, str(ROOT / "train.py"), *args], stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.time() - t0
    if code != 0:
        tail = (out / "train_stdout.txt").read_text()[-2000:]
        raise RuntimeError(f"train.py for run {name!r} failed (exit {code}); its output ends:\n{tail}")
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    result = {"lora": str(out / "smooth_lora.safetensors"), "wall_s": round(wall, 1),
              "train_loop_s": steps[-1]["time"] if steps else None, "command": "python train.py " + " ".join(args)}
    record_path.write_text(json.dumps({"key": key, "result": result}, indent=2))
    return {**result, "cached": False}


def training_summary(log_path, last=50):
    """Means over a run's last `last` steps (log.jsonl): the denoising loss, the regularizer's loss, the
    variation norm of Eq. 10 and its running mean a; how large the penalty is beside the MSE."""
    steps = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line][-last:]
    regularized = [s for s in steps if s["regularized"]]  # lambda 0 never, --reg-every k every k-th step
    return {"loss_base": float(np.mean([s["loss_base"] for s in steps])),
            **{k: float(np.mean([s[k] for s in regularized])) if regularized else None
               for k in ("loss_reg", "var_norm", "a")}}


# -------------------------------------------------------------------------------------- evaluation

def load(model, lora_path=None):
    """The toy SD (and LoRA), frozen: nothing here trains the weights."""
    models = checkpoint.load_models(model)
    if lora_path is not None:
        lora.load_lora(models.unet, lora_path)
    for part in (models.unet, models.vae, models.text_encoder):
        part.requires_grad_(False).eval()
    return models


def latent_shape(models):
    return (models.unet.config.in_channels, models.unet.config.sample_size, models.unet.config.sample_size)


def sample_strips(models, prompts, p):
    """The frames of every strip, [strips, frames, 3, H, W] in [0, 1]: strip k is
    sampler.interpolation_strips' strip for prompt k mod len(prompts) and noise pair seed + k."""
    return sampler.interpolation_strips(models.unet, models.vae, models.encode_prompt,
                                        [prompts[k % len(prompts)] for k in range(p.strips)],
                                        latent_shape=latent_shape(models), frames=p.frames, steps=p.steps,
                                        guidance=p.guidance, seed=p.seed, batch=p.chunk, progress=False,
                                        schedule=sampler.make_schedule(models.scheduler_config))


def score_strips(strips, prompts, real_features):
    """ISTD and the quality proxies of sampled strips [S, frames, 3, H, W] (prompt k mod len(prompts))."""
    S, F = strips.shape[:2]
    frames = strips.flatten(0, 1)
    captions = [prompts[k % len(prompts)] for k in range(S) for _ in range(F)]
    return {"per_strip_istd": [metrics.istd(s) for s in strips],
            "per_strip_mean_adjacent_distance": [metrics.adjacent_distances(s).mean().item() for s in strips],
            "caption_accuracy": toy.caption_accuracy(frames, captions),
            "frechet_distance": toy_metrics.frechet_distance(toy_metrics.features(frames, toy.load_classifier()),
                                                             real_features)}


def edit_target(attributes):
    """The caption of the image with its shape recoloured: the next colour that is neither the shape's
    nor the background's (so the edit is always visible)."""
    names = list(toy.COLOURS)
    i = names.index(attributes["colour"])
    colour = next(c for c in names[i + 1:] + names[:i] if c != attributes["background"])
    return toy.caption({**attributes, "colour": colour})


def reconstruct(models, images01, captions, targets, p):
    """DDIM-inversion and null-text-inversion reconstructions, and Eq. 15 edits from the NTI inversion.

    Each image gets its own null embeddings: the batch's nulls form one [B, 77, D] tensor, and since
    the NTI loss is a sum of per-image terms and Adam acts element-wise, this is B independent
    inversions (except that the early stop waits for the batch's total loss).
    Returns {"ddim", "nti", "edit"}: images [B, 3, H, W] in [0, 1].
    """
    schedule = sampler.make_schedule(models.scheduler_config)
    unet, B = models.unet, len(images01)
    latents = sampler.encode_images(models.vae, images01)
    with torch.no_grad():
        cond, cond_target = models.encode_prompt(captions), models.encode_prompt(targets)
        uncond = models.encode_prompt([""])
    kw = dict(steps=p.steps, schedule=schedule, progress=False)
    x_T = sampler.ddim_invert(unet, latents, cond, **kw)  # Eq. 4
    ddim = sampler.ddim_sample(unet, x_T, cond, uncond, guidance=p.guidance, **kw)
    x_T, nulls = sampler.null_text_invert(unet, latents, cond, uncond.expand(B, -1, -1).clone(),
                                          guidance=p.guidance, inner_steps=p.nti_inner_steps, **kw)
    nti = sampler.ddim_sample(unet, x_T, cond, nulls, guidance=p.guidance, **kw)
    edited = sampler.edit(unet, x_T, nulls, cond, cond_target, r=p.edit_r, guidance=p.guidance, **kw)  # Eq. 15
    return {k: sampler.decode_latents(models.vae, z) for k, z in (("ddim", ddim), ("nti", nti), ("edit", edited))}


def image_metrics(x, y):
    """Per-image MSE / PSNR / SSIM lists of images in [0, 1]."""
    return {"mse": metrics.mse(x, y).tolist(), "psnr": metrics.psnr(x, y).tolist(), "ssim": metrics.ssim(x, y).tolist()}


def recon_inputs(p):
    """The Table 2 images: the Eq. 15 figure's red circle first, then `recon_images` real held-out images
    (only these are scored). Returns (images01, captions, edit targets)."""
    images, attributes = toy.make_images(p.recon_images, seed=p.seed + 11, split="heldout")
    images = np.concatenate([toy.draw(EDIT_SOURCE)[None], images])
    captions = [toy.caption(EDIT_SOURCE)] + [toy.caption(a) for a in attributes]
    targets = [toy.caption({**EDIT_SOURCE, "colour": EDIT_TARGET_COLOUR})] + [edit_target(a) for a in attributes]
    return toy_metrics.images01(images), captions, targets


def cached(path, key, compute):
    """compute() once per key: the JSON result (and, for tensors, a .pt beside it) lives in `path`."""
    path = Path(path)
    if path.is_file():
        record = json.loads(path.read_text())
        if record["key"] == key:
            return record["result"], torch.load(path.with_suffix(".pt"), weights_only=True)
    result, tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path.with_suffix(".pt"))
    path.write_text(json.dumps({"key": key, "result": result}))
    return result, tensors


# ------------------------------------------------------------------------------------- the tables

def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_diff(d, digits=3):
    if d is None:
        return "–"
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f} ({100 * d['relative']:+.0f}%)"


def summary(name, scores, runs):
    """One table row's numbers: the model's means, and its paired differences to its control."""
    s, control = scores.get(name), scores.get(REFERENCE.get(name, "control"))
    if s is None:
        return None
    row = {"istd": float(np.mean(s["per_strip_istd"])),
           "istd_se": mean_se(s["per_strip_istd"])["se"],
           "mean_adjacent_distance": float(np.mean(s["per_strip_mean_adjacent_distance"])),
           "fid_proxy": s["frechet_distance"], "caption_accuracy": s["caption_accuracy"]["caption"],
           "eval_s": s.get("eval_s"), "train_s": runs.get(name, {}).get("wall_s")}
    if control is not None and control is not s:
        row["istd_vs_control"] = paired_difference(s["per_strip_istd"], control["per_strip_istd"])
        row["istd_vs_control"]["relative"] = row["istd_vs_control"]["mean"] / float(np.mean(control["per_strip_istd"]))
        row["reference"] = REFERENCE.get(name, "control")
        row["mean_adjacent_distance_vs_control"] = paired_difference(
            s["per_strip_mean_adjacent_distance"], control["per_strip_mean_adjacent_distance"])
    return row


def render_markdown(results):
    """tables.md from results.json's dict: one markdown table per paper table, with the command and runtime."""
    rows, recon, runs = results["rows"], results.get("reconstruction", {}), results.get("runs", {})
    command = results["command"]
    measured = sum(r.get("wall_s") or 0 for r in runs.values()) + results.get("reconstruction_s", 0) + \
        sum((r or {}).get("eval_s") or 0 for r in rows.values())
    lines = [f"Regenerate everything: `{command}` (LoRA runs and scores are cached under "
             f"`{results['cache']}`; a second run reuses them). Protocol: {results['protocol_text']}. "
             f"Measured times, summed over every LoRA run and every scoring: {measured / 60:.1f} min on a "
             f"shared 2-core CPU (training runs in a second process beside the scoring, so the wall time "
             f"from scratch is less); the invocation that wrote this file took {results['total_s'] / 60:.1f} min "
             f"and computed {len(results.get('computed', []))} of these (LoRA runs and scorings), reading the "
             f"rest from the cache.",
             ""]

    def runtime(names):
        seconds = sum((rows.get(n) or {}).get("eval_s") or 0 for n in names)
        seconds += sum(runs.get(n, {}).get("wall_s") or 0 for n in names)
        return f"{seconds / 60:.1f} min"

    def smooth_table(title, names, extra=None):
        head = ["model", "ISTD ↓", "ΔISTD vs control (paired, ± s.e.)", "mean adjacent distance",
                "FID-proxy ↓", "caption accuracy ↑"] + ([extra[0]] if extra else [])
        out = [f"### {title}", "", f"`{command}` — train + score time of these rows: {runtime(names)}", "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in names:
            r = rows.get(n)
            if r is None:
                out.append(f"| {LABELS[n]} | " + " | ".join(["pending"] * (len(head) - 1)) + " |")
                continue
            cells = [LABELS[n], f"{r['istd']:.3f} ± {r['istd_se']:.3f}",
                     "(reference)" if n == "control" else fmt_diff(r.get("istd_vs_control")),
                     fmt(r["mean_adjacent_distance"]), fmt(r["fid_proxy"], 2), fmt(r["caption_accuracy"])]
            if extra:
                cells.append(extra[1](n))
            out.append("| " + " | ".join(cells) + " |")
        return out + [""]

    def train_time(n):
        r = runs.get(n)
        return "–" if r is None else f"{r['wall_s']:.0f} s"

    lines += smooth_table("Table 1: smoothness (ISTD) and quality proxies", TABLES["table1"])
    lines += ["### Table 2: reconstruction of real held-out images (DDIM inversion, null-text inversion) "
              "and Eq. 15 edits", "",
              f"`{command}` — {results.get('reconstruction_s', 0) / 60:.1f} min of scoring", "",
              "| model + inversion | MSE ↓ | PSNR ↑ | SSIM ↑ | ΔPSNR vs control (paired) |",
              "|---|---|---|---|---|"]
    if "vae" in recon:
        v = recon["vae"]
        lines.append(f"| VAE reconstruction (optimum) | {v['mse']:.5f} | {v['psnr']:.2f} | {v['ssim']:.4f} | |")
    for inversion in ("ddim", "nti"):
        for n in RECONSTRUCTED:
            r = recon.get(n, {}).get(inversion)
            if r is None:
                lines.append(f"| {LABELS[n]} + {inversion.upper()} | pending | pending | pending | |")
                continue
            d = r.get("psnr_vs_control")
            delta = "" if d is None else f"{d['mean']:+.2f} ± {d['se']:.2f} dB"
            lines.append(f"| {LABELS[n]} + {inversion.upper()} | {r['mse']:.5f} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.4f} | {delta} |")
    lines += ["", "| model | Eq. 15 edit: target colour seen ↑ | all target attributes seen ↑ |", "|---|---|---|"]
    for n in RECONSTRUCTED:
        e = recon.get(n, {}).get("edit")
        if e is not None:
            lines.append(f"| {LABELS[n]} | {e['colour']:.3f} | {e['caption']:.3f} |")
    lines.append("")
    lines += smooth_table("Table 3: regularization ratio lambda", TABLES["table3"])
    lines += smooth_table("Per-timestep running mean a (--reg-timestep-buckets 10; not in the paper)",
                          TABLES["timestep"])
    lines[-1:-1] = ["Eq. 9 with one running mean a per tenth of the timesteps, so that the penalty evens out "
                    "the norm across noises and directions at each t instead of fighting its growth with t."]
    lines += smooth_table("Table 4: LoRA rank (lambda 1)", TABLES["table4"])
    lines += smooth_table("Cheaper regularizer variants (lambda 1; issue 7)", TABLES["variants"],
                          extra=("train wall time", train_time))
    lines += smooth_table("Seed check: the same two runs with another seed", TABLES["seeds"])
    lines[-1:-1] = ["lambda 0, seed 1 is paired with the seed-0 control (what fine-tuning alone does to ISTD); "
                    "the other seed-1 rows with lambda 0, seed 1 (the regularizer's effect at another seed)."]
    prompts = results.get("prompts", [])
    lines += ["### Figures", "",
              "![interpolation strips](interpolation.png)", "",
              "Interpolation strips (11 frames, slerp mix 0 to 1), the same noise pair and prompt for every "
              "model in a block; rows " + ", ".join(SHORT[n] for n in FIGURE_ROWS) +
              "; blocks 1-3 are strips 0-2 of Table 1: " +
              "; ".join(f'{k + 1}: "{prompts[k % len(prompts)]}"' for k in range(min(3, len(prompts)))) + ".", "",
              "![Eq. 15 edit](edit.png)", "",
              f'Eq. 15 edit (r = {results.get("protocol", {}).get("edit_r", 0.8)}): source '
              f'"{toy.caption(EDIT_SOURCE)}" | its null-text-inversion reconstruction | target '
              f'"{toy.caption({**EDIT_SOURCE, "colour": EDIT_TARGET_COLOUR})}", one row per model.', ""]
    lines += ["### The LoRA runs", "", "Means over the last 50 training steps (train.py's log.jsonl); wall "
              "time of the train.py process, start-up included.", "",
              "| run | wall time | denoising loss | regularizer loss (Eq. 9) | variation norm (Eq. 10) "
              "| running mean a |",
              "|---|---|---|---|---|---|"]
    for n, r in runs.items():
        t = r.get("last_50_steps", {})
        lines.append(f"| {LABELS[n]} | {r['wall_s']:.0f} s | " +
                     " | ".join(fmt(t.get(k), 4) for k in ("loss_base", "loss_reg", "var_norm", "a")) + " |")
    lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- figures

def _labelled_grid(rows, scale=2, label_width=150):
    """rows: [(label, images [N, 3, H, W] in [0, 1])] -> one PIL image, a text label left of each row."""
    strips = [np.concatenate(list((im.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)), axis=1)
              for _, im in rows]
    h, w = strips[0].shape[0] * scale, max(s.shape[1] for s in strips) * scale
    canvas = Image.new("RGB", (label_width + w, h * len(rows)), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    for i, ((label, _), strip) in enumerate(zip(rows, strips)):
        image = Image.fromarray(strip).resize((strip.shape[1] * scale, h), Image.NEAREST)
        canvas.paste(image, (label_width, i * h))
        pen.text((4, i * h + h // 2 - 6), label, fill=(0, 0, 0))
    return canvas


def save_figures(out, strips, edits):
    """interpolation.png: the first strips of each Table 1 model (same noises and prompt per block);
    edit.png: source | NTI reconstruction | Eq. 15 edit, per model."""
    written = []
    names = [n for n in FIGURE_ROWS if n in strips]
    if names:
        rows = [(f"{k + 1}: {SHORT[n]}", strips[n][k]) for k in range(min(3, len(strips[names[0]]))) for n in names]
        _labelled_grid(rows).quantize(256).save(out / "interpolation.png")  # a palette PNG: small
        written.append(out / "interpolation.png")
    if edits:
        rows = [(SHORT[n], torch.stack([e["source"], e["nti"], e["edit"]])) for n, e in edits.items()]
        _labelled_grid(rows, scale=4).quantize(256).save(out / "edit.png")
        written.append(out / "edit.png")
    return written


# ------------------------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test of the pipeline")
    parser.add_argument("--out", default=None, help="tables and figures (default: assets/tables, "
                        "or runs/tables_quick/out with --quick)")
    parser.add_argument("--cache", default=None, help="LoRA runs and scores (default: runs/tables, "
                        "or runs/tables_quick with --quick)")
    parser.add_argument("--model", default=str(toy.MODEL_DIR), help="the base model (default: the toy SD)")
    parser.add_argument("--data", default=str(ROOT / "data" / "toy"), help="training images (toy.prepare_data)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in each train.py")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else Protocol()
    cache = Path(args.cache or ("runs/tables_quick" if args.quick else "runs/tables"))
    out = Path(args.out or (cache / "out" if args.quick else ROOT / "assets" / "tables"))
    if not (Path(args.model) / "model_index.json").is_file():
        raise SystemExit(f"tables.py: error: no model at {args.model}; build it with `python toy.py pretrain`.")
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    command = "python tables.py" + (" --quick" if args.quick else "")
    toy.prepare_data(args.data)
    prompts = toy.heldout_prompts()
    base_key = [sha256(Path(args.model) / "unet" / "diffusion_pytorch_model.safetensors"),
                sha256(toy_metrics.CLASSIFIER_PATH)]  # the scores depend on the measuring classifier too
    protocol = {k: v for k, v in dataclasses.asdict(p).items() if k != "chunk"}
    results = {"command": command, "cache": str(cache), "protocol": protocol, "prompts": prompts,
               "protocol_text": f"{p.strips} interpolation strips (strip k: held-out prompt k mod {len(prompts)}, "
                                f"noise pair seed {p.seed} + k), {p.frames} frames, DDIM {p.steps} steps, "
                                f"CFG {p.guidance}, "
                                f"FID-proxy against {p.real} real held-out images, all frames; "
                                f"{p.recon_images} real held-out images reconstructed; LoRA runs: "
                                f"toy.TRAIN_DEFAULTS {toy.TRAIN_DEFAULTS}" + (f" with {p.train}" if p.train else ""),
               "runs": {}, "scores": {}, "rows": {}, "reconstruction": {}, "total_s": 0.0, "computed": []}

    def write():
        results["rows"] = {n: summary(n, results["scores"], results["runs"]) for n in LABELS
                           if n in results["scores"]}
        for n, r in results["reconstruction"].items():
            if n not in ("vae", "control") and "control" in results["reconstruction"]:
                for inv in ("ddim", "nti"):
                    r[inv]["psnr_vs_control"] = paired_difference(
                        r[inv]["per_image"]["psnr"], results["reconstruction"]["control"][inv]["per_image"]["psnr"])
        results["total_s"] = time.time() - t_start
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "tables.md").write_text(render_markdown(results))

    # Training runs one after another in a background process while this one scores what is ready.
    pool = ThreadPoolExecutor(max_workers=1)
    futures = {n: pool.submit(train_run, n, args.model, args.data, cache, p.train, args.threads) for n in RUNS}

    real_images, _ = toy.make_images(p.real, seed=p.seed + 7, split="heldout")
    real_features = toy_metrics.features(toy_metrics.images01(real_images), toy.load_classifier())
    strips, edits = {}, {}
    recon_images, captions, targets = recon_inputs(p)
    scored = slice(1, None)  # image 0 is the edit figure's source, not a held-out image

    def lora_of(name):
        if name == "base":
            return None, "none"
        run = futures[name].result()  # waits for its training
        if name not in results["runs"]:
            results["runs"][name] = {**run, "last_50_steps": training_summary(Path(run["lora"]).parent / "log.jsonl")}
            if not run["cached"]:
                results["computed"].append(f"train {name}")
            state = "cached" if run["cached"] else "trained in %.0f s" % run["wall_s"]
            print(f"[tables] run {name}: {state}", flush=True)
        return run["lora"], sha256(run["lora"])

    vae = load(args.model).vae
    vae_recon = sampler.decode_latents(vae, sampler.encode_images(vae, recon_images))
    m = image_metrics(vae_recon[scored], recon_images[scored])
    results["reconstruction"]["vae"] = {k: float(np.mean(v)) for k, v in m.items()}

    def score(name, models, key):
        def compute():
            t0 = time.time()
            results["computed"].append(f"score {name}")
            s = sample_strips(models, prompts, p)
            return {**score_strips(s, prompts, real_features), "eval_s": round(time.time() - t0, 1)}, s[:3].clone()

        results["scores"][name], strips[name] = cached(cache / name / "scores.json", key, compute)
        print(f"[tables] {name}: ISTD {np.mean(results['scores'][name]['per_strip_istd']):.4f} "
              f"({results['scores'][name]['eval_s']:.0f} s)", flush=True)

    def reconstruction(name, models, key):
        def compute():
            t0 = time.time()
            results["computed"].append(f"reconstruct {name}")
            r = reconstruct(models, recon_images, captions, targets, p)
            result = {inv: {"per_image": image_metrics(r[inv][scored], recon_images[scored])}
                      for inv in ("ddim", "nti")}
            for inv in result:
                result[inv].update({k: float(np.mean(v)) for k, v in result[inv]["per_image"].items()})
            acc = toy.caption_accuracy(r["edit"][scored], targets[scored])
            result["edit"] = {"caption": acc["caption"], "colour": acc["colour"]}
            result["eval_s"] = round(time.time() - t0, 1)
            return result, {"source": recon_images[0], "nti": r["nti"][0], "edit": r["edit"][0]}

        results["reconstruction"][name], edits[name] = cached(cache / name / "reconstruction.json", key, compute)
        results["reconstruction_s"] = sum(r.get("eval_s", 0) for r in results["reconstruction"].values())
        r = results["reconstruction"][name]
        print(f"[tables] {name}: reconstruction PSNR DDIM {r['ddim']['psnr']:.2f}, NTI {r['nti']['psnr']:.2f}",
              flush=True)

    # Table 1 and 2 first (the paper's claim), then the ablations; the base's reconstruction last.
    first = ["control", "smooth", "ts_lambda30"]
    todo = [(score, "base")] + [(task, n) for n in first for task in (score, reconstruction)] + \
           [(score, n) for n in RUNS if n not in first] + [(reconstruction, "base")]
    for task, name in todo:
        lora_path, lora_key = lora_of(name)
        task(name, load(args.model, lora_path), {"protocol": protocol, "base": base_key, "lora": lora_key})
        write()
        save_figures(out, strips, edits)
    pool.shutdown()
    write()
    print(f"[tables] wrote {out / 'tables.md'}, {out / 'results.json'} and the figures in "
          f"{time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
