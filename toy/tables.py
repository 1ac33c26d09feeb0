"""The paper's tables in miniature, on the toy world, by one command (Smooth Diffusion, Sec. 4).

    python -m toy tables            # 25 LoRA runs + every evaluation; 2 idle CPU cores, ~2.5 hours
    python -m toy tables --quick    # the same pipeline with tiny step counts (a smoke test, minutes)
    python -m toy tables --plan     # print the runs, their train.py flags and the time estimate; run nothing

The runs (`plan_runs`), every one derived from toy/main_job.py, so that changing `main_job.OUR_FORM` or
`main_job.TRAIN_DEFAULTS` changes the tables without editing this file:
  * the control (lambda 0: the same fine-tune without the regularizer), the paper's form
    (`main_job.PAPER_FORM`) and ours (`main_job.OUR_FORM`), at training seeds 0, 1 and 2 (the forms at seed s
    are paired with the control at seed s, the controls at seeds 1, 2 with the seed-0 one: what another seed
    alone does);
  * a lambda curve for each form: the paper's form at lambda 0.1, 1, 10, 100; ours at 1/3, 1, 3 and 10 times
    OUR_FORM's lambda (10: past the quality budget, to show the whole trade-off);
  * fine-tune length: control, paper's form and ours at max_steps 300, 1000 and 3000, each paired with
    the control of the same length;
  * the validation search's choice (`Protocol.chosen`, found by `python -m toy.search` on validation prompts:
    ours at 1000 steps) at seeds 1 and 2 too, each paired with the control of its length and seed.
A run's flags are main_job.TRAIN_DEFAULTS without OUR_FORM's flags (what every run shares), then the form,
then the variation. A control gets the form's flags that act without the regularizer (none today: both
forms differ only in lambda_reg and reg_* flags, so one control serves both). Runs with identical flags
are trained and scored once (e.g. "paper, lambda 1" is "paper", "ours, 300 steps" is "ours").

The ISTD protocol (issue 11: one set of strips can show an effect another does not): every model is
scored on TWO DISJOINT sets of noise pairs, set A (seeds 0..63) and set B (seeds 1000..1063), at TWO DDIM
step counts (25 and 50), CFG 7.5, 11 frames; strip k uses held-out prompt k mod 24 (`world.heldout_prompts()`)
and `sampler.noise_pair(set_seed + k)`. Every model sees the same strips as its control, so each of the
four (set, steps) cells gives a paired difference (mean +- s.e. over 64 strips, `instruments.
paired_difference`), reported relative to the control's mean ISTD. A claim HOLDS only if the paired
difference has the same sign and |mean| > 2 s.e. in all four cells (`holds`). Beside ISTD, from set A at
50 steps: the mean adjacent distance, caption accuracy, the FID-proxy and the KID-proxy with its s.e.
(`report.score_strips`; the KID-proxy of set B at 50 steps measures the instrument's own noise).
Table 2 (reconstruction of real held-out images by DDIM inversion at 10, 20 and 50 steps and by null-text
inversion at 50; Eq. 15 edits scored on what changed and what stayed, `report.edit_scores`) is measured
for the base and every seed's control and forms, each paired with its control; "The paper's three
claims" puts the three side by side for every seed (and claims.png).
Dropped from the earlier tables (each a full run for a question these tables do not ask): LoRA rank
4/16 (Table 4), --reg-mode fd, --reg-every 4, --reg-batch-frac 0.5.

Cost of the full command from scratch (`estimate_seconds`, printed by `--plan` for the current toy world;
300 toy steps ~60 s at 1 thread on an idle machine, a regularized step ~2x a plain one, 64 strips at 50
DDIM steps ~1 min and at 25 steps ~0.5 min):
  * 25 distinct LoRA runs (30 in the plan, 5 of them the same runs under another name) = 20,500 toy steps,
    6,900 plain and 13,600 regularized: ~114 min of training;
  * 26 models (the base and the 25 runs) x 4 cells x 64 strips = 6,656 strips of 11 frames, ~3 min per
    model: ~78 min of sampling;
  * Table 2: 26 models x 32 images through DDIM inversion and null-text inversion: ~65 min.
So ~4 hours of one core; training runs in a background process beside the scoring, so on 2 idle cores
the wall time is about the scoring's ~2.5 hours (longer on a busy machine).

Everything is written to `OUT/results.json` and `OUT/tables.md` after every model it scores. LoRA runs and
evaluations are cached under `--cache` (keyed by the flags, the training code, the base model's and the
LoRA's bytes and the protocol), so an interrupted command continues where it stopped when run again.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import checkpoint
import data
import lora
import sampler
from toy import instruments, main_job, report, world

ROOT = Path(__file__).resolve().parents[1]
TRAINING_CODE = ("train.py", "regularizer.py", "lora.py", "ops.py", "unet.py")
FORMS = {"paper": main_job.PAPER_FORM, "ours": main_job.OUR_FORM}
FORM_LABELS = {"control": "control (lambda 0)", "paper": "paper's form", "ours": "our form"}
EDIT_SOURCE = dict(shape="circle", colour="red", background="white", size="large", cx=16.0, cy=16.0, r=9.5,
                   colour_rgb=world.COLOURS["red"], background_rgb=world.COLOURS["white"])
EDIT_TARGET_COLOUR = "blue"
DROPPED = ("LoRA rank 4 and 16 (Table 4), --reg-mode fd, --reg-every 4 and --reg-batch-frac 0.5 (issue 7's "
           "cheaper variants): each a full run for a question this table set does not ask; "
           "`git log --follow -- toy/tables.py` has the code that measured them.")


@dataclass
class Protocol:
    strips: int = 64  # strips per set of noise pairs (>= 64: issue 11)
    sets: tuple = (0, 1000)  # set A: noise pairs of seeds 0..strips-1, set B: 1000.. (disjoint)
    step_counts: tuple = (25, 50)  # DDIM steps; the last is the one of Table 2 and of the quality proxies
    frames: int = 11  # mix ratios 0, 0.1, ..., 1 (paper)
    guidance: float = 7.5  # CFG scale (paper)
    real: int = 1000  # real held-out images: the reference set of the FID proxy
    recon_images: int = 32  # real held-out images inverted and reconstructed (Table 2)
    inversion_step_counts: tuple = (10, 20)  # DDIM inversion also at these step counts (it errs more; issue 21)
    nti_inner_steps: int = 10  # null-text inversion's Adam steps per timestep (published value)
    edit_r: float = 0.8  # Eq. 15 switch point (the official demo's default)
    chunk: int = 12  # strips sampled in one batch
    paper_lambdas: tuple = (0.1, 1.0, 10.0, 100.0)  # the paper's form's lambda curve (Table 3)
    our_lambda_factors: tuple = (1 / 3, 1.0, 3.0, 10.0)  # ours: these times OUR_FORM's lambda
    lengths: tuple = (300, 1000, 3000)  # fine-tune lengths (max_steps)
    seeds: tuple = (0, 1, 2)  # training seeds of the control and both forms (>= 3: issue 21)
    # The validation search's choice (`python -m toy.search`: the only candidate with ISTD <= 0.60x at no KID
    # cost on validation prompts), confirmed here at every seed against the control of its length and seed.
    chosen: dict = field(default_factory=lambda: dict(max_steps=1000))
    train: dict = field(default_factory=dict)  # train.py flags on top of the common main_job.TRAIN_DEFAULTS

    @property
    def cells(self):
        """The four (set, steps) cells every comparison is measured in: [("A", 0, 25), ...]."""
        return [("AB"[i], seed, steps) for i, seed in enumerate(self.sets) for steps in self.step_counts]

    @property
    def quality_cell(self):
        """Set A at the most DDIM steps: the cell of the quality proxies and the figures."""
        return self.cells[len(self.step_counts) - 1]


QUICK = Protocol(strips=3, step_counts=(2, 3), real=64, recon_images=2, nti_inner_steps=2, lengths=(2, 3, 4),
                 inversion_step_counts=(2,), chosen=dict(max_steps=3),
                 train=dict(max_steps=2, batch_size=2, save_every=2))


# ---------------------------------------------------------------------------------------- the runs

@dataclass(frozen=True)
class Run:
    flags: dict | None  # every train.py flag of the run; None: the base model (no LoRA)
    control: str | None  # the run it is paired with; None for a control
    label: str


def common_flags(p):
    """What every run shares: main_job.TRAIN_DEFAULTS without OUR_FORM's flags, then the protocol's overrides."""
    return {**{k: v for k, v in main_job.TRAIN_DEFAULTS.items() if k not in main_job.OUR_FORM}, **p.train}


def acts_without_regularizer(form):
    """A form's flags that change training even at lambda 0 (not lambda_reg, not the reg_* ones)."""
    return {k: v for k, v in form.items() if k != "lambda_reg" and not k.startswith("reg_")}


def control_name(form_name):
    """One control for both forms when they train alike at lambda 0, else one per form."""
    shared = acts_without_regularizer(main_job.PAPER_FORM) == acts_without_regularizer(main_job.OUR_FORM)
    return "control" if shared else f"control_{form_name}"


