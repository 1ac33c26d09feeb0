"""Table 1 of the paper for any model and LoRA: ISTD, FID, KID and CLIP score (`python sampler.py evaluate`).

The paper reports ISTD (Sec. 4.1), FID and CLIP score on MS-COCO validation captions (Table 1: FID
12.70 -> 12.10, CLIP score 31.46 -> 31.54), without naming the image count, the CLIP backbone or the FID
code. This module measures all of them with the libraries people already trust:
  * sampling as in the paper: DDIM 50 steps, CFG 7.5; image k is `generate --seed SEED+k` with prompt
    k mod P (one image per caption by default); ISTD strip k is `istd`'s (noise pair of SEED+k, 11 frames);
  * FID and KID by torchmetrics (FrechetInceptionDistance, KernelInceptionDistance) on Inception-v3 pool
    features (torchmetrics' NoTrainInceptionV3, weights by file), against a folder of real images;
  * CLIP score by torchmetrics' CLIPScore on a transformers CLIP (openai/clip-vit-large-patch14 by default),
    one value per image, max(100 cos, 0), averaged;
  * with two models (`--compare OTHER_OUT`, or `--lora L --compare-base`): paired differences with standard
    errors, per prompt for ISTD, per image for CLIP score, by a paired bootstrap over images for FID and KID.
Every image is written to OUT (images/, strips/) before it is measured and reused on the next call, so
an interrupted evaluation continues where it stopped; results go to OUT/metrics.json (atomically) and
one printed line.

The toy world (no --model) has no Inception or CLIP worth the name on 32 x 32 shapes: its own instruments
(toy/instruments.py) take their place, the attribute classifier's features for FID / KID and its caption
accuracy for the CLIP score, against 1000 real images of the held-out prompts.

torchmetrics (and torch-fidelity for the Inception) are evaluation extras, `pip install -r
requirements-eval.txt`: imported only inside the functions that use them. docs/evaluate.md has the
commands that reproduce Table 1.
"""
import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

import lora
import metrics
from demos import media
from toy import world
from toy.instruments import paired_difference
from sampler import ddim_sample, decode_latents, interpolation_strips, noise_pair

EXTRAS = "pip install -r requirements-eval.txt"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity's (= TF FID's) Inception-v3
CLIP_MODEL = "openai/clip-vit-large-patch14"  # SD-1.5's own text tower; the paper names no backbone
ISTD_PROMPTS = 500  # Sec. 4.1: "500 prompts"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' defaults (subset size capped by the image counts)
TOY_IMAGES = 240  # the toy: 10 images for each of its 24 held-out prompts
TOY_REFERENCE = 1000  # the toy: real images of the held-out triples (seed 7, as `python -m toy evaluate`)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What two evaluations must share for their images to be pairs.
PAIRING = ("prompts_sha256", "seed", "num_images", "istd_prompts", "frames", "width", "height", "instruments")


class Refused(ValueError):
    """An OUT that holds images of other settings, or a --compare whose images are not pairs of these."""


# ------------------------------------------------------------------------------------- the extras

def require_extras():
    """Fail with the install command unless the evaluation extras are importable."""
    if importlib.util.find_spec("torchmetrics") is None:
        raise ModuleNotFoundError(f"evaluate needs the evaluation extras (torchmetrics), not installed: {EXTRAS}")


class GivenFeatures(nn.Module):
    """The identity on features already extracted, so that torchmetrics' FID / KID run on them."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features  # torchmetrics reads it instead of probing with a dummy image

    def forward(self, features):
        return features


def fid(fake, real):
    """torchmetrics' FrechetInceptionDistance of two feature sets [N, D] (float64 in, float out)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=GivenFeatures(fake.shape[1])).to(fake.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute().item()


