"""Why a claim does or does not hold, with numbers (issue 21): checks of the quality instrument and of
where DDIM inversion errs.

    python -m toy.diagnose instrument --cache runs/tables --runs control ours     # FID vs KID against n
    python -m toy.diagnose inversion --cache runs/tables --runs control ours      # DDIM inversion, step by step
    python -m toy.diagnose images --cache runs/tables --runs ours ours_seed1      # Table 2 on a second image set

`instrument`: the FID-proxy and the KID-proxy of one model's frames (cached by `python -m toy tables`,
`tables.cell_features`) at 24, 48 and 64 strips (strip k samples prompt k mod 24: fewer than 24 strips
would miss prompts the real set has) against 500 and 1000 real held-out images: a biased
estimator moves with n, an unbiased one does not (beyond its s.e.).

`inversion` (also: the PSNR of the reconstruction sampled back at CFG 1 and at Table 2's 7.5): DDIM
inversion (Eq. 4) steps from x_{t-s} to x_t with eps(x_{t-s}, t); sampling steps back
with eps(x_t, t). The round trip of one step errs by |c_t| ||eps(x_t, t) - eps(x_{t-s}, t)||, with
c_t = sqrt(1 - abar_{t-s}) - sqrt(abar_{t-s} (1 - abar_t) / abar_t): the error is how much eps changes ALONG
the trajectory, d = x_t - x_{t-s}. Eq. 10 regularizes the variation in a RANDOM direction. For each step
this measures, on validation images (training triples, not held-out ones): the round trip's error, the
gain of eps along the trajectory ||eps(x_t) - eps(x_{t-s})|| / ||d||, and the gain in a random direction
of the same length; so whether a LoRA that lowers the random gain (what Eq. 10 penalizes) also lowers the
one the inversion error depends on.

`images`: Table 2 (DDIM inversion at 10, 20, 50 steps sampled back at CFG 7.5 and 1, null-text inversion, Eq. 15
edits scored on what changed and what stayed: `tables.score_reconstruction`) on a SECOND draw of 32 real
held-out images (--image-seed, default 13; the tables' is 11), each run paired with its control
(`<form>_seedK` with `control_seedK`): the claims' second, disjoint image set. Cached beside each LoRA.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toy import instruments, world

ROOT = Path(__file__).resolve().parents[1]


def instrument_sample_size(features, real_features, frames=11, strip_counts=(24, 48, 64), real_counts=(500, 1000)):
    """FID-proxy and KID-proxy (± s.e.) of the first n strips' frames against the first m real images, for
    every n in strip_counts and m in real_counts: [{"strips", "real", "fid", "kid", "kid_se"}]."""
    out = []
    for n in (n for n in strip_counts if n * frames <= len(features)):
        a = features[:n * frames]
        for m in real_counts:
            k = instruments.kid(a, real_features[:m], groups_a=np.repeat(np.arange(n), frames))
            out.append({"strips": n, "real": m, "fid": instruments.frechet_distance(a, real_features[:m]),
                        "kid": k["kid"], "kid_se": k["se"]})
    return out


def disjoint_halves(features, real_features, frames=11, prompts=24):
    """The instrument's own noise on one model: the KID-proxy of strips 0..23 against real images 0..499
    and of strips 24..47 against real images 500..999 (every held-out prompt once in each half; no noise
    pair, no real image shared), their difference and the s.e. the jackknife gives it."""
    if len(features) < 2 * prompts * frames:
        return None
    halves = []
    for h in range(2):
        a = features[h * prompts * frames:(h + 1) * prompts * frames]
        b = real_features[h * len(real_features) // 2:(h + 1) * len(real_features) // 2]
        halves.append(instruments.kid(a, b, groups_a=np.repeat(np.arange(prompts), frames)))
    return {"kid": [k["kid"] for k in halves], "se": [k["se"] for k in halves],
            "difference": halves[0]["kid"] - halves[1]["kid"], "difference_se": float(np.hypot(*[k["se"] for k in halves])),
            "fid": [instruments.frechet_distance(features[h * prompts * frames:(h + 1) * prompts * frames],
                                                 real_features[h * len(real_features) // 2:(h + 1) * len(real_features) // 2])
                    for h in range(2)]}


@torch.no_grad()
def inversion_steps(models, images01, captions, steps=50, seed=0):
    """Per DDIM step k (timestep t_k, ascending) of the inversion of images01: the round-trip error (latent
    RMS), the gain of eps along the trajectory and in a random direction of the same length (per image).
    Returns {"t": [steps], "round_trip", "step" (RMS of d), "gain_trajectory", "gain_random": [steps, B]}."""
    import sampler

    schedule = sampler.make_schedule(models.scheduler_config)
    unet, stride = models.unet, schedule.num_train_timesteps // steps
    cond = models.encode_prompt(captions)
    trajectory = sampler.ddim_inversion_trajectory(unet, sampler.encode_images(models.vae, images01), cond,
                                                   steps=steps, schedule=schedule, progress=False)
    g = torch.Generator().manual_seed(seed)
    rms = lambda x: x.flatten(1).norm(dim=1) / x[0].numel() ** 0.5  # noqa: E731
    out = {"t": [], "round_trip": [], "step": [], "gain_trajectory": [], "gain_random": []}
    for k, t in enumerate(sampler.ddim_timesteps(steps, schedule).flip(0).tolist(), start=1):
        below, here = trajectory[k - 1], trajectory[k]
        eps_here = unet(here, sampler._timestep(t, here), cond)
        eps_below = unet(below, sampler._timestep(t, below), cond)  # what the inversion step used
        back = sampler.ddim_step(here, eps_here, sampler._abar(schedule, t), sampler._abar(schedule, t - stride))
        d = here - below
        u = torch.randn(d.shape, generator=g)
        u = u * (d.flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
        eps_random = unet(below + u, sampler._timestep(t, below), cond)
        out["t"].append(t)
        out["round_trip"].append(rms(back - below).tolist())
        out["step"].append(rms(d).tolist())
        out["gain_trajectory"].append(((eps_here - eps_below).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).tolist())
        out["gain_random"].append(((eps_random - eps_below).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).tolist())
    return out


def reconstruction_by_guidance(models, images01, captions, steps=50, guidances=(1.0, 7.5)):
    """Per-image PSNR of Table 2's DDIM reconstruction (inverted without guidance, `report.ddim_reconstruct`)
    sampled back at each CFG scale: at 1 the way back mirrors the inversion, at 7.5 (Table 2's) it does not."""
    from toy import report

    return {g: report.image_metrics(report.ddim_reconstruct(models, images01, captions, steps=steps, guidance=g),
                                    images01)["psnr"] for g in guidances}


def summarize_steps(result, buckets=5):
    """Means over images and over `buckets` equal ranges of steps (low t first)."""
    t = np.array(result["t"])
    rows = []
    for chunk in np.array_split(np.arange(len(t)), buckets):
        row = {"t": f"{t[chunk[0]]}-{t[chunk[-1]]}"}
        for key in ("round_trip", "gain_trajectory", "gain_random"):
            row[key] = float(np.mean(np.array(result[key])[chunk]))
        rows.append(row)
    return rows


def second_image_set(cache, runs, image_seed):
    """{run: Table 2's numbers on the image draw of `image_seed`}, each cached in CACHE/run/."""
    from toy import tables

    p = tables.Protocol()
    inputs, out = tables.recon_inputs(p, seed=image_seed), {}
    for run in runs:
        lora_path = Path(cache) / run / "smooth_lora.safetensors"
        key = {"lora": tables.sha256(lora_path), "image_seed": image_seed, "protocol": {
            k: getattr(p, k) for k in ("recon_images", "step_counts", "inversion_step_counts", "guidance",
                                       "nti_inner_steps", "edit_r")}}
        key = json.loads(json.dumps(key))  # as the cache stores it (tuples become lists), so that it matches

        def compute():
            t0 = time.time()
            result, _ = tables.score_reconstruction(tables.load(str(world.MODEL_DIR), lora_path), inputs, p)
            return {**result, "eval_s": round(time.time() - t0, 1)}, {}

        out[run], _ = tables.cached(Path(cache) / run / f"reconstruction_images{image_seed}.json", key, compute)
        print(f"{run}: DDIM PSNR {out[run]['ddim']['psnr']:.2f}, edit success {out[run]['edit']['success']:.3f} "
              f"({out[run]['eval_s']:.0f} s)", flush=True)
    return out


def paired_with_controls(scores):
    """Each run against control_seedK of its seed: ΔPSNR of every reconstruction, Δ edit success and Δ pixel
    MSE outside the shape (paired over images)."""
    from toy import tables

    rows = {}
    for run, r in scores.items():
        if run.startswith("control"):
            continue
        seed = run.rsplit("_seed", 1)[1] if "_seed" in run else None
        control = scores.get("control" + (f"_seed{seed}" if seed else ""))
        if control is None:
            continue
        psnr, edit = tables.reconstruction_vs_control(r, control)
        rows[run] = {**psnr, **{f"edit_{k}": d for k, d in edit.items()}}
    return rows


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m toy.diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=("instrument", "inversion", "images"), help="which check (see above)")
    parser.add_argument("--cache", default="runs/tables", help="the tables' cache (LoRAs, cached scores; default: runs/tables)")
    parser.add_argument("--runs", nargs="+", default=["control", "ours"],
                        help="runs of the tables' cache (default: control ours; 'base' for the base model)")
    parser.add_argument("--cell", default="A50", help="instrument: the cell whose frames are scored (default: A50)")
    parser.add_argument("--images", type=int, default=16, help="inversion: validation images (default: 16)")
    parser.add_argument("--steps", type=int, default=50, help="inversion: DDIM steps (default: 50)")
    parser.add_argument("--image-seed", type=int, default=13, choices=range(12, 1000), metavar="SEED",
                        help="images: the draw of real held-out images (default: 13; not 11, the tables' own)")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    cache, results = Path(args.cache), {}
    for run in args.runs:
        if not (cache / run).is_dir():
            raise SystemExit(f"python -m toy.diagnose: error: no run {run!r} in {cache}; run `python -m toy tables` first.")
    if args.check == "images":
        results["scores"] = second_image_set(cache, args.runs, args.image_seed)
        results["paired"] = paired_with_controls(results["scores"])
        for run, row in results["paired"].items():
            print(f"{run} vs its control (images {args.image_seed}): " + ", ".join(
                f"{k} {d['mean']:+.4f} +- {d['se']:.4f}" for k, d in row.items()), flush=True)
    elif args.check == "instrument":
        from toy import tables

        real, _ = world.make_images(1000, seed=7, split="heldout")  # the tables' real set (and the report's first 500)
        real_features = instruments.features(instruments.images01(real), world.load_classifier())
        for run in args.runs:
            features = tables.cell_features(cache, run, args.cell)
            results[run] = {"sample_size": instrument_sample_size(features, real_features),
                            "halves": disjoint_halves(features, real_features)}
            for r in results[run]["sample_size"]:
                print(f"{run} {args.cell}: {r['strips']:2d} strips vs {r['real']:4d} real: FID-proxy {r['fid']:7.2f}, "
                      f"KID-proxy {r['kid']:6.2f} +- {r['kid_se']:.2f}", flush=True)
            h = results[run]["halves"]
            if h is None:
                continue  # fewer than 48 strips
            print(f"{run} {args.cell}: disjoint halves (24 strips vs 500 real each): KID-proxy {h['kid'][0]:.2f} +- "
                  f"{h['se'][0]:.2f} and {h['kid'][1]:.2f} +- {h['se'][1]:.2f}, difference "
                  f"{h['difference']:+.2f} +- {h['difference_se']:.2f}; FID-proxy {h['fid'][0]:.2f} and "
                  f"{h['fid'][1]:.2f}", flush=True)
    else:
        from toy import tables

        images, attributes = world.make_images(args.images, seed=31, split="train")  # validation: training triples
        for run in args.runs:
            lora_path = None if run == "base" else cache / run / "smooth_lora.safetensors"
            models = tables.load(str(world.MODEL_DIR), lora_path)
            images01, captions = instruments.images01(images), [world.caption(a) for a in attributes]
            results[run] = inversion_steps(models, images01, captions, steps=args.steps)
            results[run]["psnr_by_guidance"] = reconstruction_by_guidance(models, images01, captions, steps=args.steps)
            print(f"{run}: DDIM reconstruction PSNR (inverted at guidance 1, {args.steps} steps) sampled at guidance " +
                  ", ".join(f"{g}: {np.mean(v):.2f} dB" for g, v in results[run]["psnr_by_guidance"].items()), flush=True)
            for row in summarize_steps(results[run]):
                print(f"{run} t {row['t']}: round-trip error {row['round_trip']:.5f}, eps gain along the trajectory "
                      f"{row['gain_trajectory']:.3f}, in a random direction {row['gain_random']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