def round_lambda(x):
    return float(f"{x:.6g}")  # 30 / 3 -> 10.0, not 10.000000000000002 on the command line


def variant(p, form_name, *, control=False, lambda_reg=None, max_steps=None, seed=0):
    """(name, Run) of a form ("paper" or "ours") or, with control=True, of its lambda-0 control, with an
    optional other lambda, fine-tune length (max_steps) or training seed. A form's run is paired with
    the control of the same length and seed, a control at seed s > 0 with the seed-0 control."""
    form = FORMS[form_name]
    if control:
        name, label = control_name(form_name), FORM_LABELS["control"]
        flags = {**common_flags(p), **acts_without_regularizer(form), "lambda_reg": 0.0}
    else:
        name, flags = form_name, {**common_flags(p), **form}
        if lambda_reg is not None:
            name, flags["lambda_reg"] = f"{name}_lambda{lambda_reg:g}", lambda_reg
        label = f"{FORM_LABELS[form_name]}, lambda {flags['lambda_reg']:g}"
    if max_steps is not None:
        name, flags["max_steps"], label = f"{name}_steps{max_steps}", max_steps, f"{label}, {max_steps} steps"
    if seed:
        name, flags["seed"], label = f"{name}_seed{seed}", seed, f"{label}, seed {seed}"
    if not control:
        paired = variant(p, form_name, control=True, max_steps=max_steps, seed=seed)[0]
    else:  # a control at another seed against seed 0's: how far fine-tuning alone moves ISTD (should not hold)
        paired = variant(p, form_name, control=True, max_steps=max_steps)[0] if seed else None
    return name, Run(flags, paired, label)


def plan_runs(p):
    """Every model of the tables, in the order they are trained and scored: name -> Run. Names may share
    flags (see `canonical`)."""
    plan = {"base": Run(None, control_name("ours"), "base (no LoRA)")}
    for seed in p.seeds:
        for form in FORMS:
            plan.update([variant(p, form, control=True, seed=seed), variant(p, form, seed=seed)])
    our_lambda = main_job.OUR_FORM["lambda_reg"]
    plan.update(variant(p, "paper", lambda_reg=round_lambda(lam)) for lam in p.paper_lambdas)
    plan.update(variant(p, "ours", lambda_reg=round_lambda(f * our_lambda)) for f in p.our_lambda_factors)
    for steps in p.lengths:
        for form in FORMS:
            plan.update([variant(p, form, control=True, max_steps=steps), variant(p, form, max_steps=steps)])
    for seed in p.seeds:
        plan.update([variant(p, "ours", control=True, seed=seed, max_steps=p.chosen.get("max_steps")),
                     variant(p, "ours", seed=seed, **p.chosen)])
    return plan


def canonical(plan):
    """name -> the first name in the plan with the same flags: runs that are the same are done once."""
    first = {}
    for name, run in plan.items():
        first.setdefault(json.dumps(run.flags, sort_keys=True) if run.flags else name, name)
    return {name: first[json.dumps(run.flags, sort_keys=True) if run.flags else name]
            for name, run in plan.items()}


def table_rows(p):
    """Table -> the plan names in its rows (before aliasing)."""
    controls = list(dict.fromkeys(control_name(f) for f in FORMS))
    lam = main_job.OUR_FORM["lambda_reg"]
    rows = {
        "table1": ["base", *controls, *FORMS],
        "lambda": [*controls, *(f"paper_lambda{round_lambda(x):g}" for x in p.paper_lambdas),
                   *(f"ours_lambda{round_lambda(f * lam):g}" for f in p.our_lambda_factors)],
        "length": [f"{n}_steps{s}" for s in p.lengths for n in (*controls, *FORMS)],
        "seeds": [n + suffix for suffix in ("", *(f"_seed{s}" for s in p.seeds[1:])) for n in (*controls, *FORMS)],
        "chosen": [variant(p, "ours", control=control, seed=seed, **(p.chosen if not control else
                                                                       {"max_steps": p.chosen.get("max_steps")}))[0]
                   for seed in p.seeds for control in (True, False)],
    }
    # Table 2 for every LoRA of the tables (issue 21: does the downstream gain track smoothness?), each once
    rows["reconstruction"] = list(dict.fromkeys([*controls, *FORMS, "base", *rows["seeds"], *rows["lambda"],
                                                 *rows["length"], *rows["chosen"]]))
    return rows


def train_flags(flags):
    """train.py's command-line flags of a flag dict."""
    return [s for k, v in flags.items() for s in (f"--{k.replace('_', '-')}", str(v))]


def estimate_seconds(p, plan, step_s=0.2, reg_factor=2.0, strip_step_s=60 / (64 * 50), recon_s=150):
    """The full command's cost from scratch: training (300 toy steps ~60 s at 1 thread, a regularized step
    ~reg_factor x a plain one), sampling (64 strips at 50 DDIM steps ~1 min) and Table 2 (~recon_s per
    model). Returns {"runs", "train_steps", "train_s", "strips", "score_s", "recon_s"}."""
    names = canonical(plan)
    runs = [plan[n] for n in dict.fromkeys(names.values()) if plan[n].flags is not None]
    steps = [(r.flags["max_steps"], r.flags["lambda_reg"] > 0) for r in runs]
    models = len(set(names.values()))
    strips = models * len(p.cells) * p.strips
    return {"runs": len(runs), "train_steps": sum(s for s, _ in steps),
            "train_s": sum(s * step_s * (reg_factor if reg else 1.0) for s, reg in steps),
            "strips": strips, "score_s": models * p.strips * len(p.sets) * sum(p.step_counts) * strip_step_s,
            "recon_s": len({names[n] for n in table_rows(p)["reconstruction"]}) * recon_s}


