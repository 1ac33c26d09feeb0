"""The demo CLI of sampler.py: `python sampler.py COMMAND [options]` (sampler.py hands over to `main`;
`python -m demos COMMAND` is the same).

Commands: generate (images from seeds), interpolate (a noise walk through keyframes, or two real
images, Fig. 3), invert (reconstruction metrics, Table 2), edit (Eq. 15), istd (Sec. 4.1), evaluate
(Table 1: ISTD, FID, KID, CLIP score; demos/evaluate.py), drag (DragDiffusion, drag.py; Sec. 4.4). With no
arguments: the toy interpolation demo (`interpolate` with every default, with the Smooth-LoRA of
`make run` when it exists). `--model` takes a local diffusers folder, a single-file checkpoint, or
a Hugging Face repo id (`checkpoint.resolve_model`). `python sampler.py COMMAND --help` lists every
option with its default. Bad input ends in `sampler.py: error: ...` and a non-zero exit.
"""
import argparse
import json
import math
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

import checkpoint
import data
import drag
import lora
import metrics
from sampler import (Schedule, ddim_invert, ddim_sample, decode_latents, edit, encode_images, evaluate_istd,
                     interpolate, interpolate_vae, make_schedule, noise_pair, null_text_invert)

from demos import evaluate, media

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "assets" / "toy-sd"  # built by `python -m toy pretrain`
DEMO_LORA = ROOT / "runs" / "toy" / "smooth_lora.safetensors"  # written by `python train.py`
DEMO_PROMPT = "a large red circle on a white background"  # a caption of the toy world
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONE_STRIP_NOTE = "ISTD of this one strip; not a measurement: see README / train.py's paired report"
WALK_NOTE = "mean ISTD of this walk's segments; not a measurement: see README / train.py's paired report"


def fail(message):
    raise SystemExit(f"sampler.py: error: {message}")


# ------------------------------------------------------------------------------------------- parser

def _number(kind, low, high=None, message=None):
    """An argparse type: `kind` (int or float), finite, in [low, high]; a value outside gets `message` or the
    range."""
    message = message or (f"must be in [{low}, {high}]" if high is not None else
                          f"must be {'an integer ' if kind is int else ''}>= {low}")

    def parse(text):
        value = kind(text)  # a ValueError here becomes argparse's "invalid int value"
        if not (math.isfinite(value) and low <= value and (high is None or value <= high)):  # NaN, inf too
            raise argparse.ArgumentTypeError(f"{message}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE = _number(int, 1)
# Upper ends far beyond any use (a typo, not a plan: the paper uses 11 frames, CFG 7.5, 512 px); seeds are torch's.
FRAMES = _number(int, 2, 10_000, message="need at least 2 frames to interpolate, and at most 10000")
COUNT = _number(int, 1, 10_000)
PIXELS = _number(int, 1, 8192)
SEED = _number(int, 0, 2**64 - 1)


def _parents():
    """The option groups shared by several commands: (common, size, sampling, inversion, animation)."""
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--model", default=str(DEMO_MODEL), help="diffusers folder, single-file checkpoint or Hugging Face repo id "
        "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5; cached, works offline once downloaded); "
        "default: the toy model, assets/toy-sd")
    add("--tokenizer", default=None, help="tokenizer folder (vocab.json + merges.txt) for single-file checkpoints "
        "(default: the model's own)")
    add("--config", default=None, help="diffusers folder whose configs describe a single-file checkpoint "
        "(default: SD-1.5's)")
    add("--lora", default=None, help="Smooth Diffusion LoRA (.safetensors or .bin) for the UNet (default: none)")
    add("--prompt", default=DEMO_PROMPT, help="the prompt (for images: their caption); default %(default)r")
    add("--negative-prompt", default="", help="CFG's unconditional prompt (Eq. 5); default %(default)r")
    add("--steps", type=POSITIVE, default=50, help="DDIM steps (paper: %(default)s)")
    add("--guidance", type=_number(float, 0, 100), default=7.5, help="CFG scale w of Eq. 5 (paper: %(default)s)")
    add("--seed", type=SEED, default=0, help="seed of the initial noise (default: %(default)s)")
    add("--out", default=None, help="output folder (default: out/COMMAND)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)")
    size = argparse.ArgumentParser(add_help=False)
    for side in ("width", "height"):
        size.add_argument(f"--{side}", type=PIXELS, default=None,
                          help=f"image {side} in pixels, a multiple of the model's (printed if wrong); "
                               "default: the model's native size (512 for SD-1.5)")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--dtype", choices=DTYPES, default="fp32",
                          help="precision of the models (fp16 needs a GPU); default %(default)s")
    inversion = argparse.ArgumentParser(add_help=False)
    inversion.add_argument("--inversion", choices=("nti", "ddim"), default="nti",
                           help="null-text inversion or plain DDIM inversion (default: %(default)s)")
    inversion.add_argument("--inner-steps", type=POSITIVE, default=10,
                           help="null-text inversion: Adam steps per timestep (paper: %(default)s)")
    animation = argparse.ArgumentParser(add_help=False)
    animation.add_argument("--fps", type=_number(float, 0.1, 1000), default=10.0,
                           help="frames per second of the animation (default: %(default)s)")
    animation.add_argument("--video", choices=("gif", "mp4"), default="gif",
                           help="animation format; mp4 needs an ffmpeg executable on PATH (default: %(default)s)")
    animation.add_argument("--save-frames", action="store_true",
                           help="also write every frame as frames/frame-NNNN.png (default: off)")
    return common, size, sampling, inversion, animation