def kid(fake, real, *, seed=0):
    """torchmetrics' KernelInceptionDistance (mean, std over subsets) of two feature sets [N, D]. Its
    subsets are drawn from torch's global generator: seeded here (and restored after), so that the same
    features give the same KID and two models of the same size are scored on the same subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, len(fake), len(real))
    with warnings.catch_warnings():  # that it keeps every feature in memory: so do we
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(feature=GivenFeatures(fake.shape[1]), subsets=KID_SUBSETS,
                                         subset_size=size).to(fake.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return mean.item(), std.item()


# --------------------------------------------------------------------------------- the instruments

@dataclass
class Instruments:
    """What scores the images: a feature space for FID / KID, a text score, the real images."""
    features: nn.Module    # uint8 images [B, 3, H, W] -> features [B, D]
    text_score: Callable   # (uint8 images [B, 3, H, W], captions) -> one score per image
    text_metric: str       # the text score's name in metrics.json: "clip_score" or "caption_accuracy"
    reference: Callable    # (width, height) -> iterator over the real images, uint8 batches [B, 3, H, W]
    description: dict      # what each one is, for metrics.json (also what --compare checks is the same)


def inception_weights(path=None):
    """The Inception-v3 weights file: `path`, or torch-fidelity's file in the torch hub cache."""
    name = INCEPTION_URL.rsplit("/", 1)[1]
    file = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / name
    if not file.is_file():
        where = f"--inception-weights {file}" if path else f"the torch hub cache, {file}"
        raise FileNotFoundError(f"FID/KID need the Inception-v3 weights and they are not in {where}: fetch "
                                f"{INCEPTION_URL} and save it as {file}" + ("" if path else
                                " (or pass --inception-weights FILE)"))
    return file


def inception(weights_file, device="cpu"):
    """torchmetrics' Inception-v3 (torch-fidelity's port of TF FID's network): pool features [B, 2048] of uint8
    images, resized to 299 x 299 inside as the original TF FID code does (antialias=False: torchmetrics' default,
    True, resizes otherwise and gives other values; its docs say so)."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(f"FID/KID's Inception needs torch-fidelity, not installed: {EXTRAS}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except (ImportError, RuntimeError) as error:  # torch-fidelity imports torchvision, which must match torch
        raise ModuleNotFoundError(f"torch-fidelity cannot be imported ({str(error).splitlines()[0][:200]}); it needs a "
                                  f"torchvision built for your torch: {EXTRAS}") from None
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(weights_file), antialias=False).to(device)


class ClipEmbeddings(nn.Module):
    """A transformers CLIPModel whose get_image_features / get_text_features return the projected embeddings
    as tensors, which torchmetrics' CLIPScore (1.9) expects: transformers 5 returns a model output with them in
    `pooler_output` (torchmetrics issue: Lightning-AI/torchmetrics pull request #3428)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # CLIPScore reads text_config.max_position_embeddings

    def get_image_features(self, pixel_values):
        return _embeddings(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask):
        return _embeddings(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _embeddings(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_loader(name_or_folder):
    """A () -> (model, CLIPProcessor) for CLIPScore: a folder, or a hub id from the HF cache (or the hub)."""
    from transformers import CLIPModel, CLIPProcessor

    if not Path(name_or_folder).is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_folder)):
        raise FileNotFoundError(f"--clip-model {name_or_folder}: no such folder, and not a hub id (org/name)")

    def load():
        try:
            return (ClipEmbeddings(CLIPModel.from_pretrained(name_or_folder)).eval(),
                    CLIPProcessor.from_pretrained(name_or_folder))
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"--clip-model {name_or_folder}: cannot load a CLIP model and processor from it "
                f"({str(error).splitlines()[0][:200]}). Download it once online (`hf download {name_or_folder}`: "
                "it is then cached, also for HF_HUB_OFFLINE=1), or pass a folder saved by save_pretrained "
                "(config.json, model.safetensors, the tokenizer files, preprocessor_config.json).") from None
    return load


def clip_score(loader, device="cpu"):
    """torchmetrics' CLIPScore as one score per image: (uint8 images, captions) -> [100 max(cos, 0)]."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=loader).to(device)

    def score(images, captions):
        scores = []
        for image, caption in zip(images, captions):
            metric.reset()
            metric.update(image[None].to(device), [caption])
            scores.append(metric.compute().item())
        return scores
    return score


def folder_images(folder, batch=32):
    """(files, (width, height) -> uint8 batches of the images in `folder`, sorted by name, center-cropped to
    width:height and resized to width x height (bicubic): the size of the generated images)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def batches(width, height):
        for start in range(0, len(files), batch):
            with warnings.catch_warnings():  # media warns about every resized image: here that is the protocol
                warnings.simplefilter("ignore")
                images = torch.cat([media.load_image01(p, width, height) for p in files[start:start + batch]])
            yield (images * 255).round().to(torch.uint8)
    return files, batches