# ---------------------------------------------------------------------------------------- training

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_run(name, flags, model, data, cache, threads=1, cached_only=False):
    """Train one LoRA with train.py in a subprocess, or reuse it: a run is cached when its
    smooth_lora.safetensors exists and was made by the same flags, from the same base UNet and toy images
    (world.DATA_RECORD), by the same training code (TRAINING_CODE).
    Returns {"lora", "wall_s" (of the subprocess), "train_loop_s" (train.py's own clock), "cached"}; with
    cached_only, None instead of training."""
    out = Path(cache) / name
    args = ["--model", str(model), "--data", str(data), "--out", str(out), *train_flags(flags)]
    record = Path(data) / world.DATA_RECORD  # the fingerprint of toy images (other data: its path only)
    key = {"args": args, "base_unet": sha256(Path(model) / "unet" / "diffusion_pytorch_model.safetensors"),
           "code": {f: sha256(ROOT / f) for f in TRAINING_CODE if (ROOT / f).is_file()},
           "data": sha256(record) if record.is_file() else None}
    record_path = out / "tables_run.json"
    if (out / "smooth_lora.safetensors").is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["key"] == key:
            return {**record["result"], "cached": True}
    if cached_only:
        return None
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # 1 thread is fastest on a busy 2-core machine
    t0 = time.time()
    with open(out / "train_stdout.txt", "w") as log:
        # --overwrite: a stale run in `out` (another key) is retrained; not in args, so not in the cache key
        code = subprocess.call([sys.executable, str(ROOT / "train.py"), *args, "--overwrite"], stdout=log,
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
    regularized = [s for s in steps if s["regularized"]]  # lambda 0 never
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


def sample_strips(models, prompts, p, *, seed, steps):
    """The frames of every strip of one cell, [strips, frames, 3, H, W] in [0, 1]: strip k is
    sampler.interpolation_strips' strip for prompt k mod len(prompts) and noise pair seed + k."""
    return sampler.interpolation_strips(models.unet, models.vae, models.encode_prompt,
                                        [prompts[k % len(prompts)] for k in range(p.strips)],
                                        latent_shape=latent_shape(models), frames=p.frames, steps=steps,
                                        guidance=p.guidance, seed=seed, batch=p.chunk, progress=False,
                                        schedule=sampler.make_schedule(models.scheduler_config))


def edit_target(attributes):
    """The caption of the image with its shape recoloured: the next colour that is neither the shape's
    nor the background's (so the edit is always visible)."""
    names = list(world.COLOURS)
    i = names.index(attributes["colour"])
    colour = next(c for c in names[i + 1:] + names[:i] if c != attributes["background"])
    return world.caption({**attributes, "colour": colour})


def reconstruct(models, images01, captions, targets, p, nti=True):
    """DDIM-inversion and null-text-inversion reconstructions, and Eq. 15 edits from the NTI inversion,
    at the protocol's largest step count; DDIM inversion also at `p.inversion_step_counts` steps.

    Each image gets its own null embeddings: the batch's nulls form one [B, 77, D] tensor, and since
    the NTI loss is a sum of per-image terms and Adam acts element-wise, this is B independent
    inversions (except that the early stop waits for the batch's total loss).
    Returns {"ddim" (at the largest step count), "ddim_N" (at N steps), "ddim1_N" (at N steps, sampled back
    at CFG 1), "nti", "edit"}: images
    [B, 3, H, W] in [0, 1]. nti=False: only the DDIM inversions (minutes, where NTI takes ~10x longer).
    """
    schedule = sampler.make_schedule(models.scheduler_config)
    unet, B, steps = models.unet, len(images01), max(p.step_counts)
    out = {"ddim" if n == steps else f"ddim_{n}": report.ddim_reconstruct(models, images01, captions, steps=n,
                                                                         guidance=p.guidance, schedule=schedule)
           for n in sorted({*p.inversion_step_counts, steps})}
    # Sampled back at CFG 1, the guidance the inversion used: the error left is DDIM inversion's own
    # (Eq. 4's local linearization), not the mismatch between the inverted and the guided eps.
    out.update({f"ddim1_{n}": report.ddim_reconstruct(models, images01, captions, steps=n, guidance=1.0,
                                                       schedule=schedule)
                for n in sorted({*p.inversion_step_counts, steps})})
    if not nti:
        return out
    latents = sampler.encode_images(models.vae, images01)
    with torch.no_grad():
        cond, cond_target = models.encode_prompt(captions), models.encode_prompt(targets)
        uncond = models.encode_prompt([""])
    kw = dict(steps=steps, schedule=schedule, progress=False)
    x_T, nulls = sampler.null_text_invert(unet, latents, cond, uncond.expand(B, -1, -1).clone(),
                                          guidance=p.guidance, inner_steps=p.nti_inner_steps, **kw)
    nti = sampler.ddim_sample(unet, x_T, cond, nulls, guidance=p.guidance, **kw)
    edited = sampler.edit(unet, x_T, nulls, cond, cond_target, r=p.edit_r, guidance=p.guidance, **kw)  # Eq. 15
    return {**out, **{k: sampler.decode_latents(models.vae, z) for k, z in (("nti", nti), ("edit", edited))}}


def recon_inputs(p, seed=11):
    """The Table 2 images: the Eq. 15 figure's red circle first, then `recon_images` real held-out images
    (only these are scored; `report.inversion_inputs`; another seed: a disjoint draw). Returns (images01,
    captions, edit targets, the attribute dicts, the target colours)."""
    images, captions, attributes = report.inversion_inputs(p.recon_images, seed=seed)
    images = torch.cat([instruments.images01(np.array(world.draw(EDIT_SOURCE)[None])), images])
    attributes = [EDIT_SOURCE, *attributes]
    targets = [world.caption({**EDIT_SOURCE, "colour": EDIT_TARGET_COLOUR})] + [edit_target(a) for a in attributes[1:]]
    return (images, [world.caption(EDIT_SOURCE), *captions], targets, attributes,
            [world.parse_caption(t)["colour"] for t in targets])


def cached_record(path, key):
    """(result, tensors) that `cached` stored in `path` for this key, or None."""
    path = Path(path)
    if path.is_file():
        record = json.loads(path.read_text())
        if record["key"] == key:
            return record["result"], torch.load(path.with_suffix(".pt"), weights_only=True)
    return None


def cached(path, key, compute):
    """compute() once per key: the JSON result (and, for tensors, a .pt beside it) lives in `path`."""
    path = Path(path)
    found = cached_record(path, key)
    if found is not None:
        return found
    result, tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path.with_suffix(".pt"))
    path.write_text(json.dumps({"key": key, "result": result}))
    return result, tensors


# -------------------------------------------------------------------------------------- statistics

def cell_name(cell):
    set_name, _, steps = cell
    return f"{set_name}{steps}"  # "A25", "A50", "B25", "B50"


def holds(diffs):
    """The rule of issue 11: +1 (or -1) when every paired difference is positive (negative) and larger
    than 2 standard errors, else 0. `diffs`: instruments.paired_difference dicts, one per cell."""
    if not diffs:
        return 0
    signs = {int(np.sign(d["mean"])) for d in diffs}
    if len(signs) != 1 or not all(abs(d["mean"]) > 2 * d["se"] for d in diffs):
        return 0
    return signs.pop()


def compare(scores, control_scores, cells):
    """One model against its control, cell by cell: the paired ISTD difference per cell (relative to the
    control's mean, with the s.e. relative too) and whether it holds in all of them (None: a cell pending)."""
    diffs = {}
    for cell in map(cell_name, cells):
        if cell in scores and cell in control_scores:
            d = instruments.paired_difference(scores[cell]["per_strip_istd"], control_scores[cell]["per_strip_istd"])
            diffs[cell] = {**d, "relative_se": d["se"] / float(np.mean(control_scores[cell]["per_strip_istd"]))}
    return {"istd_vs_control": diffs, "holds": holds(list(diffs.values())) if len(diffs) == len(cells) else None}


def summary(name, plan, names, scores, p):
    """One table row's numbers: the quality cell's means, and the paired differences to its control in
    every cell. `names` maps a plan name to the run that was trained and scored (see `canonical`)."""
    own = scores.get(names[name], {})
    q = own.get(cell_name(p.quality_cell))
    row = {"label": plan[name].label, "run": names[name], "cells_scored": sorted(own)}
    if q is not None:
        per_strip = q["per_strip_istd"]
        row.update(istd=q["istd"], istd_se=float(np.std(per_strip, ddof=1) / np.sqrt(len(per_strip))),
                   mean_adjacent_distance=q["mean_adjacent_distance"], fid_proxy=q["fid_proxy"],
                   caption_accuracy=q["caption_accuracy"]["caption"])
        if "kid_proxy" in q:
            row.update(kid_proxy=q["kid_proxy"]["kid"], kid_se=q["kid_proxy"]["se"])
    control = plan[name].control
    if control is not None and names[control] != names[name]:
        row.update(reference=names[control], **compare(own, scores.get(names[control], {}), p.cells))
        c = scores.get(names[control], {}).get(cell_name(p.quality_cell))
        if q is not None and c is not None and "kid_proxy" in q and "kid_proxy" in c:
            row["kid_vs_control"] = instruments.kid_difference(q["kid_proxy"], c["kid_proxy"])
        theirs = scores.get(names[control], {})  # the quality claim in every cell, not only the quality cell
        row["kid_vs_control_cells"] = {cell: instruments.kid_difference(own[cell]["kid_proxy"], theirs[cell]["kid_proxy"])
                                       for cell in map(cell_name, p.cells) if "kid_proxy" in own.get(cell, {})
                                       and "kid_proxy" in theirs.get(cell, {})}
    return row


def quality_cells_table(results, names):
    """The quality claim in all four cells: each run's paired ΔKID-proxy against its control per cell, and
    whether it is within 2 s.e. (not worse beyond 2 s.e.) in every cell."""
    cells = results["cells"]
    lines = ["### Quality in every cell: ΔKID-proxy against the control", "",
             "The paired KID-proxy difference (jackknife s.e. over strips and real images) in each cell; 'no cost "
             "in all 4 cells': not worse than the control by more than 2 s.e. in every cell.", "",
             f"| model | {' | '.join(cells)} | no cost in all 4 cells |", "|---|" + "---|" * (len(cells) + 1)]
    for name in dict.fromkeys(names):
        d = results["rows"].get(name, {}).get("kid_vs_control_cells", {})
        if not d or name.startswith("control"):
            continue
        ok = "yes" if len(d) == len(cells) and all(x["mean"] <= 2 * x["se"] for x in d.values()) else \
            ("pending" if len(d) < len(cells) else "no")
        lines.append(f"| {results['rows'][name]['label']} | "
                     + " | ".join(fmt_kid_difference(d[c]) if c in d else "pending" for c in cells) + f" | {ok} |")
    return lines + [""]


# ------------------------------------------------------------------------------------- the tables

def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_relative(d):
    return "–" if d is None else f"{100 * d['relative']:+.0f}% ± {100 * d['relative_se']:.0f}%"


def fmt_kid(value, se):
    return "–" if value is None else f"{value:.2f} ± {se:.2f}"


def fmt_kid_difference(d):
    return "" if d is None else f"{d['mean']:+.2f} ± {d['se']:.2f}"


HOLDS = {1: "yes: higher", -1: "yes: lower", 0: "no", None: "pending"}


def smoothness_table(title, names, results, note=None):
    """A markdown table of ISTD against the control in the four cells, the rule, and the quality proxies."""
    rows, cells, quality = results["rows"], results["cells"], results["quality_cell"]
    head = ["model", f"ISTD ↓ ({quality})", *(f"ΔISTD {c} (paired)" for c in cells), "holds in all 4 cells",
            f"mean adjacent distance ({quality})", f"FID-proxy ↓ ({quality})", f"KID-proxy ↓ ({quality}, ± s.e.)",
            "ΔKID vs control (paired, ± s.e.)", f"caption accuracy ↑ ({quality})"]
    out = [f"### {title}", ""] + ([note, ""] if note else []) + \
          ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        r = rows.get(name)
        if r is None or "istd" not in r:
            out.append(f"| {r['label'] if r else name} | " + " | ".join(["pending"] * (len(head) - 1)) + " |")
            continue
        diffs = r.get("istd_vs_control")
        deltas = ["(reference)"] * len(cells) if diffs is None else [fmt_relative(diffs.get(c)) for c in cells]
        out.append("| " + " | ".join([r["label"], f"{r['istd']:.3f} ± {r['istd_se']:.3f}", *deltas,
                                      "" if diffs is None else HOLDS[r["holds"]], fmt(r["mean_adjacent_distance"]),
                                      fmt(r["fid_proxy"], 2), fmt_kid(r.get("kid_proxy"), r.get("kid_se")),
                                      fmt_kid_difference(r.get("kid_vs_control")), fmt(r["caption_accuracy"])]) + " |")
    return out + [""]