def build_parser():
    common, size, sampling, inversion, animation = _parents()
    parser = argparse.ArgumentParser(prog="sampler.py", description="Smooth Diffusion sampler. With no "
                                     "arguments: the toy interpolation demo (`interpolate` with every default).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", parents=[common, size, sampling], help="sample images from seeds")
    p.add_argument("--num-images", type=COUNT, default=1,
                   help="images of seeds SEED..SEED+N-1 (default: %(default)s)")
    p.add_argument("--eta", type=_number(float, 0, 1), default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=POSITIVE, default=4, help="images per UNet batch (default: %(default)s)")
    p = sub.add_parser("interpolate", parents=[common, size, sampling, inversion, animation],
                       help="a walk through noise keyframes (--seed's pair, or --seeds), or between two real "
                            "images (--image-a/--image-b); writes a PNG sheet and an animation")
    p.add_argument("--frames", type=FRAMES, default=11, help="frames per segment, mix ratios 0..1 (paper: %(default)s)")
    p.add_argument("--seeds", type=SEED, nargs="+", default=None, metavar="SEED",
                   help="keyframe noises, the first noise of each seed (as `generate --seed`); default: the "
                        "two noises of --seed")
    p.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                   help="one prompt per keyframe, lerped along each segment (default: --prompt everywhere)")
    p.add_argument("--prompt-b", default=None, help="the last keyframe's prompt, or the caption of --image-b "
                   "(default: --prompt)")
    p.add_argument("--image-a", default=None, help="first real image (needs --image-b; default: none)")
    p.add_argument("--image-b", default=None, help="second real image (default: none)")
    p.add_argument("--compare-base", action="store_true",
                   help="with --lora: also render the same walk without the LoRA (*_base.*; default: off)")
    p.add_argument("--batch-size", type=POSITIVE, default=1,
                   help="frames per UNet batch; 1 makes each frame equal a lone sample bit for bit "
                        "(default: %(default)s)")
    p = sub.add_parser("invert", parents=[common, size, inversion],
                       help="invert --image and reconstruct it; writes input | reconstruction and MSE/PSNR/SSIM"
                            " (and LPIPS with --lpips-weights)")
    p.add_argument("--image", required=True, help="the image to invert")
    p.add_argument("--lpips-weights", nargs="+", default=None, metavar="FILE",
                   help="report LPIPS too (metrics.py): torchvision's alexnet (or vgg16) ImageNet weights "
                        "and the lpips package's weights/v0.1/alex.pth (or vgg.pth), in any order; "
                        "nothing is downloaded (default: LPIPS skipped)")
    p = sub.add_parser("edit", parents=[common, size, inversion],
                       help="edit --image from --prompt to --target-prompt by Eq. 15; "
                            "writes source | reconstruction | edit")
    p.add_argument("--image", required=True, help="the image to edit (--prompt is its caption)")
    p.add_argument("--target-prompt", required=True, help="the edited caption")
    p.add_argument("--r", type=_number(float, 0, 1), default=0.8,
                   help="Eq. 15 switch point: the target prompt for t <= T*r (paper: 0.6-0.9; default %(default)s)")
    p = sub.add_parser("istd", parents=[common, size, sampling], help="ISTD over the prompts of --prompts-file "
                       "(Sec. 4.1)")
    p.add_argument("--prompts-file", required=True, help="text file, one prompt per line")
    p.add_argument("--frames", type=FRAMES, default=11, help="frames per prompt (paper: %(default)s)")
    p.add_argument("--batch-size", type=POSITIVE, default=12, help="strips per UNet batch (default: %(default)s)")
    p = sub.add_parser("evaluate", parents=[common, size, sampling], help="Table 1: ISTD, FID, KID and CLIP score, "
                       "images kept in --out (docs/evaluate.md); the toy model: the toy's own instruments")
    add = p.add_argument
    add("--prompts-file", default=None, help="captions, one per line (default for the toy: its 24 held-out prompts)")
    add("--reference-images", default=None, help="folder of real images for FID/KID (default: none "
        "with --model; the toy: 1000 real held-out images)")
    add("--num-images", type=POSITIVE, default=None, help="image k: prompt k mod P, the noise of `generate --seed "
        "SEED+k` (default: one per prompt; the toy: 240)")
    add("--istd-prompts", type=_number(int, 0), default=None, help="ISTD strips, on the first N prompts (paper and "
        "default: 500, or every prompt if fewer; 0: none)")
    add("--frames", type=FRAMES, default=11, help="frames per ISTD strip (paper: %(default)s)")
    add("--batch-size", type=POSITIVE, default=None, help="images per UNet batch (default: 8; the toy: 32)")
    add("--inception-weights", default=None, help="Inception-v3 weights file for FID/KID (default: torch-fidelity's "
        "file in the torch hub cache)")
    add("--clip-model", default=None, help="CLIP for the CLIP score: a hub id (cached) or a folder (default: "
        "openai/clip-vit-large-patch14)")
    add("--compare", default=None, metavar="OTHER_OUT", help="paired differences against another evaluation's --out "
        "(default: none)")
    add("--compare-base", action="store_true", help="with --lora: also evaluate the model without it (in OUT/base) "
        "and compare (default: off)")
    add("--bootstrap", type=_number(int, 0), default=100, help="paired bootstrap replicates for FID/KID differences "
        "(default: %(default)s)")
    # Fresh copies of the shared options: argparse's parents share their actions, and drag's guidance default
    # (1, DragDiffusion's) set on shared ones would become every command's.
    p = sub.add_parser("drag", parents=list(_parents()[:3]),
                       help="drag editing (DragDiffusion, drag.py): move the content at each handle point to its "
                            "target; writes the edit, source | edit with the drags drawn, and the final handles")
    p.add_argument("--image", required=True, help="the image to edit (--prompt is its caption)")
    p.add_argument("--points", type=_drag_points, nargs="+", required=True, metavar="HX,HY:TX,TY",
                   help="a handle and its target in pixels of the image as the model sees it (--width x --height; "
                        "another size is center-cropped and resized to it); several pairs drag together")
    p.add_argument("--mask", default=None, help="image of the same size as --image, white where the image may "
                   "change (DragDiffusion's mask term outside it); default: no mask")
    defaults = drag.DragConfig()
    p.add_argument("--lora-steps", type=_number(int, 0, 100_000), default=defaults.lora_steps,
                   help="identity LoRA steps on the image (paper: %(default)s)")
    p.add_argument("--inversion-strength", type=_number(float, 0.01, 1), default=defaults.inversion_strength,
                   help="invert this fraction of the steps; the drag acts there (paper: %(default)s)")
    p.add_argument("--lam", type=_number(float, 0, 1e6), default=defaults.lam,
                   help="weight of the mask term (paper: %(default)s)")
    p.set_defaults(guidance=1.0)
    return parser


