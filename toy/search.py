"""Issue 21's search for a Smooth-LoRA setting that smooths more at no quality cost, on VALIDATION data only.

    python -m toy.search                                   # every candidate (~20 min, 1 thread)
    python -m toy.search --candidates ours ours_lambda3    # some of them

The choice is confirmed once on the held-out protocol by `python -m toy tables` (`tables.Protocol.chosen`,
at every training seed, against the controls the tables already score).

Every candidate is OUR_FORM (the default, 300 steps) with a few train.py flags changed (`CANDIDATES`),
trained by `tables.train_run` (cached under --cache) and paired with the lambda-0 control of the same length
and seed: the tables' control, so each comparison is a paired difference on the same strips and images.

Validation: 24 captions of training triples (`validation_prompts`: 12 triples x 2 sizes, no
held-out triple), 48 strips (every prompt twice) of noise pairs 2000..2047, DDIM 25 steps, CFG 7.5; the
KID-proxy (toy/instruments.py) against 500 training-split images of another seed than the training data's;
DDIM inversion of 16 training-triple images (toy.diagnose's validation images) at 10 and 50 steps, inverted
without guidance and sampled back at CFG 1 (the inversion's own error) and 7.5 (Table 2's protocol).
The goal (issue 21): ISTD <= 0.60x the control in every cell, and the KID-proxy not worse than the control's
by more than 2 standard errors of the paired difference.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toy import instruments, main_job, report, tables, world

ROOT = Path(__file__).resolve().parents[1]
# name -> the train.py flags that differ from OUR_FORM at 300 steps (issue 21, item 2: lambda, fine-tune length,
# the form of the penalty; item 4: Eq. 10's direction along the DDIM path instead of a random one).
CANDIDATES = {
    "ours": {},
    "ours_lambda3": {"lambda_reg": 3.0},
    "ours_steps1000": {"max_steps": 1000},
    "paper": {k: v for k, v in main_job.PAPER_FORM.items()},
    "ours_fd": {"reg_mode": "fd"},
    "ours_fd_trajectory": {"reg_mode": "fd", "reg_direction": "trajectory"},
}
GOAL_ISTD = -0.40  # ISTD at most 0.60x the control's


def validation_prompts():
    """24 captions of training triples, never held-out ones: every 6th triple, small and large."""
    return [world.caption(dict(shape=s, colour=c, background=b, size=z))
            for s, c, b in world.triples("train")[::6][:12] for z in world.SIZES]


def protocol():
    """(prompts, cells [(name, noise seed, steps)], strips, real images uint8, inversion images01 and captions)."""
    real, _ = world.make_images(500, seed=41, split="train")
    images, attributes = world.make_images(16, seed=31, split="train")  # toy.diagnose's validation images
    return (validation_prompts(), [("V25", 2000, 25)], 48, real, instruments.images01(images),
            [world.caption(a) for a in attributes])


def run_flags(name, seed):
    """(candidate's train.py flags, its control's name and flags): the control is the tables' lambda-0 run of
    the same length and seed."""
    p = tables.Protocol()
    flags = {**tables.variant(p, "ours", seed=seed)[1].flags, **CANDIDATES[name]}
    steps = flags["max_steps"] if flags["max_steps"] != main_job.TRAIN_DEFAULTS["max_steps"] else None
    control, run = tables.variant(p, "ours", control=True, max_steps=steps, seed=seed)
    return flags, control, run.flags


def score_model(cache, name, lora_path, setup):
    """ISTD and quality proxies per cell, and inversion PSNRs, of one model (cached by the LoRA's bytes)."""
    prompts, cells, strips, real, images01, captions = setup
    key = {"lora": tables.sha256(lora_path), "heldout": False, "prompts": prompts, "strips": strips}
    models = None
    out = {}
    for cell, seed, steps in [*cells, ("inversion", None, None)]:
        def compute():
            nonlocal models
            models = models or tables.load(str(world.MODEL_DIR), lora_path)
            t0 = time.time()
            if cell == "inversion":
                from toy import diagnose
                result = {f"{n}_cfg{g:g}": v for n in (10, 50) for g, v in
                          diagnose.reconstruction_by_guidance(models, images01, captions, steps=n).items()}
            else:
                p = tables.Protocol(strips=strips)
                frames = tables.sample_strips(models, prompts, p, seed=seed, steps=steps)
                real_features = instruments.features(instruments.images01(real), world.load_classifier())
                result = report.score_strips(frames, prompts, real_features)
            return {**result, "eval_s": round(time.time() - t0, 1)}, {}
        out[cell], _ = tables.cached(Path(cache) / "scores" / name / f"{cell}.json", {**key, "cell": [seed, steps]},
                                     compute)
    return out


def compare(scores, control):
    """Paired differences of a candidate against its control: ISTD (relative, per cell), KID-proxy, caption
    accuracy and inversion PSNR; and whether the goal is met."""
    cells = [c for c in scores if c != "inversion"]
    istd = {c: instruments.paired_difference(scores[c]["per_strip_istd"], control[c]["per_strip_istd"])
            for c in cells}
    for c, d in istd.items():
        d["relative_se"] = d["se"] / control[c]["istd"]
    caption = lambda s: s["caption_accuracy"]["caption"]  # noqa: E731
    row = {"istd": istd,
           "kid": {c: instruments.kid_difference(scores[c]["kid_proxy"], control[c]["kid_proxy"]) for c in cells},
           "caption": {c: caption(scores[c]) - caption(control[c]) for c in cells},
           "inversion": {k: instruments.paired_difference(v, control["inversion"][k])
                         for k, v in scores["inversion"].items() if k != "eval_s"}}
    row["goal"] = all(row["istd"][c]["relative"] <= GOAL_ISTD for c in cells) and \
        all(row["kid"][c]["mean"] <= 2 * row["kid"][c]["se"] for c in cells)
    return row


def table(results):
    """Markdown: one row per candidate, seed and cell; the inversion columns on each candidate's first row."""
    lines = ["| candidate | seed | cell | ΔISTD | ΔKID-proxy (control's KID) | Δcaption acc. | "
             "ΔPSNR 10 steps, CFG 1 / 7.5 | ΔPSNR 50 steps, CFG 1 / 7.5 | goal |", "|---|---|---|---|---|---|---|---|---|"]
    pm = lambda d: f"{d['mean']:+.2f} ± {d['se']:.2f}"  # noqa: E731
    for r in results:
        inv, first = r["compare"]["inversion"], True
        for c, d in r["compare"]["istd"].items():
            k, caption = r["compare"]["kid"][c], r["compare"]["caption"][c]
            psnr = [" / ".join(pm(inv[f"{n}_cfg{g}"]) for g in ("1", "7.5")) if first else "" for n in (10, 50)]
            lines.append(f"| {r['candidate']} | {r['seed']} | {c} | {100 * d['relative']:+.0f}% ± "
                         f"{100 * d['relative_se']:.0f}% | {pm(k)} ({r['control_kid'][c]:.2f}) | {caption:+.3f} | "
                         f"{psnr[0]} | {psnr[1]} | {'yes' if r['compare']['goal'] else 'no'} |")
            first = False
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m toy.search", description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES),
                        metavar="NAME", help=f"which candidates (default: all: {', '.join(CANDIDATES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (default: 0)")
    parser.add_argument("--cache", default="runs/search", help="LoRA runs and scores (default: runs/search)")
    parser.add_argument("--data", default=str(ROOT / "data" / "toy"), help="training images (world.prepare_data)")
    parser.add_argument("--threads", type=int, default=1, choices=range(1, 65), metavar="N",
                        help="torch threads here and in train.py (default: 1)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    world.prepare_data(args.data)
    setup, results, split = protocol(), [], "validation"
    for seed in args.seeds:
        for name in args.candidates:
            flags, control_name, control_flags = run_flags(name, seed)
            run_name = name + (f"_seed{seed}" if seed else "")
            loras = {n: tables.train_run(n, f, str(world.MODEL_DIR), args.data, args.cache, args.threads)["lora"]
                     for n, f in ((control_name, control_flags), (run_name, flags))}
            scores = {n: score_model(args.cache, f"{split}/{n}", path, setup) for n, path in loras.items()}
            row = {"candidate": name, "seed": seed, "flags": flags, "control": control_name,
                   "compare": compare(scores[run_name], scores[control_name]),
                   "control_kid": {c: v["kid_proxy"]["kid"] for c, v in scores[control_name].items() if c != "inversion"}}
            results.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    out = Path(args.cache) / f"search_{split}.md"
    out.write_text(f"# python -m toy.search ({split})\n\n{table(results)}\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"[search] {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