def inception_clip_instruments(reference_images, *, inception_weights_path=None, clip_model=CLIP_MODEL,
                               device="cpu"):
    """Inception-v3 features, CLIP score and a folder of real images: the instruments of Table 1."""
    weights = inception_weights(inception_weights_path)
    files, reference = folder_images(reference_images)
    if len(files) < 2:
        raise ValueError(f"--reference-images {reference_images} holds {len(files)} images "
                         f"({'/'.join(IMAGE_SUFFIXES)}); FID needs at least 2 (the paper's kind: thousands)")
    loader = clip_loader(clip_model)
    return Instruments(inception(weights, device), clip_score(loader, device), "clip_score", reference, {
        "features": "Inception-v3 pool3 (2048), torchmetrics NoTrainInceptionV3, TF FID's resize to 299",
        "text": f"CLIP score, torchmetrics CLIPScore, {clip_model}",
        "reference": f"{len(files)} images of {Path(reference_images).resolve()}, center crop to the generated "
                     "images' aspect ratio, bicubic resize to their size"})


class ToyFeatures(nn.Module):
    """The toy's Inception: the attribute classifier's penultimate features [B, 128] of uint8 images."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.fc.out_features

    def forward(self, images):
        return self.classifier.features(images.float() / 255)


def toy_instruments(device="cpu"):
    """The toy world's instruments: classifier features, caption accuracy, real held-out images."""
    classifier = world.load_classifier().to(device)

    def caption_accuracy(images, captions):  # 1 when every attribute the caption names is seen, else 0
        return [world.caption_accuracy(image[None].float() / 255, [c], classifier)["caption"]
                for image, c in zip(images.to(device), captions)]

    def reference(width, height):
        real, _ = world.make_images(TOY_REFERENCE, seed=7, split="heldout")
        yield torch.from_numpy(real).permute(0, 3, 1, 2).contiguous()
    return Instruments(ToyFeatures(classifier), caption_accuracy, "caption_accuracy", reference, {
        "features": "toy attribute classifier's penultimate features (128), toy/instruments.py",
        "text": "caption accuracy of the toy attribute classifier (the CLIP score analogue)",
        "reference": f"{TOY_REFERENCE} real images of the held-out triples (toy.world.make_images seed 7)"})


# -------------------------------------------------------------------------------------- the images

def write_atomic(path, data: bytes):
    """Write `data` to path through a temporary file and a rename: a killed write leaves no partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_png(images01, path):
    """[N, 3, H, W] in [0, 1] side by side as one 8-bit PNG, atomically."""
    array = np.concatenate(list(media.to_uint8(images01)), axis=1)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path, frames=1):
    """A PNG of `save_png` as uint8 [frames, 3, H, W]."""
    array = torch.from_numpy(np.array(Image.open(path).convert("RGB")))  # [H, frames * W, 3]
    return array.unflatten(1, (frames, -1)).permute(1, 3, 0, 2).contiguous()


def image_file(out, k):
    return out / "images" / f"{k:06d}.png"


def strip_file(out, k):
    return out / "strips" / f"{k:06d}.png"


@dataclass
class Plan:
    """What to sample: image k with prompts[k mod P] and the first noise of seed + k; strip k with prompts[k]."""
    prompts: list
    num_images: int
    istd_prompts: int
    frames: int
    steps: int
    guidance: float
    seed: int
    batch_size: int  # images per UNet batch; blocks of this many are sampled (and resumed) together


def missing_work(out, plan):
    """(image blocks, strip blocks) with a file missing: each a range of indices sampled as one batch."""
    per = max(1, plan.batch_size // plan.frames)  # strips per batch
    images = [range(s, min(plan.num_images, s + plan.batch_size)) for s in range(0, plan.num_images, plan.batch_size)]
    strips = [range(s, min(plan.istd_prompts, s + per)) for s in range(0, plan.istd_prompts, per)]
    return ([b for b in images if not all(image_file(out, k).is_file() for k in b)],
            [b for b in strips if not all(strip_file(out, k).is_file() for k in b)])


def sample(models, schedule, uncond, latent_shape, plan, out):
    """Sample every image and strip of the plan that OUT does not hold yet (blocks of batch_size, so a resumed
    evaluation batches every image as an uninterrupted one does), with one bar over all of them."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "strips").mkdir(exist_ok=True)
    image_blocks, strip_blocks = missing_work(out, plan)
    todo = sum(map(len, image_blocks)) + plan.frames * sum(map(len, strip_blocks))
    total = plan.num_images + plan.frames * plan.istd_prompts
    dtype, device = next(models.unet.parameters()).dtype, next(models.unet.parameters()).device
    with tqdm(total=total, initial=total - todo, unit="img", desc=f"sampling {out}") as bar:
        for block in image_blocks:
            cond = models.encode_prompt([plan.prompts[k % len(plan.prompts)] for k in block])
            noises = torch.cat([noise_pair(plan.seed + k, latent_shape)[0] for k in block]).to(device, dtype)
            latents = ddim_sample(models.unet, noises, cond, uncond, steps=plan.steps, guidance=plan.guidance,
                                  schedule=schedule, progress=False)
            for k, image in zip(block, decode_latents(models.vae, latents)):
                save_png(image[None], image_file(out, k))
            bar.update(len(block))
        for block in strip_blocks:
            strips = interpolation_strips(models.unet, models.vae, models.encode_prompt,
                                          [plan.prompts[k] for k in block], latent_shape=latent_shape,
                                          frames=plan.frames, steps=plan.steps, guidance=plan.guidance,
                                          seed=plan.seed + block.start, schedule=schedule, batch=len(block),
                                          uncond=uncond, progress=False)
            for k, strip in zip(block, strips):
                save_png(strip, strip_file(out, k))
            bar.update(plan.frames * len(block))