def _drag_points(text):
    """An argparse type: "HX,HY:TX,TY" -> ((hx, hy), (tx, ty)) in pixels."""
    try:
        handle, target = ([float(v) for v in point.split(",")] for point in text.split(":"))
        if len(handle) != 2 or len(target) != 2:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"a drag is HX,HY:TX,TY (handle and target in pixels, e.g. "
                                         f"12,16:20,16), got {text!r}") from None
    return tuple(handle), tuple(target)


# ------------------------------------------------------------------------------ checks and loading

def _check_inputs(args):
    """Refuse missing or unreadable files and contradictory options before any model is loaded."""
    for name in ("image", "image_a", "image_b", "prompts_file", "lora", "mask"):
        if getattr(args, name, None) and not Path(getattr(args, name)).is_file():
            fail(f"--{name.replace('_', '-')} not found: {getattr(args, name)}")
    for name in ("image", "image_a", "image_b", "mask"):
        if getattr(args, name, None):
            try:
                data.read_image(getattr(args, name))
            except ValueError as error:
                fail(f"--{name.replace('_', '-')}: {error}")
    if getattr(args, "prompts_file", None):
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            fail(f"--prompts-file {args.prompts_file} is not UTF-8 text ({error}); write one prompt per line")
        args.prompts = [line.strip() for line in lines if line.strip()]
        if not args.prompts:
            fail(f"{args.prompts_file} has no prompts; write one prompt per line")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device} is not a torch device; use e.g. cpu, cuda or cuda:1")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    if getattr(args, "dtype", "fp32") == "fp16" and device.type != "cuda":
        fail(f"--dtype fp16 needs a GPU (--device {args.device}: CPU kernels lack fp16); use fp32 or bf16")
    if getattr(args, "video", None) == "mp4" and shutil.which("ffmpeg") is None:
        fail(media.ffmpeg_missing_message())
    if args.command == "interpolate":
        _check_interpolate(args)
    if args.command == "evaluate":  # before the models: bad options, weights or extras fail at once
        try:
            evaluate.prepare(args)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
            fail(error)
    if args.command == "drag":
        _check_drag(args)


