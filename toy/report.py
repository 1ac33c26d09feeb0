"""Measuring the toy world's models: the base's own numbers (`python -m toy evaluate`) and the paired
before/after report of train.py's main job (Sec. 4.1's ISTD on the held-out prompts, with the quality
proxies of toy/instruments.py, and Table 2's DDIM inversion of real held-out images), and the
measurements the tables share with it (`score_strips`, `ddim_reconstruct`, `image_metrics`,
`edit_scores`).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
from toy import instruments
from toy.world import (HEADS, MODEL_DIR, RESOLUTION, caption, caption_accuracy, draw, heldout_prompts,
                       load_classifier, make_images)


@torch.no_grad()
def generate(models, prompts, seed=0, steps=50, guidance=7.5, batch=48):
    """One image per prompt, [N, 3, 32, 32] in [0, 1]; the noise of image k is the k-th draw from seed."""
    import sampler

    schedule = sampler.make_schedule(models.scheduler_config)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), 4, RESOLUTION // 4, RESOLUTION // 4, generator=g)
    uncond = models.encode_prompt([""])
    images = []
    for i in range(0, len(prompts), batch):
        cond = models.encode_prompt(prompts[i:i + batch])
        z = sampler.ddim_sample(models.unet, latents[i:i + batch], cond, uncond, steps=steps, guidance=guidance,
                                schedule=schedule, progress=False)
        images.append(sampler.decode_latents(models.vae, z))
    return torch.cat(images)


def evaluate(model=MODEL_DIR, out="runs/toy_eval", per_prompt=4, steps=50, guidance=7.5, seed=0):
    """The base model's numbers: VAE reconstruction, classifier accuracy on real held-out images, and
    caption accuracy / Frechet distance (the proxies of toy/instruments.py) of samples for the held-out and
    the training prompts. Writes OUT/samples.png (one sample per held-out prompt) and OUT/eval.json."""
    import checkpoint
    from demos import media
    import metrics
    import sampler

    models = checkpoint.load_models(model)
    real, attributes = make_images(1000, seed=seed + 7, split="heldout")
    real01 = instruments.images01(real)
    recon = sampler.decode_latents(models.vae, sampler.encode_images(models.vae, real01))
    results = {"vae_reconstruction_heldout": {"mse": metrics.mse(recon, real01).mean().item(),
                                              "psnr": metrics.psnr(recon, real01).mean().item()},
               "classifier_heldout_real": caption_accuracy(real01, [caption(a) for a in attributes]),
               "steps": steps, "guidance": guidance}
    train_prompts = sorted({caption(a) for a in make_images(200, seed=seed + 8)[1]})[:24]
    for name, prompts in (("heldout_prompts", heldout_prompts()), ("train_prompts", train_prompts)):
        prompts = [p for p in prompts for _ in range(per_prompt)]
        images = generate(models, prompts, seed, steps, guidance)
        results[name] = caption_accuracy(images, prompts)
        if name == "heldout_prompts":
            results[name]["frechet_to_real"] = instruments.frechet_distance(
                instruments.features(images, load_classifier()), instruments.features(real01, load_classifier()))
            Path(out).mkdir(parents=True, exist_ok=True)
            media.save_strip(images[::per_prompt], Path(out) / "samples.png")
    (Path(out) / "eval.json").write_text(json.dumps(results, indent=2))
    return results


def inversion_inputs(n, seed=11):
    """n real held-out images to invert (uint8 -> [n, 3, 32, 32] in [0, 1]), their captions and attribute
    dicts. The tables invert the first 32 of the same draw, so the report's 24 are among them."""
    images, attributes = make_images(n, seed=seed, split="heldout")
    return instruments.images01(images), [caption(a) for a in attributes], attributes


@torch.no_grad()
def ddim_reconstruct(models, images01, captions, *, steps, guidance, schedule=None):
    """Table 2's DDIM inversion: x_T by Eq. 4 (conditional branch, no guidance), then DDIM sampling with
    CFG from it; the reconstructions [B, 3, H, W] in [0, 1]."""
    import sampler

    schedule = schedule or sampler.make_schedule(models.scheduler_config)
    cond, uncond = models.encode_prompt(captions), models.encode_prompt([""])
    kw = dict(steps=steps, schedule=schedule, progress=False)
    x_T = sampler.ddim_invert(models.unet, sampler.encode_images(models.vae, images01), cond, **kw)  # Eq. 4
    return sampler.decode_latents(models.vae, sampler.ddim_sample(models.unet, x_T, cond, uncond,
                                                                  guidance=guidance, **kw))


def image_metrics(x, y):
    """Per-image MSE / PSNR / SSIM lists of images in [0, 1]."""
    import metrics

    return {"mse": metrics.mse(x, y).tolist(), "psnr": metrics.psnr(x, y).tolist(), "ssim": metrics.ssim(x, y).tolist()}