# ------------------------------------------------------------------------------------- the numbers

@torch.no_grad()
def measure(out, plan, instruments, width, height, *, device="cpu"):
    """Every number of Table 1 from the files in OUT: ISTD per strip, features and text score per image, FID
    and KID against the reference. Writes OUT/features.safetensors (for --compare) and returns the report."""
    istd, steps = [], []
    for k in range(plan.istd_prompts):
        frames = load_png(strip_file(out, k), plan.frames).float() / 255  # ISTD of the saved 8-bit frames
        istd.append(metrics.istd(frames))
        steps.append(metrics.adjacent_distances(frames).mean().item())
    features, text = [], []
    for start in tqdm(range(0, plan.num_images, 32), desc="scoring images"):
        ks = range(start, min(plan.num_images, start + 32))
        images = torch.cat([load_png(image_file(out, k)) for k in ks])
        features.append(instruments.features(images.to(device)).double())
        text += instruments.text_score(images, [plan.prompts[k % len(plan.prompts)] for k in ks])
    reference = torch.cat([instruments.features(images.to(device)).double()
                           for images in tqdm(instruments.reference(width, height), desc="reference images")])
    generated = torch.cat(features)
    save_file({"generated": generated.cpu(), "reference": reference.cpu()}, str(out / "features.safetensors.tmp"))
    os.replace(out / "features.safetensors.tmp", out / "features.safetensors")
    kid_mean, kid_std = kid(generated, reference, seed=plan.seed)
    report = {"fid": fid(generated, reference), "kid_mean": kid_mean, "kid_std": kid_std,
              instruments.text_metric: float(np.mean(text)),
              "istd": float(np.mean(istd)) if istd else None,
              "mean_adjacent_distance": float(np.mean(steps)) if steps else None,
              "num_images": plan.num_images, "num_reference": len(reference), "istd_prompts": plan.istd_prompts,
              "frames": plan.frames, "kid_subsets": KID_SUBSETS,
              "kid_subset_size": min(KID_SUBSET_SIZE, len(generated), len(reference)),
              "instruments": instruments.description, "text_metric": instruments.text_metric,
              "prompts_sha256": prompts_sha256(plan.prompts),
              "per_prompt_istd": istd, "per_prompt_mean_adjacent_distance": steps,
              f"per_image_{instruments.text_metric}": text}
    return report


def prompts_sha256(prompts):
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def paired_bootstrap(statistic, fake_a, fake_b, real, *, replicates=100, seed=0):
    """statistic(A) - statistic(B), both against `real`, and its standard error by a paired bootstrap: each
    replicate draws n image indices with replacement (the SAME for A and B: image k of both has the same
    prompt and noise) and m reference indices, and takes the spread of the replicates' differences.
    (FID of a resample with repeats is biased upwards; only the spread of the differences is used.)"""
    if len(fake_a) != len(fake_b):
        raise ValueError(f"paired bootstrap: {len(fake_a)} and {len(fake_b)} images; pairs need equal counts")
    g = torch.Generator().manual_seed(seed)
    differences = []
    for _ in tqdm(range(replicates), desc="paired bootstrap", leave=False):
        i = torch.randint(len(fake_a), (len(fake_a),), generator=g).to(fake_a.device)
        r = torch.randint(len(real), (len(real),), generator=g).to(real.device)
        differences.append(statistic(fake_a[i], real[r]) - statistic(fake_b[i], real[r]))
    a, b = statistic(fake_a, real), statistic(fake_b, real)
    return {"mean": a - b, "se": float(np.std(differences, ddof=1)) if replicates > 1 else None,
            "n": len(fake_a), "relative": (a - b) / b if b else None, "replicates": replicates}