def _check_interpolate(args):
    if (args.image_a is None) != (args.image_b is None):
        fail("real-image interpolation needs both --image-a and --image-b")
    if args.compare_base and not args.lora:
        fail("--compare-base compares with and without --lora; pass --lora FILE")
    if args.image_a and (args.seeds or args.prompts):
        fail("--seeds/--prompts make a noise walk; real-image interpolation takes --prompt and --prompt-b")
    if args.image_a and args.dtype != "fp32":
        fail("real-image interpolation inverts the images, which runs in fp32: drop --dtype")
    keyframes = len(args.seeds) if args.seeds else 2
    if args.seeds and len(args.seeds) < 2:
        fail("--seeds needs at least 2 keyframe seeds")
    if args.prompts and len(args.prompts) != keyframes:
        fail(f"--prompts gives {len(args.prompts)} prompts for {keyframes} keyframes: pass one per keyframe")
    if args.prompts and args.prompt_b:
        fail("--prompt-b is the last keyframe's prompt; with --prompts, put it last there instead")


def _check_points(points, width, height):
    for (hx, hy), (tx, ty) in points:
        if not all(0 <= x <= width - 1 and 0 <= y <= height - 1 for x, y in ((hx, hy), (tx, ty))):
            fail(f"--points {hx:g},{hy:g}:{tx:g},{ty:g} leaves the {width}x{height} image: x must be in "
                 f"[0, {width - 1}] and y in [0, {height - 1}]")