def inversion_label(key, steps):
    """'ddim' -> 'DDIM 50 steps', 'ddim_10' -> 'DDIM 10 steps', 'ddim1_10' -> 'DDIM 10 steps, CFG 1',
    'nti' -> 'NTI 50 steps'."""
    kind, _, n = key.partition("_")
    return f"DDIM {n} steps, CFG 1" if kind == "ddim1" else f"{kind.upper()} {n or steps} steps"


def inversion_keys(protocol):
    """Table 2's reconstructions in the order of its rows: DDIM at each step count (CFG of the protocol),
    DDIM sampled back at CFG 1 at each step count, NTI."""
    steps = max(protocol["step_counts"])
    counts = sorted({*protocol.get("inversion_step_counts", ()), steps})
    return [*("ddim" if n == steps else f"ddim_{n}" for n in counts), *(f"ddim1_{n}" for n in counts), "nti"]


def reconstruction_table(results, names):
    """Table 2: MSE / PSNR / SSIM of DDIM inversion (at every step count) and NTI, the VAE's optimum, and
    the Eq. 15 edits: what changed (the target colour), what stayed (the other attributes, the pixels
    outside the shape), each paired with the model's control."""
    names = list(dict.fromkeys(results["rows"].get(n, {}).get("run", n) for n in names))  # aliases: once
    recon, labels = results.get("reconstruction", {}), {n: results["rows"].get(n, {}).get("label", n) for n in names}
    steps = max(results["protocol"]["step_counts"])
    inversions = inversion_keys(results["protocol"])
    lines = ["### Table 2: reconstruction of real held-out images (DDIM inversion, null-text inversion) "
             "and Eq. 15 edits", "", f"{results.get('reconstruction_s', 0) / 60:.1f} min of scoring, "
             f"{results['protocol']['recon_images']} images. ΔPSNR: paired per image with the model's control "
             "(a form at seed s: the control at seed s; a control at seed s: the seed-0 control), ± s.e.",
             "", "| model + inversion | MSE ↓ | PSNR ↑ | SSIM ↑ | ΔPSNR vs control (paired) |",
             "|---|---|---|---|---|"]
    if "vae" in recon:
        v = recon["vae"]
        lines.append(f"| VAE reconstruction (optimum) | {v['mse']:.5f} | {v['psnr']:.2f} | {v['ssim']:.4f} | |")
    for inversion in inversions:
        for n in names:
            r = recon.get(n, {}).get(inversion)
            label = f"{labels[n]} + {inversion_label(inversion, steps)}"
            if r is None:
                lines.append(f"| {label} | pending | pending | pending | |")
                continue
            d = r.get("psnr_vs_control")
            delta = "" if d is None else f"{d['mean']:+.2f} ± {d['se']:.2f} dB"
            lines.append(f"| {label} | {r['mse']:.5f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {delta} |")
    lines += ["", f"Eq. 15 edits (r = {results['protocol']['edit_r']}, from the NTI inversion): the shape's colour "
              "is changed. Read by the attribute classifier: target colour seen, all target attributes seen, each "
              "other attribute kept (shape, background, size); success: target colour seen and all three kept. "
              "Outside MSE: mean squared pixel difference to the source outside the shape (1 px margin), for the "
              "edit and for the NTI reconstruction (what inverting alone costs there). Δ: paired with the "
              "control, ± s.e.", "",
              "| model | target colour seen ↑ | all target attributes seen ↑ | shape kept ↑ | background kept ↑ "
              "| size kept ↑ | success ↑ | Δsuccess vs control | outside MSE, edit ↓ | Δoutside MSE vs control "
              "| outside MSE, NTI ↓ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        e = recon.get(n, {}).get("edit")
        if e is None:
            continue
        if "success" not in e:  # an older cache: only the target numbers
            lines.append(f"| {labels[n]} | {e['colour']:.3f} | {e['caption']:.3f} |" + " – |" * 8)
            continue
        d = e.get("vs_control", {})
        ds = "" if "success" not in d else f"{d['success']['mean']:+.3f} ± {d['success']['se']:.3f}"
        dm = "" if "outside_mse" not in d else f"{d['outside_mse']['mean']:+.5f} ± {d['outside_mse']['se']:.5f}"
        lines.append(f"| {labels[n]} | {e['colour']:.3f} | {e['caption']:.3f} | {e['kept_shape']:.3f} | "
                     f"{e['kept_background']:.3f} | {e['kept_size']:.3f} | {e['success']:.3f} | {ds} | "
                     f"{e['outside_mse']:.5f} | {dm} | {e['nti_outside_mse']:.5f} |")
    return lines + [""]


QUALITY_BUDGET = 0.10  # issue 11: FID-proxy and caption accuracy within 10% of the control


def relative_change(value, reference):
    """value / reference - 1; a control at 0 (a caption accuracy of tiny models) gives 0 or +-inf."""
    if reference == 0:
        return 0.0 if value == 0 else float(np.sign(value)) * float("inf")
    return value / reference - 1


def tradeoff(row, control_row):
    """A regularized run against its control: ISTD change (mean of the four cells' relative paired
    differences, and the cell nearest zero), FID-proxy and caption-accuracy change (relative), and
    whether both quality proxies stay within QUALITY_BUDGET; "cells": how many cells the ISTD change is the
    mean of (fewer than 4 with --cells; `holds` is then None). None while the quality cell is pending."""
    diffs = row.get("istd_vs_control") or {}
    if not diffs or "fid_proxy" not in row or "fid_proxy" not in control_row:
        return None
    relative = [d["relative"] for d in diffs.values()]
    fid = relative_change(row["fid_proxy"], control_row["fid_proxy"])  # higher is worse
    caption = relative_change(row["caption_accuracy"], control_row["caption_accuracy"])  # lower is worse
    kid = row.get("kid_vs_control")  # higher is worse; within 2 s.e. of the control: no measurable cost
    return {"istd": float(np.mean(relative)), "istd_nearest_zero": min(relative, key=abs), "cells": len(relative),
            "fid_proxy": fid,
            "caption_accuracy": caption, "holds": row["holds"],
            "within_budget": fid <= QUALITY_BUDGET and caption >= -QUALITY_BUDGET,
            "kid": kid, "kid_within_2se": None if kid is None else kid["mean"] <= 2 * kid["se"]}


def tradeoff_points(results):
    """{run: tradeoff} for every regularized run of the lambda, length and seed tables (each run once,
    under the name it was trained under, labelled with its first row's label)."""
    rows, t, points, seen = results["rows"], results["tables"], {}, set()
    for name in [*t["lambda"], *t["length"], *t["seeds"], *t.get("chosen", [])]:
        row = rows.get(name, {})
        if not row.get("reference") or row["run"] in seen or row["run"].startswith("control"):
            continue
        seen.add(row["run"])
        point = tradeoff(row, rows.get(row["reference"], {}))  # the reference is a run's (plan) name
        if point is not None:
            points[row["run"]] = {**point, "label": row["label"]}
    return points


def tradeoff_table(results):
    """The trade-off curve issue 11 asks for when -40% at <= 10% quality cost is out of reach."""
    points = tradeoff_points(results)
    lines = ["### The trade-off: ISTD reduction against quality cost", "",
             f"Every regularized run against its own control: ΔISTD is the mean of the four cells' paired "
             f"relative differences (and the cell nearest zero), ΔFID-proxy and Δcaption accuracy are relative "
             f"changes in cell {results['quality_cell']}; 'within budget': FID-proxy at most "
             f"{100 * QUALITY_BUDGET:.0f}% higher and caption accuracy at most {100 * QUALITY_BUDGET:.0f}% lower "
             "than the control's. ΔKID-proxy: the paired difference to the control (jackknife s.e. over strips "
             "and real images); 'KID within 2 s.e.': not worse than the control by more than 2 s.e. "
             "Plotted in [tradeoff.png](tradeoff.png).", "",
             "| run | ΔISTD (mean of 4 cells) | weakest cell | holds in all 4 cells | ΔFID-proxy | Δcaption accuracy "
             "| within budget | ΔKID-proxy (paired) | KID within 2 s.e. |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points.values(), key=lambda p: p["istd"]):
        lines.append(f"| {p['label']} | {100 * p['istd']:+.0f}% | {100 * p['istd_nearest_zero']:+.0f}% | "
                     f"{HOLDS[p['holds']]} | {100 * p['fid_proxy']:+.0f}% | {100 * p['caption_accuracy']:+.0f}% | "
                     f"{'yes' if p['within_budget'] else 'no'} | {fmt_kid_difference(p['kid'])} | "
                     f"{ {True: 'yes', False: 'no', None: '–'}[p['kid_within_2se']]} |")
    return lines + [""]


def claims_points(results):
    """The paper's three claims for every regularized run of the tables, against its own control:
    the trade-off numbers (`tradeoff`) and the paired Table 2 differences: {"inversion": {"ddim_10", ...,
    "nti": ΔPSNR dicts}, "edit": {"success", "outside_mse": Δ dicts}}. Only runs whose ISTD is complete."""
    rows, recon, points, t = results["rows"], results.get("reconstruction", {}), {}, results["tables"]
    for name in [*t["seeds"], *t["lambda"], *t["length"], *t.get("chosen", [])]:
        row = rows.get(name, {})
        if not row.get("reference") or row["run"].startswith("control") or row["run"] in points:
            continue
        point = tradeoff(row, rows.get(row["reference"], {}))
        if point is None:
            continue
        rec = recon.get(row["run"], {})
        point["inversion"] = {k: v["psnr_vs_control"] for k, v in rec.items()
                              if isinstance(v, dict) and "psnr_vs_control" in v}
        point["edit"] = rec.get("edit", {}).get("vs_control")
        points[row["run"]] = {**point, "label": row["label"]}
    return points


def fmt_difference(d, digits=2, scale=1.0):
    return "–" if d is None else f"{scale * d['mean']:+.{digits}f} ± {scale * d['se']:.{digits}f}"


def over_seeds(values, unit=""):
    """mean ± s.e. over training seeds (std / sqrt(k)): the training noise of one command."""
    v = [x for x in values if x is not None]
    if len(v) < 2:
        return "–"
    return f"{np.mean(v):+.2f}{unit} ± {np.std(v, ddof=1) / np.sqrt(len(v)):.2f}{unit} ({len(v)} seeds)"


def claims_table(results):
    """Issue 21: each form at each training seed against its own control, on all three claims; then the
    mean over seeds with its s.e. (the spread between seeds, i.e. the training noise)."""
    points = claims_points(results)
    steps = max(results["protocol"]["step_counts"])
    inversions = inversion_keys(results["protocol"])
    lines = ["### The paper's three claims, seed by seed", "",
             "Each regularized run against the lambda-0 control of its seed: claim 1 (smoother, no quality cost): "
             "ΔISTD (mean of the 4 cells), ΔKID-proxy (paired), ΔFID-proxy and Δcaption accuracy "
             "(relative); claim 2 (better inversion): ΔPSNR of the reconstructions (paired per image, dB); claim 3 "
             "(better editing): Δ success of the Eq. 15 edits and Δ pixel MSE outside the shape (x1e-3), paired "
             "per image. ± one s.e. The 'over seeds' rows: mean ± s.e. over the training seeds.", "",
             "| run | ΔISTD | holds | ΔKID-proxy | ΔFID-proxy | Δcaption acc. | " +
             " | ".join(f"ΔPSNR {inversion_label(k, steps)}" for k in inversions) +
             " | Δedit success | Δoutside MSE |", "|---|" + "---|" * (7 + len(inversions))]
    for p in points.values():
        edit = p["edit"] or {}
        cells = "" if p["cells"] == 4 else f" ({p['cells']} cell{'s' * (p['cells'] > 1)})"
        lines.append(f"| {p['label']} | {100 * p['istd']:+.0f}%{cells} | {HOLDS[p['holds']]} | {fmt_kid_difference(p['kid'])} "
                     f"| {100 * p['fid_proxy']:+.0f}% | {100 * p['caption_accuracy']:+.0f}% | " +
                     " | ".join(fmt_difference(p["inversion"].get(k)) for k in inversions) +
                     f" | {fmt_difference(edit.get('success'), 3)} | {fmt_difference(edit.get('outside_mse'), 2, 1000)} |")
    for form in FORMS:
        mine = [p for run, p in points.items() if run == form or run.startswith(f"{form}_seed")]
        if len(mine) < 2:
            continue
        get = lambda f: [f(p) for p in mine]  # noqa: E731
        inv = lambda k: get(lambda p: p["inversion"][k]["mean"] if k in p["inversion"] else None)  # noqa: E731
        lines.append(f"| {FORM_LABELS[form]}, over seeds | {over_seeds(get(lambda p: 100 * p['istd']), '%')} | | "
                     f"{over_seeds(get(lambda p: p['kid']['mean'] if p['kid'] else None))} | "
                     f"{over_seeds(get(lambda p: 100 * p['fid_proxy']), '%')} | "
                     f"{over_seeds(get(lambda p: 100 * p['caption_accuracy']), '%')} | " +
                     " | ".join(over_seeds(inv(k)) for k in inversions) +
                     f" | {over_seeds(get(lambda p: p['edit']['success']['mean'] if p['edit'] else None))} | "
                     f"{over_seeds(get(lambda p: 1000 * p['edit']['outside_mse']['mean'] if p['edit'] else None))} |")
    return lines + ["", "![claims](claims.png)", ""]


def instrument_noise_table(results):
    """The KID-proxy's own noise against the training noise: each model's KID in the two disjoint sets of
    noise pairs at the same step count (A and B: same model, other samples) beside its jackknife s.e.;
    and the controls' KID over training seeds (same command, other seed)."""
    steps = max(results["protocol"]["step_counts"])
    a, b = f"A{steps}", f"B{steps}"
    lines = ["### The quality instrument's own noise", "",
             f"KID-proxy of each model in cells {a} and {b} (the same model, disjoint noise pairs, "
             f"the same real images), their difference and the s.e. the jackknife gives that difference "
             f"(sqrt(se_A^2 + se_B^2)).", "", f"| model | KID {a} | KID {b} | {a} - {b} | jackknife s.e. of the difference |",
             "|---|---|---|---|---|"]
    ratios = []
    for name, cells in results.get("scores", {}).items():
        if "kid_proxy" not in cells.get(a, {}) or "kid_proxy" not in cells.get(b, {}):
            continue
        ka, kb = cells[a]["kid_proxy"], cells[b]["kid_proxy"]
        se = float(np.hypot(ka["se"], kb["se"]))
        ratios.append(((ka["kid"] - kb["kid"]) / se) ** 2)
        lines.append(f"| {name} | {fmt_kid(ka['kid'], ka['se'])} | {fmt_kid(kb['kid'], kb['se'])} | "
                     f"{ka['kid'] - kb['kid']:+.2f} | {se:.2f} |")
    if ratios:
        lines += ["", f"Root mean square of (difference / its s.e.) over {len(ratios)} models: "
                  f"{np.sqrt(np.mean(ratios)):.2f} (1 if the jackknife s.e. is right)."]
    controls = [n for n in results["tables"]["seeds"] if n.startswith("control")]
    kids = [results["rows"].get(n, {}).get("kid_proxy") for n in controls]
    ses = [results["rows"].get(n, {}).get("kid_se") for n in controls]
    if sum(k is not None for k in kids) >= 2:
        k = [x for x in kids if x is not None]
        lines += ["", f"Training noise: the lambda-0 control at {len(k)} seeds scores KID-proxy "
                  + ", ".join(f"{x:.2f}" for x in k) + f" (std over seeds {np.std(k, ddof=1):.2f}; "
                  f"the instrument's own s.e. {np.mean([x for x in ses if x is not None]):.2f})."]
    return lines + [""]


def header(results):
    """The paragraph above the tables: the command, the protocol, the rule and the times."""
    runs, rows = results.get("runs", {}), results["rows"]
    measured = sum(r.get("wall_s") or 0 for r in runs.values()) + results.get("reconstruction_s", 0) + \
        results.get("scoring_s", 0)
    return [f"Regenerate everything: `{results['command']}` (LoRA runs and scores are cached under "
            f"`{results['cache']}`; a second run reuses them). Protocol: {results['protocol_text']}",
            "",
            f"Every ΔISTD is the paired per-strip difference to the model's control (same strips), relative to "
            f"the control's mean ISTD, ± its standard error, in each cell ({', '.join(results['cells'])}: set A "
            f"or B of noise pairs, DDIM steps). A claim **holds** only if the difference has the same sign and "
            f"|mean| > 2 s.e. in all four cells. The other columns are from cell {results['quality_cell']}. "
            f"KID-proxy: the unbiased kernel distance (cubic kernel) on the classifier's features against the same "
            f"real images, ± its jackknife standard error (deleting one strip, or one real image, "
            f"at a time); ΔKID is paired with the control (same strips, same real images).",
            "",
            f"Measured times, summed over every LoRA run and every scoring: {measured / 60:.1f} min on a shared "
            f"2-core CPU (training runs in a second process beside the scoring); the invocation that wrote "
            f"this file took {results['total_s'] / 60:.1f} min and computed {len(results.get('computed', []))} "
            f"of them, reading the rest from the cache. {len(rows)} rows, {len(runs)} distinct LoRA runs.",
            "", f"Dropped from the earlier tables: {DROPPED}", ""]


def runs_table(results):
    lines = ["### The LoRA runs", "", "Means over the last 50 training steps (train.py's log.jsonl); wall "
             "time of the train.py process, start-up included.", "",
             "| run | flags (besides the common ones) | wall time | denoising loss | regularizer loss (Eq. 9) "
             "| variation norm (Eq. 10) | running mean a |", "|---|---|---|---|---|---|---|"]
    for n, r in results.get("runs", {}).items():
        t = r.get("last_50_steps", {})
        own = " ".join(f"{k}={v}" for k, v in r.get("flags", {}).items() if results["common"].get(k) != v)
        lines.append(f"| {n} | {own} | {r['wall_s']:.0f} s | " +
                     " | ".join(fmt(t.get(k), 4) for k in ("loss_base", "loss_reg", "var_norm", "a")) + " |")
    return lines + [""]


def figures_text(results):
    prompts, figure_rows = results.get("prompts", []), results.get("figure_rows", [])
    labels = [results["rows"].get(n, {}).get("label", n) for n in figure_rows]
    target = world.caption({**EDIT_SOURCE, "colour": EDIT_TARGET_COLOUR})
    return ["### Figures", "", "![interpolation strips](interpolation.png)", "",
            f"Interpolation strips of cell {results['quality_cell']} (11 frames, slerp mix 0 to 1), the same noise "
            "pair and prompt for every model in a block; rows " + ", ".join(labels) + "; blocks 1-3 are strips 0-2: " +
            "; ".join(f'{k + 1}: "{prompts[k % len(prompts)]}"' for k in range(min(3, len(prompts)))) + ".", "",
            "![Eq. 15 edit](edit.png)", "",
            f'Eq. 15 edit (r = {results["protocol"]["edit_r"]}): source "{world.caption(EDIT_SOURCE)}" | its '
            f'null-text-inversion reconstruction | target "{target}", one row per model.', ""]


def render_markdown(results):
    """tables.md from results.json's dict."""
    t = results["tables"]
    return "\n".join(
        header(results)
        + smoothness_table("Table 1: smoothness (ISTD) and quality proxies", t["table1"], results)
        + reconstruction_table(results, t["reconstruction"])
        + smoothness_table("Table 3: regularization ratio lambda, for each form", t["lambda"], results)
        + smoothness_table("ISTD and FID-proxy vs fine-tune length", t["length"], results,
                           note="Each length is paired with the control of the same length.")
        + smoothness_table("Seed check: both forms at another training seed", t["seeds"], results,
                           note="The forms at seed s are paired with the control at seed s; the controls at seeds "
                                "1, 2 with the seed-0 control (how far another training seed alone moves ISTD).")
        + smoothness_table("The validation search's choice at three seeds", t.get("chosen", []), results,
                           note="`python -m toy.search` chose, on validation prompts only, the one setting that "
                                f"met issue 21's goal there ({results['protocol'].get('chosen')} on top of our "
                                "form); here it is confirmed on the held-out protocol at every seed, each against "
                                "the control of its length and seed.")
        + quality_cells_table(results, [*t["seeds"], *t.get("chosen", [])])
        + tradeoff_table(results)
        + claims_table(results) + instrument_noise_table(results)
        + figures_text(results) + runs_table(results))


# -------------------------------------------------------------------------------------- figures

def save_figures(out, strips, edits, figure_rows, labels):
    """interpolation.png: the first strips of each figure model (same noises and prompt per block);
    edit.png: source | NTI reconstruction | Eq. 15 edit, per model."""
    names = [n for n in figure_rows if n in strips]
    if names:
        rows = [(f"{k + 1}: {labels[n]}", strips[n][k]) for k in range(min(3, len(strips[names[0]]))) for n in names]
        data.labelled_grid(rows).quantize(256).save(out / "interpolation.png")  # a palette PNG: small
    if edits:
        rows = [(labels[n], torch.stack([e["source"], e["nti"], e["edit"]])) for n, e in edits.items()]
        data.labelled_grid(rows, scale=4).quantize(256).save(out / "edit.png")


def save_tradeoff_plot(path, points, target=-0.40, size=(640, 440), margin=(70, 30, 30, 50)):
    """tradeoff.png: one dot per regularized run, x = FID-proxy change, y = ISTD change (both relative to
    its control, %); the quality budget (x = +10%) and the target (y = -40%) as lines. Blue: the paper's
    form, red: ours; a ring: the run does not hold in all four cells."""
    if not points:
        return
    xs = [100 * p["fid_proxy"] for p in points.values()] + [0, 100 * QUALITY_BUDGET]
    ys = [100 * p["istd"] for p in points.values()] + [0, 100 * target]
    span = max(xs) - min(xs)
    (x0, x1), (y0, y1) = (min(xs) - 5, max(xs) + 5 + 0.2 * span), (min(ys) - 5, max(ys) + 5)  # room for names
    left, top, right, bottom = margin
    w, h = size[0] - left - right, size[1] - top - bottom
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * w, top + (y1 - y) / (y1 - y0) * h)  # noqa: E731
    image = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(image)
    pen.rectangle([left, top, left + w, top + h], outline="black")
    for x, y, colour, text in ((0, None, (160, 160, 160), "0"), (None, 0, (160, 160, 160), "0"),
                               (100 * QUALITY_BUDGET, None, (0, 140, 0), "quality budget +10%"),
                               (None, 100 * target, (0, 140, 0), f"target {100 * target:.0f}%")):
        a, b = (to_px(x, y1), to_px(x, y0)) if y is None else (to_px(x0, y), to_px(x1, y))
        pen.line([a, b], fill=colour)
        pen.text((a[0] + 3, b[1] - 14) if y is None else (a[0] + 4, a[1] + 2), text, fill=colour)
    for name, p in points.items():
        cx, cy = to_px(100 * p["fid_proxy"], 100 * p["istd"])
        colour = (200, 30, 30) if name.startswith("ours") else (30, 60, 200)
        box = [cx - 4, cy - 4, cx + 4, cy + 4]
        pen.ellipse(box, fill=colour if p["holds"] else None, outline=colour)
        pen.text((cx + 6, cy - 6), name, fill=colour)
    pen.text((left + w // 2 - 110, size[1] - 20), "FID-proxy change vs control (%, higher is worse)", fill="black")
    pen.text((4, top - 22), "ISTD change vs control (%, mean of 4 cells; lower is smoother)", fill="black")
    for v in np.linspace(x0, x1, 6):
        pen.text((to_px(v, y0)[0] - 10, top + h + 4), f"{v:.0f}", fill="black")
    for v in np.linspace(y0, y1, 6):
        pen.text((left - 34, to_px(x0, v)[1] - 6), f"{v:.0f}", fill="black")
    image.save(path)


def scaled(d, factor):
    """A paired-difference dict with mean and s.e. times factor (None stays None)."""
    return None if d is None else {**d, "mean": factor * d["mean"], "se": factor * d["se"]}


def short_label(name):
    """A run's name without its form, for the plot: "ours_seed1" -> "s1", "paper_lambda10" -> "lam10",
    "ours_steps1000_seed2" -> "1000 st s2", "ours" -> "s0" (PIL's default font has no lambda)."""
    words = {"seed": lambda v: f"s{v}", "lambda": lambda v: f"lam{float(v):.3g}", "steps": lambda v: f"{v} st"}
    out = [words[k](part[len(k):]) for part in name.split("_")[1:] for k in words if part.startswith(k)]
    return " ".join(out) or "s0"


def save_claims_plot(path, points, size=(1800, 380), margin=(60, 30, 20, 50)):
    """claims.png: does the downstream gain track smoothness? One dot per regularized run (blue: the
    paper's form, red: ours; labelled by `short_label`), x = ISTD change vs its control (%); panels: y = ΔPSNR of
    DDIM inversion at the largest step count (Table 2's CFG), at the fewest steps sampled back at CFG 1
    (dB), Δ edit success and Δ pixel MSE outside the shape; bars: ± 1 s.e."""
    cfg1 = sorted((k for p in points.values() for k in p["inversion"] if k.startswith("ddim1_")),
                  key=lambda k: int(k.split("_")[1]))
    panels = [("PSNR change, DDIM inversion, Table 2's CFG (dB)", lambda p: p["inversion"].get("ddim")),
              (f"PSNR change, DDIM {cfg1[0].split('_')[1] if cfg1 else '?'} steps, CFG 1 (dB)",
               lambda p: p["inversion"].get(cfg1[0]) if cfg1 else None),
              ("Eq. 15 edit success change (fraction)", lambda p: (p["edit"] or {}).get("success")),
              ("Eq. 15 edit: change of pixel MSE outside the shape (x1e-3)",
               lambda p: scaled((p["edit"] or {}).get("outside_mse"), 1000))]
    points = {n: p for n, p in points.items() if any(get(p) for _, get in panels)}
    if not points:
        return
    image = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = margin
    w, h = size[0] // len(panels) - left - right, size[1] - top - bottom
    xs = [100 * p["istd"] for p in points.values()] + [0]
    x0, x1 = min(xs) - 5, max(xs) + 5
    for i, (title, get) in enumerate(panels):
        ox = i * size[0] // len(panels) + left
        ds = [get(p) for p in points.values() if get(p)]
        ys = [d["mean"] + s * d["se"] for d in ds for s in (-1, 1)] + [0]
        y0, y1 = min(ys), max(ys)
        y0, y1 = y0 - 0.1 * (y1 - y0 + 1e-9), y1 + 0.1 * (y1 - y0 + 1e-9)
        to_px = lambda x, y: (ox + (x - x0) / (x1 - x0) * w, top + (y1 - y) / (y1 - y0) * h)  # noqa: E731
        pen.rectangle([ox, top, ox + w, top + h], outline="black")
        pen.line([to_px(x0, 0), to_px(x1, 0)], fill=(160, 160, 160))
        pen.text((ox, 6), title, fill="black")
        for v in np.linspace(y0, y1, 5):
            pen.text((ox - 50, to_px(x0, v)[1] - 6), f"{v:+.2f}", fill="black")
        for v in np.linspace(x0, x1, 5):
            pen.text((to_px(v, y0)[0] - 10, top + h + 4), f"{v:.0f}", fill="black")
        pen.text((ox + w // 2 - 80, size[1] - 20), "ISTD change vs control (%)", fill="black")
        for name, p in points.items():
            d = get(p)
            if not d:
                continue
            colour = (200, 30, 30) if name.startswith("ours") else (30, 60, 200)
            cx, cy = to_px(100 * p["istd"], d["mean"])
            pen.line([to_px(100 * p["istd"], d["mean"] - d["se"]), to_px(100 * p["istd"], d["mean"] + d["se"])],
                     fill=colour)
            pen.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
            pen.text((cx + 6, cy - 6), short_label(name), fill=colour)
    image.save(path)


# ------------------------------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m toy tables", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test of the pipeline")
    parser.add_argument("--plan", action="store_true", help="print the runs, their flags and the time estimate")
    parser.add_argument("--out", default=None, help="tables and figures (default: assets/tables, "
                        "or runs/tables_quick/out with --quick)")
    parser.add_argument("--cache", default=None, help="LoRA runs and scores (default: runs/tables, "
                        "or runs/tables_quick with --quick)")
    parser.add_argument("--model", default=str(world.MODEL_DIR), help="the base model (default: the toy SD)")
    parser.add_argument("--data", default=str(ROOT / "data" / "toy"), help="training images (world.prepare_data)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in each train.py")
    parser.add_argument("--no-nti", action="store_true",
                        help="Table 2 by DDIM inversion only: no null-text inversion and no Eq. 15 edits (~10x faster)")
    parser.add_argument("--cells", nargs="+", default=None, metavar="CELL",
                        help="score only these cells (e.g. A50, the quality cell); the others are shown where the "
                             "cache has them, else stay 'pending' and no row 'holds' (default: all four)")
    parser.add_argument("--cached-only", action="store_true",
                        help="compute nothing: every table from what --cache holds, 'pending' elsewhere (seconds)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME",
                        help="only these runs of --plan (and the controls they are paired with); add 'base' for "
                             "the base model's row and 'table2' for the reconstructions; the other rows stay "
                             "'pending' (default: everything)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    return args


def print_plan(p, plan):
    names = canonical(plan)
    for name, run in plan.items():
        same = "" if names[name] == name else f" (= {names[name]})"
        flags = "" if run.flags is None else " ".join(train_flags(run.flags))
        print(f"{name}{same}: {run.label}; paired with {run.control}; {flags}")
    e = estimate_seconds(p, plan)
    print(f"{e['runs']} LoRA runs, {e['train_steps']} toy steps: ~{e['train_s'] / 60:.0f} min of training; "
          f"{e['strips']} strips: ~{e['score_s'] / 60:.0f} min of sampling; Table 2: ~{e['recon_s'] / 60:.0f} min")


@dataclass
class Session:
    """What one invocation holds: its arguments, the plan, the scoring inputs and the results so far."""
    args: argparse.Namespace
    p: Protocol
    out: Path
    cache: Path
    plan: dict
    names: dict
    results: dict
    strips: dict = field(default_factory=dict)  # name -> the first 3 strips of the quality cell (figures)
    edits: dict = field(default_factory=dict)  # name -> the Eq. 15 figure's images
    futures: dict = field(default_factory=dict)  # run -> its training (a background thread's future)
    t_start: float = field(default_factory=time.time)


def start(args):
    """The session: protocol, plan, output folders and the results' fixed part."""
    p = QUICK if args.quick else Protocol()
    cache = Path(args.cache or ("runs/tables_quick" if args.quick else "runs/tables"))
    out = Path(args.out or (cache / "out" if args.quick else ROOT / "assets" / "tables"))
    plan = plan_runs(p)
    prompts = world.heldout_prompts()
    cells = [cell_name(c) for c in p.cells]
    results = {
        "command": "python -m toy tables" + (" --quick" if args.quick else ""), "cache": str(cache),
        "protocol": asdict(p), "prompts": prompts, "cells": cells, "quality_cell": cell_name(p.quality_cell),
        "common": common_flags(p), "tables": table_rows(p), "figure_rows": table_rows(p)["table1"],
        "protocol_text": f"{p.strips} interpolation strips per set of noise pairs (strip k: held-out prompt k mod "
                         f"{len(prompts)}, noise pair of seed set + k; sets {', '.join(map(str, p.sets))}), "
                         f"{p.frames} frames, DDIM {' and '.join(map(str, p.step_counts))} steps, CFG {p.guidance}; "
                         f"FID-proxy against {p.real} real held-out images, all frames; {p.recon_images} real held-out "
                         f"images reconstructed. LoRA runs: main_job.TRAIN_DEFAULTS {main_job.TRAIN_DEFAULTS}"
                         + (f" with {p.train}" if p.train else "") + f"; paper's form {main_job.PAPER_FORM}, ours "
                         f"{main_job.OUR_FORM}.",
        "runs": {}, "scores": {}, "rows": {}, "reconstruction": {}, "total_s": 0.0, "computed": []}
    return Session(args, p, out, cache, plan, canonical(plan), results)


def reconstruction_vs_control(rec, control):
    """Table 2's numbers of a model against its control's, paired per image: ({inversion: ΔPSNR},
    {"success", "outside_mse": Δ of the Eq. 15 edits} or {} without edits)."""
    psnr = {inv: instruments.paired_difference(rec[inv]["per_image"]["psnr"], control[inv]["per_image"]["psnr"])
            for inv in rec if inv.startswith(("ddim", "nti")) and inv in control}
    edit = {}
    if "per_image" in rec.get("edit", {}) and "per_image" in control.get("edit", {}):
        edit = {k: instruments.paired_difference(rec["edit"]["per_image"][k], control["edit"]["per_image"][k])
                for k in ("success", "outside_mse")}
    return psnr, edit


def write(s):
    r = s.results
    r["rows"] = {n: summary(n, s.plan, s.names, r["scores"], s.p) for n in s.plan}
    for name, rec in r["reconstruction"].items():
        reference = s.plan[name].control if name in s.plan else None  # a form at seed s: the control at seed s
        control = r["reconstruction"].get(s.names[reference]) if reference else None
        if control is not None and rec is not control:
            psnr, edit = reconstruction_vs_control(rec, control)
            for inv, d in psnr.items():
                rec[inv]["psnr_vs_control"] = d
            if edit:
                rec["edit"]["vs_control"] = edit
    r["scoring_s"] = sum(c.get("eval_s", 0) for m in r["scores"].values() for c in m.values())
    r["reconstruction_s"] = sum(x.get("eval_s", 0) for x in r["reconstruction"].values())
    r["total_s"] = time.time() - s.t_start
    (s.out / "results.json").write_text(json.dumps(r, indent=1))
    (s.out / "tables.md").write_text(render_markdown(r))
    save_figures(s.out, s.strips, s.edits, r["figure_rows"], {n: s.plan[n].label for n in s.plan})
    save_tradeoff_plot(s.out / "tradeoff.png", tradeoff_points(r))
    save_claims_plot(s.out / "claims.png", claims_points(r))


def lora_of(s, name):
    """The LoRA file of a run (waiting for its training) and the key of its bytes; (None, "none") for the base."""
    if s.plan[name].flags is None:
        return None, "none"
    run = s.futures[name].result()
    if run is None:  # --cached-only and never trained
        return None, None
    if name not in s.results["runs"]:
        s.results["runs"][name] = {**run, "flags": s.plan[name].flags,
                                   "last_50_steps": training_summary(Path(run["lora"]).parent / "log.jsonl")}
        if not run["cached"]:
            s.results["computed"].append(f"train {name}")
        state = "cached" if run["cached"] else f"trained in {run['wall_s']:.0f} s"
        print(f"[tables] run {name}: {state}", flush=True)
    return run["lora"], sha256(run["lora"])


def score_cells(s, name, models, key, real_features):
    """ISTD and the proxies of one model in every cell (each cached on its own, with the first strips for the
    figures and every frame's classifier features, [strips * frames, 128], for later checks of the
    quality instrument: `cell_features`)."""
    s.results["scores"].setdefault(name, {})
    for cell in s.p.cells:
        _, seed, steps = cell
        cell_key = {**key, "cell": [seed, steps]}
        path = s.cache / name / f"scores_{cell_name(cell)}.json"
        if s.args.cached_only or (s.args.cells and cell_name(cell) not in s.args.cells):  # shown if scored before
            found = cached_record(path, cell_key)
            if found is not None:
                s.results["scores"][name][cell_name(cell)] = found[0]
                if cell == s.p.quality_cell:  # the figures' strips
                    s.strips[name] = found[1]["strips"]
            continue

        def compute():
            t0 = time.time()
            s.results["computed"].append(f"score {name} {cell_name(cell)}")
            strips = sample_strips(models, s.results["prompts"], s.p, seed=seed, steps=steps)
            features = torch.as_tensor(instruments.features(strips.flatten(0, 1), world.load_classifier()))
            return {**report.score_strips(strips, s.results["prompts"], real_features),
                    "eval_s": round(time.time() - t0, 1)}, {"strips": strips[:3].clone(), "features": features.float()}

        score, first = cached(path, cell_key, compute)
        s.results["scores"][name][cell_name(cell)] = score
        if cell == s.p.quality_cell:
            s.strips[name] = first["strips"]
        print(f"[tables] {name} {cell_name(cell)}: ISTD {score['istd']:.4f} ({score['eval_s']:.0f} s)", flush=True)


def cell_features(cache, name, cell):
    """The classifier features [strips * frames, 128] of every frame one model sampled in one cell
    ("A50", ...), from the cache of `score_cells` (frames of strip k at rows k * frames ...)."""
    return torch.load(Path(cache) / name / f"scores_{cell}.pt", weights_only=True)["features"].double().numpy()


def score_reconstruction(models, inputs, p, nti=True):
    """Table 2's numbers for one model on `inputs` (recon_inputs; image 0, the Eq. 15 figure's source, is not
    scored): per-image and mean MSE / PSNR / SSIM of every reconstruction and, with nti, the Eq. 15 edits
    scored on what changed and what stayed. Returns (numbers, the figure's images or {})."""
    images, captions, targets, attributes, target_colours = inputs
    scored = slice(1, None)
    r = reconstruct(models, images, captions, targets, p, nti=nti)
    result = {inv: {"per_image": report.image_metrics(r[inv][scored], images[scored])} for inv in r if inv != "edit"}
    for inv in result:
        result[inv].update({k: float(np.mean(v)) for k, v in result[inv]["per_image"].items()})
    if "edit" not in r:  # nti=False
        return result, {}
    acc = world.caption_accuracy(r["edit"][scored], targets[scored])
    kept = report.edit_scores(r["edit"][scored], images[scored], attributes[scored], target_colours[scored])
    # the same pixel distance for the NTI reconstruction: what inverting alone costs outside the shape
    nti_kept = report.edit_scores(r["nti"][scored], images[scored], attributes[scored],
                                  [a["colour"] for a in attributes[scored]])
    result["edit"] = {"caption": acc["caption"], "colour": acc["colour"], **kept,
                      "nti_outside_mse": nti_kept["outside_mse"]}
    return result, {"source": images[0], "nti": r["nti"][0], "edit": r["edit"][0]}


def reconstruct_model(s, name, models, key, inputs):
    """Table 2's numbers of one model (cached), and its Eq. 15 figure images."""

    def compute():
        t0 = time.time()
        s.results["computed"].append(f"reconstruct {name}")
        result, figure = score_reconstruction(models, inputs, s.p, nti=not s.args.no_nti)
        return {**result, "eval_s": round(time.time() - t0, 1)}, figure

    path = s.cache / name / "reconstruction.json"
    if s.args.cached_only and cached_record(path, key) is None:
        return
    s.results["reconstruction"][name], s.edits[name] = cached(path, key, compute)
    r = s.results["reconstruction"][name]
    if not s.edits[name]:
        del s.edits[name]
    nti = f", NTI {r['nti']['psnr']:.2f}" if "nti" in r else ""
    print(f"[tables] {name}: reconstruction PSNR DDIM {r['ddim']['psnr']:.2f}{nti}", flush=True)


def vae_optimum(s, inputs):
    """The VAE's own reconstruction of Table 2's images: what no inversion can beat."""
    vae = load(s.args.model).vae
    images = inputs[0]
    m = report.image_metrics(sampler.decode_latents(vae, sampler.encode_images(vae, images))[1:], images[1:])
    s.results["reconstruction"]["vae"] = {k: float(np.mean(v)) for k, v in m.items()}


def selected_runs(s, names):
    """The runs --runs asks for, with the controls they are paired with (and theirs); None: all of them."""
    if names is None:
        return set(s.names.values()) | {"base", "table2"}
    unknown = [n for n in names if n not in s.plan and n not in ("base", "table2")]
    if unknown:
        raise SystemExit(f"python -m toy tables: error: --runs {' '.join(unknown)}: not in the plan; "
                         "`python -m toy tables --plan` lists the runs.")
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in ("base", "table2"):
            wanted.add(name)
            continue
        wanted.add(s.names[name])
        if s.plan[name].control is not None and s.names[s.plan[name].control] not in wanted:
            todo.append(s.plan[name].control)
    return wanted


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        p = QUICK if args.quick else Protocol()
        print_plan(p, plan_runs(p))
        return 0
    if not (Path(args.model) / "model_index.json").is_file():
        raise SystemExit(f"python -m toy tables: error: no model at {args.model}; build it with `python -m toy pretrain`.")
    torch.set_num_threads(args.threads)
    s = start(args)
    unknown = sorted(set(args.cells or ()) - {cell_name(c) for c in s.p.cells})
    if unknown:
        raise SystemExit(f"python -m toy tables: error: --cells {' '.join(unknown)}: the cells are "
                         f"{', '.join(cell_name(c) for c in s.p.cells)}.")
    s.out.mkdir(parents=True, exist_ok=True)
    try:
        world.prepare_data(args.data)
    except ValueError as e:
        raise SystemExit(f"python -m toy tables: error: {e}")
    runs = [n for n in dict.fromkeys(s.names.values()) if s.plan[n].flags is not None]
    wanted = selected_runs(s, args.runs)
    runs = [n for n in runs if n in wanted]
    pool = ThreadPoolExecutor(max_workers=1)  # training, one run after another, beside the scoring
    s.futures = {n: pool.submit(train_run, n, s.plan[n].flags, args.model, args.data, s.cache, args.threads,
                                args.cached_only) for n in runs}
    real_images, _ = world.make_images(s.p.real, seed=7, split="heldout")
    real_features = instruments.features(instruments.images01(real_images), world.load_classifier())
    base_key = [sha256(Path(args.model) / "unet" / "diffusion_pytorch_model.safetensors"),
                sha256(instruments.CLASSIFIER_PATH)]  # the scores depend on the measuring classifier too
    inputs = recon_inputs(s.p)
    vae_optimum(s, inputs)
    protocol = {k: v for k, v in s.results["protocol"].items() if k in ("strips", "frames", "guidance", "real")}
    protocol["instruments"] = ["fid_proxy", "kid_proxy", "features"]  # older cached scores are recomputed
    recon_protocol = {k: s.results["protocol"][k] for k in ("recon_images", "nti_inner_steps", "edit_r", "guidance")}
    recon_protocol["steps"] = max(s.p.step_counts)
    recon_protocol["inversion_step_counts"] = list(s.p.inversion_step_counts)
    recon_protocol["edit_scores"] = "target, kept attributes, outside_mse"  # older caches: recomputed
    recon_protocol["nti"] = not args.no_nti
    recon_protocol["cfg1"] = True  # the DDIM reconstructions sampled back at CFG 1 too
    reconstructed = {s.names[n] for n in s.results["tables"]["reconstruction"]} if "table2" in wanted else set()
    for name in ["base", *runs] if "base" in wanted else runs:
        lora_path, lora_key = lora_of(s, name)
        if lora_key is None:  # --cached-only: a run never trained
            continue
        models = load(args.model, lora_path)
        score_cells(s, name, models, {"protocol": protocol, "base": base_key, "lora": lora_key}, real_features)
        if name in reconstructed:
            reconstruct_model(s, name, models, {"protocol": recon_protocol, "base": base_key, "lora": lora_key},
                              inputs)
        write(s)
    pool.shutdown()
    write(s)
    print(f"[tables] wrote {s.out / 'tables.md'}, {s.out / 'results.json'} and the figures in "
          f"{time.time() - s.t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