def compare(out, other, *, replicates=100, seed=0, device="cpu"):
    """The paired differences of the evaluation in `out` minus the one in `other` (same prompts, seeds, counts
    and instruments): ISTD per prompt, the text score per image, FID and KID by the paired bootstrap."""
    a, b = (json.loads((Path(p) / "metrics.json").read_text()) for p in (out, other))
    fa, fb = (load_file(str(Path(p) / "features.safetensors")) for p in (out, other))
    name = a["text_metric"]
    result = {"other": str(other), name: paired_difference(a[f"per_image_{name}"], b[f"per_image_{name}"])}
    if a["istd_prompts"] >= 2:
        for key in ("istd", "mean_adjacent_distance"):
            result[key] = paired_difference(a[f"per_prompt_{key}"], b[f"per_prompt_{key}"])
    real = fa["reference"].to(device)
    result["fid"] = paired_bootstrap(fid, fa["generated"].to(device), fb["generated"].to(device), real,
                                     replicates=replicates, seed=seed)
    result["kid"] = paired_bootstrap(lambda x, y: kid(x, y, seed=seed)[0], fa["generated"].to(device),
                                     fb["generated"].to(device), real, replicates=replicates, seed=seed)
    return result


def check_pairs(metrics_a, metrics_b, other):
    """Refuse to pair two evaluations whose images are not pairs (or were scored by other instruments)."""
    for key in PAIRING:
        if metrics_a.get(key) != metrics_b.get(key):
            raise Refused(f"--compare {other}: its {key} is {metrics_b.get(key)!r}, this evaluation's is "
                             f"{metrics_a.get(key)!r}; paired differences need the same prompts, seed, image and "
                             "strip counts, size and instruments")


# ------------------------------------------------------------------------------------------ output

LABELS = {"istd": "ISTD", "mean_adjacent_distance": "mean step", "fid": "FID", "kid": "KID",
          "clip_score": "CLIP score", "caption_accuracy": "caption accuracy"}


def summary_line(report, out):
    """The one line printed for an evaluation."""
    istd = f"ISTD {report['istd']:.4f} ({report['istd_prompts']} prompts)" if report["istd"] is not None else "no ISTD"
    return (f"{istd}; FID {report['fid']:.2f}, KID {report['kid_mean']:.3g} +- {report['kid_std']:.2g} "
            f"({report['num_images']} images vs {report['num_reference']} real); {LABELS[report['text_metric']]} "
            f"{report[report['text_metric']]:.4g}: {out / 'metrics.json'}")


def compare_line(result, text_metric):
    """The one line printed for a paired comparison: each difference, +- its standard error (relative)."""
    parts = []
    for key in ("istd", "mean_adjacent_distance", "fid", "kid", text_metric):
        if key in result:
            d = result[key]
            se = f" +- {d['se']:.2g}" if d["se"] is not None else ""
            relative = f" ({100 * d['relative']:+.0f}%)" if d["relative"] is not None else ""
            parts.append(f"{LABELS[key]} {d['mean']:+.3g}{se}{relative}")
    return (f"paired vs {result['other']} ({result['fid']['n']} images, {result['fid']['replicates']} bootstrap "
            "replicates for FID/KID): " + "; ".join(parts))


# ------------------------------------------------------------------------------ the CLI command

def is_toy(model):
    return Path(model).resolve() == world.MODEL_DIR.resolve()