def _check_drag(args):
    if args.guidance != 1:
        fail(f"--guidance {args.guidance}: drag inverts and denoises with guidance 1 (DragDiffusion's); drop --guidance")
    if args.mask:
        image_size, mask_size = data.read_image(args.image).size, data.read_image(args.mask).size
        if image_size != mask_size:
            fail(f"--mask is {mask_size[0]}x{mask_size[1]} but --image is {image_size[0]}x{image_size[1]}; "
                 "paint the mask on the image itself")


@dataclass
class Loaded:
    """What every command works with: the models, their schedule and geometry, the prompts' embeddings."""
    models: checkpoint.Models
    schedule: Schedule
    width: int            # image size in pixels
    height: int
    latent_shape: tuple   # (C, h, w) of one latent
    cond: torch.Tensor    # --prompt, [1, 77, D]
    uncond: torch.Tensor  # --negative-prompt, [1, 77, D]
    dtype: torch.dtype
    out: Path


def _load_models(args):
    if args.model == str(DEMO_MODEL) and not (DEMO_MODEL / "model_index.json").exists():
        fail(f"the toy model is not built yet ({DEMO_MODEL} has no model_index.json). "
             "Build it with `python -m toy pretrain` (CPU, ~40 min), or pass --model PATH.")
    try:  # a wrong checkpoint, tokenizer or hub id is the user's input: say what is wrong, no traceback
        models = checkpoint.load_models(checkpoint.resolve_model(args.model), tokenizer=args.tokenizer,
                                        device=args.device, dtype=DTYPES[getattr(args, "dtype", "fp32")],
                                        config=args.config)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    if args.lora:
        try:
            lora.load_lora(models.unet, args.lora)
        except (ValueError, RuntimeError, OSError, pickle.UnpicklingError, SafetensorError) as error:
            fail(f"--lora {args.lora}: cannot load it ({str(error).splitlines()[0][:300]}); pass a LoRA file "
                 "written by train.py, or an official/peft/kohya LoRA in .safetensors or .bin")
    return models


def _geometry(args, models):
    """(width, height, latent shape) for --width/--height, checked against what the model can take."""
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)  # 8 for SD-1.5
    multiple = factor * 2 ** (len(models.unet.config.block_out_channels) - 1)  # 64 for SD-1.5
    native = models.unet.config.sample_size * factor
    width, height = args.width or native, args.height or native
    for name, value in (("width", width), ("height", height)):
        if value % multiple:
            fail(f"--{name} {value} must be a multiple of {multiple} for this model (VAE factor {factor} x UNet "
                 f"downsampling {multiple // factor}); its native size is {native}")
    return width, height, (models.unet.config.in_channels, height // factor, width // factor)


def _schedule(args, models):
    """The model's schedule, which bounds --steps."""
    schedule = make_schedule(models.scheduler_config)
    if args.steps > schedule.num_train_timesteps:
        fail(f"--steps {args.steps}: this model's scheduler has {schedule.num_train_timesteps} timesteps; "
             f"use 1 to {schedule.num_train_timesteps}")
    return schedule


def _load(args):
    """Models, schedule, geometry and prompt embeddings for a CLI command; creates the output folder."""
    models = _load_models(args)
    schedule = _schedule(args, models)
    width, height, latent_shape = _geometry(args, models)
    if args.command == "drag":
        _check_points(args.points, width, height)
    out = Path(args.out or Path("out") / args.command)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"--out {out}: cannot create the output folder ({error})")
    return Loaded(models, schedule, width, height, latent_shape, models.encode_prompt([args.prompt]),
                  models.encode_prompt([args.negative_prompt]), next(models.unet.parameters()).dtype, out)