def outside_shape(attributes, margin=1):
    """Bool [32, 32]: the pixels the shape of an attribute dict does not touch, not even partly (its
    anti-aliased edge) nor within `margin` pixels of it: what a recolouring edit must leave as it was."""
    cover = draw({**attributes, "colour_rgb": (255, 255, 255), "background_rgb": (0, 0, 0)})[..., 0] > 0
    touched = torch.as_tensor(cover)[None, None].float()
    if margin:
        touched = torch.nn.functional.max_pool2d(touched, 2 * margin + 1, stride=1, padding=margin)
    return ~touched[0, 0].bool()


def edit_scores(edited01, source01, source_attributes, target_colours, classifier=None):
    """How well recolouring edits (Eq. 15: the shape's colour -> target_colours[k]) did what they should
    and kept what they should, read by the attribute classifier and the pixels, per image and as means:
      * target_seen: the classifier sees the target colour on the edited shape;
      * kept_shape / kept_background / kept_size: it sees the source's value of each other attribute;
        kept_all: all three;
      * success: target_seen and kept_all;
      * outside_mse: mean squared pixel difference to the source outside the shape (`outside_shape`).
    Images [N, 3, H, W] in [0, 1]."""
    predicted = instruments.predict(edited01, classifier or load_classifier())
    seen = lambda name, k: HEADS[name][int(predicted[name][k])]  # noqa: E731
    per = {key: [] for key in ("target_seen", "kept_shape", "kept_background", "kept_size", "kept_all",
                               "success", "outside_mse")}
    for k, (a, target) in enumerate(zip(source_attributes, target_colours)):
        kept = {name: seen(name, k) == a[name] for name in ("shape", "background", "size")}
        per["target_seen"].append(float(seen("colour", k) == target))
        for name, ok in kept.items():
            per[f"kept_{name}"].append(float(ok))
        per["kept_all"].append(float(all(kept.values())))
        per["success"].append(float(per["target_seen"][-1] and all(kept.values())))
        mask = outside_shape(a)
        per["outside_mse"].append(float(((edited01[k] - source01[k]) ** 2)[:, mask].mean()))
    return {"per_image": per, **{key: float(np.mean(v)) for key, v in per.items()}}


@dataclass
class ReportProtocol:
    """What `report` measures: Sec. 4.1's ISTD protocol on the held-out prompts, paired."""
    strips: int = 24  # strip k: held-out prompt k mod 24 and the noise pair of seed + k (>= 24: one per prompt)
    frames: int = 11  # slerp ratios 0, 0.1, ..., 1 (paper)
    steps: int = 50  # DDIM steps (paper)
    guidance: float = 7.5  # CFG scale (paper)
    seed: int = 0
    real: int = 500  # real held-out images: the reference of the FID and KID proxies
    inversion_images: int = 24  # real held-out images inverted by DDIM (Table 2's PSNR), at `steps`
    figure_strips: int = 3  # the figure shows strips 0, 1, 2: fixed in advance, not picked by looking


def score_strips(strips, prompts, real_features):
    """ISTD (Sec. 4.1) and the quality proxies of sampled strips [S, frames, 3, H, W] in [0, 1], strip k
    sampled with prompts[k mod len(prompts)]: per-strip ISTD and mean adjacent distance (and their means),
    caption accuracy, the FID-proxy and the KID-proxy (both against `real_features`) over all frames."""
    import metrics

    S, F = strips.shape[:2]
    per_strip_istd = [metrics.istd(s) for s in strips]
    per_strip_distance = [metrics.adjacent_distances(s).mean().item() for s in strips]
    # ISTD in units of the strip's own mean step: a model whose frames all change less (less variety along
    # the walk) also has a lower ISTD; this ratio only falls when the steps become more even.
    per_strip_relative = [i / d if d > 0 else 0.0 for i, d in zip(per_strip_istd, per_strip_distance)]
    frames = strips.flatten(0, 1)
    frame_features = instruments.features(frames, load_classifier())
    return {"istd": float(np.mean(per_strip_istd)), "mean_adjacent_distance": float(np.mean(per_strip_distance)),
            "relative_istd": float(np.mean(per_strip_relative)),
            "per_strip_istd": per_strip_istd, "per_strip_mean_adjacent_distance": per_strip_distance,
            "per_strip_relative_istd": per_strip_relative,
            "caption_accuracy": caption_accuracy(frames, [prompts[k % len(prompts)] for k in range(S) for _ in range(F)]),
            "fid_proxy": instruments.frechet_distance(frame_features, real_features),
            # KID-proxy with a jackknife s.e. that deletes one strip at a time (its frames are not independent)
            "kid_proxy": instruments.kid(frame_features, real_features, groups_a=np.repeat(np.arange(S), F))}