def prepare(args):
    """Check the evaluate command's options and load its instruments before any model is loaded: fills in the
    toy's defaults, args.prompts, args.num_images, args.istd_prompts, args.batch_size and args.instruments.
    Raises ValueError / FileNotFoundError / ModuleNotFoundError with the one line to print."""
    require_extras()
    toy_world = is_toy(args.model)
    if toy_world:
        given = [f"--{n.replace('_', '-')}" for n in ("reference_images", "inception_weights", "clip_model")
                 if getattr(args, n)]
        if given:
            raise ValueError(f"the toy model is scored with the toy's own instruments: drop {', '.join(given)}")
        args.prompts = args.prompts if args.prompts_file else world.heldout_prompts()
    elif not args.prompts_file or not args.reference_images:
        raise ValueError("evaluate needs --prompts-file (one caption per line) and --reference-images (a folder "
                         "of real images) for a model other than the toy's; see docs/evaluate.md")
    elif not Path(args.reference_images).is_dir():
        raise FileNotFoundError(f"--reference-images {args.reference_images} is not a folder")
    args.num_images = args.num_images or (TOY_IMAGES if toy_world else len(args.prompts))
    args.istd_prompts = min(ISTD_PROMPTS, len(args.prompts)) if args.istd_prompts is None else args.istd_prompts
    args.batch_size = args.batch_size or (32 if toy_world else 8)
    if args.num_images < 2:
        raise ValueError("--num-images must be at least 2: FID and KID compare two sets of images")
    if args.istd_prompts > len(args.prompts):
        raise ValueError(f"--istd-prompts {args.istd_prompts}: there are only {len(args.prompts)} prompts")
    if args.compare_base and not args.lora:
        raise ValueError("--compare-base compares with and without --lora; pass --lora FILE")
    if args.compare and args.compare_base:
        raise ValueError("pass --compare OTHER_OUT or --compare-base, not both")
    if args.compare:
        files = [Path(args.compare) / name for name in ("metrics.json", "features.safetensors")]
        if not all(f.is_file() for f in files):
            raise FileNotFoundError(f"--compare {args.compare}: no finished evaluation there (it needs "
                                    f"{' and '.join(f.name for f in files)}, written by `sampler.py evaluate`)")
        other = json.loads(files[0].read_text())
        mine = {"prompts_sha256": prompts_sha256(args.prompts), "seed": args.seed, "num_images": args.num_images,
                "istd_prompts": args.istd_prompts, "frames": args.frames}
        check_pairs(mine, {k: other.get(k) for k in mine}, args.compare)
    if toy_world:
        args.instruments = toy_instruments(args.device)
    else:
        args.instruments = inception_clip_instruments(args.reference_images, device=args.device,
                                                      inception_weights_path=args.inception_weights,
                                                      clip_model=args.clip_model or CLIP_MODEL)


def claim(out, settings):
    """Write OUT/settings.json, or refuse an OUT whose images were made with other settings."""
    file = out / "settings.json"
    if file.is_file():
        old = json.loads(file.read_text())
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise Refused(f"{out} holds images sampled with other settings ({'; '.join(changed)}): pass another "
                             "--out, or delete it to start again")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(file, json.dumps(settings, indent=2).encode())


def run(args, s):
    """`sampler.py evaluate`: sample (or reuse) the images, measure them, write OUT/metrics.json; with
    --compare-base the same for the base model in OUT/base; then the paired differences."""
    plan = Plan(args.prompts, args.num_images, args.istd_prompts, args.frames, args.steps, args.guidance,
                args.seed, args.batch_size)
    evaluations = [(s.out, args.lora)] + [(s.out / "base", None)] * args.compare_base
    for out, lora_file in evaluations:
        if args.lora:
            lora.set_lora_scale(s.models.unet, 1.0 if lora_file else 0.0)
        # what makes the images in OUT what they are: a second call with other values must not reuse them
        settings = {"model": args.model, "lora": lora_file, "steps": args.steps, "guidance": args.guidance,
                    "seed": args.seed, "negative_prompt": args.negative_prompt, "width": s.width,
                    "height": s.height, "dtype": args.dtype, "frames": args.frames}
        claim(out, settings)
        sample(s.models, s.schedule, s.uncond, s.latent_shape, plan, out)
        report = {"command": "evaluate", **settings, "prompts_file": args.prompts_file,
                  **measure(out, plan, args.instruments, s.width, s.height, device=args.device)}
        write_atomic(out / "metrics.json", json.dumps(report, indent=2).encode())
        print(summary_line(report, out))
    other = args.compare or (s.out / "base" if args.compare_base else None)
    if other:
        report = json.loads((s.out / "metrics.json").read_text())
        check_pairs(report, json.loads((Path(other) / "metrics.json").read_text()), other)
        report["compare"] = compare(s.out, other, replicates=args.bootstrap, seed=args.seed, device=args.device)
        write_atomic(s.out / "metrics.json", json.dumps(report, indent=2).encode())
        print(compare_line(report["compare"], report["text_metric"]))
    return [s.out / "metrics.json"], {}