# ----------------------------------------------------------------------------------------- commands
# Each command: (args, Loaded) -> (files written, report for metrics.json).

def invert_images(args, s, latents, cond):
    """(x_T, per-step nulls or the fixed negative embedding); a batch of images shares the nulls (dual NTI)."""
    if args.inversion == "ddim":
        return ddim_invert(s.models.unet, latents, cond, steps=args.steps, schedule=s.schedule), s.uncond
    return null_text_invert(s.models.unet, latents, cond, s.uncond, steps=args.steps, guidance=args.guidance,
                            inner_steps=args.inner_steps, schedule=s.schedule)


def _scores(x, y, lpips_model=None):
    scores = {"mse": metrics.mse(x, y).item(), "psnr": metrics.psnr(x, y).item(), "ssim": metrics.ssim(x, y).item()}
    if lpips_model is not None:
        scores["lpips"] = metrics.lpips(lpips_model, x, y).item()
    return scores


def run_generate(args, s):
    seeds = range(args.seed, args.seed + args.num_images)
    noises = torch.cat([noise_pair(seed, s.latent_shape)[0] for seed in seeds]).to(args.device, s.dtype)
    eta_noise = torch.Generator().manual_seed(args.seed)  # eta > 0: the fresh noise of every step
    images = torch.cat([decode_latents(s.models.vae, ddim_sample(
        s.models.unet, batch, s.cond, s.uncond, steps=args.steps, guidance=args.guidance, eta=args.eta,
        schedule=s.schedule, generator=eta_noise)) for batch in noises.split(args.batch_size)])
    written = [media.save_strip(images, s.out / "sample.png")]
    if args.num_images > 1:
        written += [media.save_strip(image[None], s.out / f"sample-{seed}.png") for seed, image in zip(seeds, images)]
    return written, {}


def _noise_walk(args, s):
    """The frames of a walk through the keyframes, [(k-1) * (frames-1) + 1, 3, H, W]: segment i slerps
    keyframe i's noise to keyframe i+1's and lerps their prompts; keyframe j is frame j * (frames - 1)."""
    if args.seeds:  # keyframe j is the image of `generate --seed SEEDS[j] --prompt PROMPTS[j]`
        noises = [noise_pair(seed, s.latent_shape)[0] for seed in args.seeds]
    else:
        noises = list(noise_pair(args.seed, s.latent_shape))
    prompts = args.prompts or [args.prompt] * (len(noises) - 1) + [args.prompt_b or args.prompt]
    conds = [s.models.encode_prompt([p]) for p in prompts]
    segments = [interpolate(s.models.unet, s.models.vae, noises[i].to(args.device, s.dtype),
                            noises[i + 1].to(args.device, s.dtype), cond_a=conds[i], cond_b=conds[i + 1],
                            uncond_a=s.uncond, frames=args.frames, steps=args.steps, guidance=args.guidance,
                            schedule=s.schedule, batch_size=args.batch_size)
                for i in range(len(noises) - 1)]
    return torch.cat([segments[0]] + [segment[1:] for segment in segments[1:]])


def _image_walk(args, s, images_a, images_b):
    """Fig. 3: invert both images (one batch: NTI shares one null per step, the dual form), slerp x_T,
    lerp the prompts and nulls."""
    cond_b = s.models.encode_prompt([args.prompt_b or args.prompt])
    latents = encode_images(s.models.vae, torch.cat([images_a, images_b]))
    x_T, nulls = invert_images(args, s, latents, torch.cat([s.cond, cond_b]))
    return interpolate(s.models.unet, s.models.vae, x_T[:1], x_T[1:], cond_a=s.cond, cond_b=cond_b, uncond_a=nulls,
                       frames=args.frames, steps=args.steps, guidance=args.guidance, schedule=s.schedule,
                       batch_size=args.batch_size)