def report(model_path, loras, out_dir, protocol=None, reference="control"):
    """Paired before/after of LoRAs on the held-out prompts, written to OUT/report.json, one printed line,
    and OUT/interpolation_before_after.png (each model's row for the first strips, frames enlarged 4x).

    loras: {name: LoRA file, or None for the base model}. Every model samples the SAME strips (prompts and
    noise pairs), so each is compared with `reference` by the per-strip difference of ISTD (mean and
    standard error over strips), beside the mean adjacent distance (a low ISTD can also be uniformly
    large jumps) and the quality proxies of toy/instruments.py (caption accuracy, FID-proxy) on all frames.
    """
    import checkpoint
    import lora
    import sampler

    p, out = protocol or ReportProtocol(), Path(out_dir)
    every = heldout_prompts()
    prompts = [every[k % len(every)] for k in range(p.strips)]
    real, _ = make_images(p.real, seed=p.seed + 7, split="heldout")
    real_features = instruments.features(instruments.images01(real), load_classifier())
    inverted, inverted_captions, _ = inversion_inputs(p.inversion_images)
    results, rows = {}, []
    for name, lora_path in loras.items():
        models = checkpoint.load_models(model_path)
        if lora_path is not None:
            lora.load_lora(models.unet, lora_path)
        strips = sampler.interpolation_strips(
            models.unet, models.vae, models.encode_prompt, prompts, latent_shape=(4, RESOLUTION // 4, RESOLUTION // 4),
            frames=p.frames, steps=p.steps, guidance=p.guidance, seed=p.seed,
            schedule=sampler.make_schedule(models.scheduler_config), progress=False)
        recon = image_metrics(ddim_reconstruct(models, inverted, inverted_captions, steps=p.steps,
                                               guidance=p.guidance), inverted)
        results[name] = {"lora": None if lora_path is None else str(lora_path),
                         **score_strips(strips, prompts, real_features),
                         "ddim_inversion": {"per_image": recon, **{k: float(np.mean(v)) for k, v in recon.items()}}}
        rows.append((name, strips[:p.figure_strips]))
    for name in results:
        if name != reference:
            for key in ("istd", "relative_istd"):
                results[name][f"{key}_vs_{reference}"] = instruments.paired_difference(
                    results[name]["per_strip_" + key], results[reference]["per_strip_" + key])
            results[name][f"kid_proxy_vs_{reference}"] = instruments.kid_difference(
                results[name]["kid_proxy"], results[reference]["kid_proxy"])
            results[name][f"ddim_inversion_psnr_vs_{reference}"] = instruments.paired_difference(
                results[name]["ddim_inversion"]["per_image"]["psnr"], results[reference]["ddim_inversion"]["per_image"]["psnr"])
    out.mkdir(parents=True, exist_ok=True)
    grid = [(f"strip {k}: {name}", strips[k]) for k in range(p.figure_strips) for name, strips in rows]
    data.labelled_grid(grid, scale=4).save(out / "interpolation_before_after.png")
    summary = {"protocol": vars(p), "prompts": prompts, "reference": reference, "models": results}
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    print(report_line(summary, out))
    return summary


def report_line(summary, out):
    """The one line `python train.py` prints about its paired report."""
    p, ref, models = summary["protocol"], summary["reference"], summary["models"]
    parts = []
    for name, r in models.items():
        if name == ref:
            continue
        d, c = r["istd_vs_" + ref], r["relative_istd_vs_" + ref]
        k, i = r["kid_proxy_vs_" + ref], r["ddim_inversion_psnr_vs_" + ref]
        parts.append(f"{name} {r['istd']:.3f} vs {ref} {models[ref]['istd']:.3f}: {d['mean']:+.3f} +- {d['se']:.3f} "
                     f"({100 * d['relative']:+.0f}%, paired, {d['n']} strips); mean step {r['mean_adjacent_distance']:.3f}"
                     f" vs {models[ref]['mean_adjacent_distance']:.3f}; ISTD / mean step {100 * c['relative']:+.0f}% "
                     f"+- {100 * c['se'] / models[ref]['relative_istd']:.0f}%; FID-proxy {r['fid_proxy']:.2f} vs "
                     f"{models[ref]['fid_proxy']:.2f}; KID-proxy {r['kid_proxy']['kid']:.2f} vs "
                     f"{models[ref]['kid_proxy']['kid']:.2f}: {k['mean']:+.2f} +- {k['se']:.2f} "
                     f"(paired); caption accuracy {r['caption_accuracy']['caption']:.2f} vs "
                     f"{models[ref]['caption_accuracy']['caption']:.2f}; DDIM inversion PSNR {r['ddim_inversion']['psnr']:.2f}"
                     f" vs {models[ref]['ddim_inversion']['psnr']:.2f} dB: {i['mean']:+.2f} +- {i['se']:.2f} (paired, "
                     f"{i['n']} real held-out images)")
    return (f"ISTD on held-out prompts ({p['steps']} DDIM steps, CFG {p['guidance']}): " + "; ".join(parts) +
            f". Figure {out / 'interpolation_before_after.png'}, numbers {out / 'report.json'}")