def _save_walk(args, frames, out, suffix):
    """The sheet (one row per segment), the animation and, with --save-frames, every frame."""
    segments = (len(frames) - 1) // (args.frames - 1)
    rows = [frames[i * (args.frames - 1): (i + 1) * (args.frames - 1) + 1] for i in range(segments)]
    written = [media.save_strip(torch.cat(rows), out / f"interpolation{suffix}.png", columns=args.frames),
               media.save_animation(frames, out / f"interpolation{suffix}.{args.video}", fps=args.fps)]
    if args.save_frames:
        written.append(media.save_frames(frames, out / f"frames{suffix}"))
    return written


def run_interpolate(args, s):
    unet, written, report = s.models.unet, [], {}
    if args.image_a:  # the VAE-space baseline of Fig. 3
        images_a, images_b = (media.load_image01(p, s.width, s.height).to(args.device)
                              for p in (args.image_a, args.image_b))
        baseline = interpolate_vae(s.models.vae, images_a, images_b, frames=args.frames)
        written.append(media.save_strip(baseline, s.out / "vae_interpolation.png"))
        report["vae_interpolation_istd"] = metrics.istd(baseline)
    # With --compare-base, the same walk again with the LoRA switched off: Stable vs Smooth Diffusion.
    walks = {}
    for suffix, lora_scale in [("", 1.0)] + [("_base", 0.0)] * args.compare_base:
        if args.lora:
            lora.set_lora_scale(unet, lora_scale)
        frames = _image_walk(args, s, images_a, images_b) if args.image_a else _noise_walk(args, s)
        written += _save_walk(args, frames, s.out, suffix)
        strips = frames.unfold(0, args.frames, args.frames - 1).permute(0, 4, 1, 2, 3)  # [segments, frames, 3, H, W]
        report[f"istd{suffix}"] = sum(metrics.istd(strip) for strip in strips) / len(strips)
        report[f"mean_adjacent_distance{suffix}"] = metrics.adjacent_distances(frames).mean().item()
        walks[suffix] = frames.cpu()
    report["istd_note"] = ONE_STRIP_NOTE if len(strips) == 1 else WALK_NOTE
    if args.compare_base:  # one figure and one animation: Stable Diffusion above the Smooth-LoRA
        rows = [(f"LoRA off (base)\nISTD {report['istd_base']:.3f}", walks["_base"]),
                (f"Smooth-LoRA\nISTD {report['istd']:.3f}", walks[""])]
        scale = max(1, 128 // s.height)  # small frames (the toy's 32 px) enlarged, nearest neighbour
        written += [media.save_comparison(rows, s.out / "interpolation_compare.png", scale=scale),
                    media.save_comparison_animation(rows, s.out / f"interpolation_compare.{args.video}",
                                                    scale=scale, fps=args.fps)]
    return written, report


def _reconstruct(args, s):
    """(image, its latents, x_T, nulls, the reconstruction) of --image."""
    image = media.load_image01(args.image, s.width, s.height).to(args.device)
    latents = encode_images(s.models.vae, image)
    x_T, nulls = invert_images(args, s, latents, s.cond)
    recon = ddim_sample(s.models.unet, x_T, s.cond, nulls, steps=args.steps, guidance=args.guidance,
                        schedule=s.schedule)
    return image, latents, x_T, nulls, decode_latents(s.models.vae, recon)


def run_invert(args, s):
    image, latents, _, _, recon = _reconstruct(args, s)
    vae_recon = decode_latents(s.models.vae, latents)
    report = {"inversion": args.inversion, "reconstruction": _scores(recon, image, args.lpips_model),
              "vae_reconstruction": _scores(vae_recon, image, args.lpips_model),
              "lpips_net": args.lpips_model.net if args.lpips_model else
              "skipped: pass --lpips-weights (LPIPS needs ImageNet weights, which are not shipped)"}
    return [media.save_strip(torch.cat([image, recon]), s.out / "reconstruction.png")], report


def run_edit(args, s):
    image, _, x_T, nulls, recon = _reconstruct(args, s)
    edited = edit(s.models.unet, x_T, nulls, s.cond, s.models.encode_prompt([args.target_prompt]), r=args.r,
                  steps=args.steps, guidance=args.guidance, schedule=s.schedule)
    edited = decode_latents(s.models.vae, edited)
    return [media.save_strip(torch.cat([image, recon, edited]), s.out / "edit.png")], {}


def run_istd(args, s):
    report = evaluate_istd(s.models.unet, s.models.vae, s.models.encode_prompt, args.prompts,
                           latent_shape=s.latent_shape, frames=args.frames, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, schedule=s.schedule, batch=args.batch_size, uncond=s.uncond)
    print("\n".join(f"{v:10.4f}  {p}" for p, v in zip(args.prompts, report["per_prompt_istd"])))
    return [], report


def run_evaluate(args, s):
    try:
        return evaluate.run(args, s)
    except evaluate.Refused as error:  # an OUT of other settings, a --compare that does not pair
        fail(error)


def run_drag(args, s):
    image = media.load_image01(args.image, s.width, s.height).to(args.device)
    mask = None
    if args.mask:
        mask = (media.load_image01(args.mask, s.width, s.height).mean(1, keepdim=True) > 0.5).float().to(args.device)
    handles, targets = [list(p) for p in zip(*args.points)]
    cfg = drag.DragConfig(lora_steps=args.lora_steps, steps=args.steps, inversion_strength=args.inversion_strength,
                          lam=args.lam)
    result = drag.drag(s.models.unet, s.models.vae, image, s.cond, handles, targets, mask, cfg=cfg,
                       schedule=s.schedule, seed=args.seed)
    scale = max(1, 256 // max(s.width, s.height))  # small images are enlarged to show the arrows
    pictures = [media.draw_drags(image[0], handles, targets, scale=scale),
                media.draw_drags(result.image[0], result.handles, targets, scale=scale)]
    written = [media.save_strip(result.image, s.out / "drag.png"),
               media.side_by_side(pictures, s.out / "drag_side_by_side.png")]
    report = {"handles": handles, "targets": targets, "final_handles": result.handles,
              "latent_steps": result.iterations, "mask": args.mask, "lora_steps": args.lora_steps,
              "inversion_strength": args.inversion_strength, "lam": args.lam,
              "final_handles_note": "point tracking's last estimate (pixels), as DragDiffusion reports it"}
    return written, report


COMMANDS = {"generate": run_generate, "interpolate": run_interpolate, "invert": run_invert, "edit": run_edit,
            "istd": run_istd, "evaluate": run_evaluate,
            "drag": run_drag}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = not argv
    if demo:  # the toy interpolation demo, with the Smooth LoRA once `make run` has trained it
        argv = ["interpolate"] + (["--lora", str(DEMO_LORA), "--compare-base"] if DEMO_LORA.is_file() else [])
    args = build_parser().parse_args(argv)
    _check_inputs(args)
    args.lpips_model = None
    if getattr(args, "lpips_weights", None):  # before the long inversion: bad files fail at once
        try:
            args.lpips_model = metrics.load_lpips(args.lpips_weights, device=args.device)
        except (ValueError, FileNotFoundError) as error:
            fail(f"--lpips-weights: {error}")
    s = _load(args)
    written, report = COMMANDS[args.command](args, s)
    if report:
        report = {"command": args.command, "model": args.model, "lora": args.lora, "steps": args.steps,
                  "guidance": args.guidance, "seed": args.seed, "negative_prompt": args.negative_prompt,
                  "width": s.width, "height": s.height,
                  **({} if args.command == "istd" else {"prompt": args.prompt}), **report}
        written.append(s.out / "metrics.json")
        (s.out / "metrics.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if not k.startswith("per_prompt")}, indent=2))
    for path in written:
        print(f"wrote {path}")
    if demo:
        print("(the toy demo: `python sampler.py interpolate --help` for the options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
