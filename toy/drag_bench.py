"""Drag editing in the toy world: DragDiffusion (drag.py) with the base model, the lambda-0 control and
the Smooth-LoRA, on drags whose right answer is known (paper Sec. 4.4, Fig. 1 task 3, Fig. 6).

The paper shows drags only as pictures. In the toy world the right answer can be drawn: every image
comes from its geometry (`world.draw`), so a drag is a change of that geometry and its expected image
is the source redrawn with the new geometry. Held-out images (fresh seeds, held-out triples), and
three kinds of drag, chosen in turn where the shape has room:
  * move: the centroid is dragged 6-9 px in a random direction;
  * grow / shrink: the shape's edge along an axis is dragged 5-7 px outwards / inwards while the
    opposite edge is pinned (a handle whose target is itself): the shape scales about the pin.
Handles and targets are landmarks measured the same way on the source and on the expected image
(`landmarks`: the centroid of the shape's colour, or its extent from the centroid along the axis).
The mask is a disc around the source and the expected shape, 3 px beyond them.

Scores, paired per drag (every model gets the same drags, images and seeds):
  * Mean Distance (DragBench's MD): the same landmarks measured on the edited image, their mean
    distance to the targets, in pixels; the shape is found by its colour, never by the drag's features
    (a shape that vanished scores the distance it had to travel);
  * attributes preserved: the toy classifier (toy/instruments.py) reads shape, colour and background
    (and size, for moves) off the edited image; the fraction that match the source;
  * fidelity outside the mask: mean absolute pixel difference to the source there, 0-255 levels.
Standard errors are over drags, each drag's score averaged over the seeds of the drag's randomness
(the identity LoRA's batches). The row `roundtrip` runs the base model with every target on its handle:
the pipeline's own loss (inversion, identity LoRA, denoising), the floor of the outside-mask error.
The LoRAs are those of train.py's toy-world run:

    OMP_NUM_THREADS=1 python train.py --threads 1 --out runs/drag_loras   # control in runs/drag_loras/control
    OMP_NUM_THREADS=1 python -m toy.drag_bench                            # 64 drags x 2 seeds x 4 rows
    OMP_NUM_THREADS=1 python -m toy.drag_bench --drags 6 --seeds 0        # a quick look

Each (model, seed) is written to OUT/runs/ when done and reused by a rerun with the same drags; the
table goes to OUT/table.md, the figure (the first drags, base vs Smooth-LoRA) to OUT/figure.png.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import checkpoint
import drag
import lora
from demos import media
from toy import instruments, world

DRAG_SEED = 7000  # images of the benchmark: fresh seeds, far from the training (0) and classifier (100) ones
MOVE = (6.0, 9.0)  # drag length of a move, px
EDGE = (5.0, 7.0)  # drag length of an edge (grow / shrink), px
MASK_MARGIN = 3.0  # the editable disc reaches this far beyond the shape, px
MIN_R, MAX_R = 4.5, 12.0  # radii a grown / shrunk shape may have (the world draws 5.5-11)
KINDS = ("move", "grow", "shrink")
MODELS = ("base", "control", "smooth", "roundtrip")  # roundtrip: the base model, every target on its handle


@dataclass
class Drag:
    kind: str  # move, grow or shrink
    source: dict  # the source image's attributes (world.sample_attributes)
    expected: dict  # the same with the dragged geometry: world.draw(expected) is the right answer
    axis: tuple  # unit vector (x, y) of the landmarks: the move's direction, or the dragged edge's side
    handles: list  # (x, y) px on the source image
    targets: list  # (x, y) px on the expected image
    mask: list  # [H][W] 0/1: where the image may change


# ----------------------------------------------------------------------------------- geometry

def shape_weight(image01, a):
    """How much each pixel is shape colour rather than background, in [0, 1]: [H, W], image01 [3, H, W]."""
    colour, background = (torch.tensor(a[k], dtype=torch.float32)[:, None, None] / 255
                          for k in ("colour_rgb", "background_rgb"))
    along = ((image01 - background) * (colour - background)).sum(0) / ((colour - background) ** 2).sum()
    return along.clamp(0, 1)


def landmarks(image01, a, kind, axis):
    """The drag's landmarks on an image, (x, y) px, or None if no pixel has the shape's colour.

    move: [the centroid of the shape's colour]; grow / shrink: [its extent along the axis from the
    centroid (the dragged edge), its extent along minus the axis (the pinned edge)].
    """
    w = shape_weight(image01, a)
    ys, xs = torch.nonzero(w > 0.5, as_tuple=True)
    if len(xs) == 0:
        return None
    centroid = torch.stack([(w * torch.arange(w.shape[1])).sum() / w.sum(),
                            (w * torch.arange(w.shape[0])[:, None]).sum() / w.sum()])
    if kind == "move":
        return [tuple(centroid.tolist())]
    u = torch.tensor(axis)
    offsets = torch.stack([xs, ys], dim=1).float() - centroid  # [P, 2]
    return [tuple((centroid + side * (offsets @ (side * u)).max() * u).tolist()) for side in (1, -1)]


def _fits(a):
    margin = 1.2 * a["r"] + 1  # as world.sample_attributes: the triangle reaches furthest from its centre
    return MIN_R <= a["r"] <= MAX_R and all(margin <= a[c] <= world.RESOLUTION - margin for c in ("cx", "cy"))


def _extent(a, u):
    """How far the drawn shape reaches from (cx, cy) along the axis unit vector u (axis-aligned)."""
    if a["shape"] == "circle":
        return a["r"]
    if a["shape"] == "square":
        return 0.88 * a["r"]
    return 1.2 * a["r"] if u[1] < 0 else 0.6 * a["r"]  # the triangle points up: apex above, base below


def _expected(kind, a, rng):
    """(expected attributes, axis) of a drag of kind on a, or None if the shape has no room for it."""
    if kind == "move":
        length = rng.uniform(*MOVE)
        for _ in range(50):
            angle = rng.uniform(0, 2 * math.pi)
            u = (math.cos(angle), math.sin(angle))
            b = dict(a, cx=a["cx"] + length * u[0], cy=a["cy"] + length * u[1])
            if _fits(b):
                return b, u
        return None
    axes = [(0.0, -1.0), (0.0, 1.0)] if a["shape"] == "triangle" else [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)]
    delta = rng.uniform(*EDGE) * (1 if kind == "grow" else -1)
    for k in rng.permutation(len(axes)):
        u = axes[k]
        span = _extent(a, u) + _extent(a, (-u[0], -u[1]))
        s = (span + delta) / span  # scale about the pinned edge
        pin = (a["cx"] - _extent(a, (-u[0], -u[1])) * u[0], a["cy"] - _extent(a, (-u[0], -u[1])) * u[1])
        b = dict(a, r=a["r"] * s, cx=pin[0] + s * (a["cx"] - pin[0]), cy=pin[1] + s * (a["cy"] - pin[1]))
        if _fits(b):
            return b, u
    return None


def _mask(a, b):
    """1 inside the discs that hold the source and the expected shape, plus MASK_MARGIN."""
    yy, xx = np.mgrid[:world.RESOLUTION, :world.RESOLUTION] + 0.5  # pixel centres in the drawing's units
    inside = [(xx - c["cx"]) ** 2 + (yy - c["cy"]) ** 2 <= (1.2 * c["r"] + MASK_MARGIN) ** 2 for c in (a, b)]
    return (inside[0] | inside[1]).astype(int).tolist()


def to01(image_uint8):
    return torch.from_numpy(np.array(image_uint8)).permute(2, 0, 1).float() / 255  # [3, H, W]


def make_drags(n, seed=DRAG_SEED):
    """n drags on n held-out images, deterministic from the seed; kinds in turn, where they fit."""
    rng = np.random.default_rng(seed)
    drags = []
    _, attributes = world.make_images(4 * n, seed=seed, split="heldout")
    for a in attributes:
        for kind in KINDS[len(drags) % 3:] + KINDS[:len(drags) % 3]:  # this drag's kind first, then the others
            found = _expected(kind, a, rng)
            if found is None:
                continue
            b, u = found
            handles = landmarks(to01(world.draw(a)), a, kind, u)
            targets = landmarks(to01(world.draw(b)), b, kind, u)
            drags.append(Drag(kind, a, b, u, handles, targets, _mask(a, b)))
            break
        if len(drags) == n:
            return drags
    raise ValueError(f"only {len(drags)} of {n} drags fit in {4 * n} images")


# -------------------------------------------------------------------------------------- scoring

def score(edited01, d, classifier):
    """MD, attributes preserved and fidelity outside the mask of one edited image [3, H, W]."""
    found = landmarks(edited01, d.source, d.kind, d.axis)
    if found is None:  # the shape is gone: it moved nowhere
        found = d.handles
    md = float(np.mean([math.dist(f, t) for f, t in zip(found, d.targets)]))
    predicted = instruments.predict(edited01[None], classifier)
    heads = ["shape", "colour", "background"] + (["size"] if d.kind == "move" else [])
    kept = np.mean([world.HEADS[h][predicted[h][0]] == d.source[h] for h in heads])
    source = to01(world.draw(d.source))
    outside = 1 - torch.tensor(d.mask, dtype=torch.float32)
    fidelity = ((edited01 - source).abs().mean(0) * outside).sum() / outside.sum() * 255
    return {"md": md, "attributes": float(kept), "fidelity": float(fidelity), "found": found}


# ------------------------------------------------------------------------------------------ runs

def model_unet(models, name, loras):
    """The UNet of a row: the base, or the base with the control's or the Smooth-LoRA (drag.py bakes it in)."""
    if name in ("base", "roundtrip"):
        return models.unet
    path = Path(loras) / ("control" if name == "control" else "") / "smooth_lora.safetensors"
    if not path.is_file():
        raise SystemExit(f"drag_bench: error: {path} not found; train the LoRAs with "
                         f"`OMP_NUM_THREADS=1 python train.py --threads 1 --out {loras}`")
    unet = drag.bake_lora(models.unet)
    lora.load_lora(unet, path)
    return unet


def run_drags(models, unet, drags, seed, move=True):
    """Every drag with one model and one seed -> (per-drag records, edited images uint8 [N, H, W, 3]).
    move=False: every target is its handle (the pipeline's round trip, the reference for fidelity)."""
    records, images = [], []
    for k, d in enumerate(drags):
        start = time.time()
        image = to01(world.draw(d.source))[None]
        mask = torch.tensor(d.mask, dtype=torch.float32)[None, None]
        result = drag.drag(unet, models.vae, image, models.encode_prompt([world.caption(d.source)]), d.handles,
                           d.targets if move else d.handles, mask, seed=seed, progress=False)
        records.append({"drag": k, "kind": d.kind, "iterations": result.iterations, "tracked": result.handles,
                        "seconds": time.time() - start})
        images.append(media.to_uint8(result.image)[0])
    return records, np.stack(images)


def atomic_write(path, write):
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def load_or_run(out, name, seed, drags, models, loras):
    """The records and images of (model, seed), from OUT/runs if a run with these drags is there."""
    stem = Path(out) / "runs" / f"{name}-seed{seed}"
    key = [asdict(d) for d in drags]
    if stem.with_suffix(".json").is_file():
        saved = json.loads(stem.with_suffix(".json").read_text())
        if saved["drags"] == json.loads(json.dumps(key)):
            return saved["records"], np.load(stem.with_suffix(".npy"))
    unet = model_unet(models, name, loras)
    records, images = run_drags(models, unet, drags, seed, move=name != "roundtrip")
    stem.parent.mkdir(parents=True, exist_ok=True)
    def save_images(path):
        with open(path, "wb") as f:
            np.save(f, images)

    atomic_write(stem.with_suffix(".npy"), save_images)
    atomic_write(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps({"drags": key, "records": records})))
    return records, images


# ----------------------------------------------------------------------------------------- report

METRICS = {"md": "Mean Distance, px (lower is better)", "attributes": "attributes preserved (higher)",
           "fidelity": "outside-mask error, 0-255 (lower)"}


def per_drag(runs, name, metric):
    """A model's score per drag, averaged over its seeds: [N]."""
    return np.mean([[r[metric] for r in records] for (model, _), records in runs.items() if model == name], axis=0)


def table(runs, drags, names, seeds, seconds):
    n = len(drags)
    start_md = np.mean([np.mean([math.dist(h, t) for h, t in zip(d.handles, d.targets)]) for d in drags])
    lines = [f"{n} drags ({', '.join(f'{sum(d.kind == k for d in drags)} {k}' for k in KINDS)}) x seeds "
             f"{', '.join(map(str, seeds))}; mean +- standard error over drags (each averaged over the seeds). "
             f"Before the drag the handles are {start_md:.2f} px from their targets on average.", "",
             "| model | " + " | ".join(METRICS.values()) + " | MD move / grow / shrink | latent steps |",
             "|---" * (len(METRICS) + 3) + "|"]
    for name in names:
        cells = []
        for metric in METRICS:
            v = per_drag(runs, name, metric)
            cells.append(f"{v.mean():.3f} +- {v.std(ddof=1) / math.sqrt(n):.3f}")
        md = per_drag(runs, name, "md")
        by_kind = " / ".join(f"{md[[d.kind == k for d in drags]].mean():.2f}" for k in KINDS)
        steps = per_drag(runs, name, "iterations").mean()
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {by_kind} | {steps:.1f} |")
    lines += ["", "Paired differences (same drags, same seeds), mean +- standard error:", "",
              "| difference | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    pairs = [(a, b) for a, b in (("control", "base"), ("smooth", "base"), ("smooth", "control"))
             if a in names and b in names]
    for a, b in pairs:
        cells = []
        for metric in METRICS:
            diff = instruments.paired_difference(per_drag(runs, a, metric), per_drag(runs, b, metric))
            cells.append(f"{diff['mean']:+.3f} +- {diff['se']:.3f}")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    per_seed = [f"{name} seed {s}: MD {np.mean([r['md'] for r in runs[(name, s)]]):.2f}"
                for name in names for s in seeds]
    drag_seconds = [r["seconds"] for records in runs.values() for r in records]
    lines += ["", "Per seed: " + "; ".join(per_seed) + ".", "",
              f"Compute: {len(drag_seconds)} drags, {sum(drag_seconds) / 60:.1f} min in all "
              f"({np.mean(drag_seconds):.1f} s per drag, 1 thread, as each run measured it); this call took "
              f"{seconds / 60:.1f} min (runs already in OUT/runs are read, not rerun)."]
    return "\n".join(lines) + "\n"


def figure(drags, images, names, path, count=6, scale=4):
    """One row per drag: source with the drag's arrows | the right answer | each model's edit."""
    rows = []
    for k, d in enumerate(drags[:count]):
        pictures = [media.draw_drags(to01(world.draw(d.source)), d.handles, d.targets, scale=scale),
                    media.draw_drags(to01(world.draw(d.expected)), [], [], scale=scale)]
        pictures += [media.draw_drags(to01(images[name][k]), [], d.targets, scale=scale) for name in names]
        rows.append(pictures)
    labels = ["source + drag", "right answer"] + list(names)
    side = rows[0][0].width
    sheet = Image.new("RGB", (len(labels) * (side + 4), 14 + len(rows) * (side + 4)), "white")
    pen = ImageDraw.Draw(sheet)
    for j, label in enumerate(labels):
        pen.text((j * (side + 4) + 2, 1), label, fill=(0, 0, 0))
    for i, pictures in enumerate(rows):
        for j, picture in enumerate(pictures):
            sheet.paste(picture, (j * (side + 4), 14 + i * (side + 4)))
    atomic_write(path, lambda p: sheet.save(p, format="PNG"))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m toy.drag_bench", description=__doc__.split("\n")[0])
    p.add_argument("--drags", type=int, default=64, help="drags, >= 2 (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the drag's randomness "
                   "(default: 0 1)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="rows; roundtrip: the base model with every target on its handle (default: all)")
    p.add_argument("--loras", default="runs/drag_loras", help="train.py's --out: smooth_lora.safetensors and "
                   "control/smooth_lora.safetensors (default: %(default)s)")
    p.add_argument("--out", default="runs/drag_bench", help="output folder (default: %(default)s)")
    p.add_argument("--figure-models", nargs="+", default=["base", "smooth"], help="columns of the figure "
                   "(default: base smooth)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.drags < 2:
        p.error("--drags must be at least 2 (standard errors)")
    torch.set_num_threads(1)
    start = time.time()
    models = checkpoint.load_models(world.MODEL_DIR)
    classifier = world.load_classifier()
    drags = make_drags(args.drags)
    runs, images = {}, {}
    for name in args.models:
        for seed in args.seeds:
            print(f"{name}, seed {seed}: {args.drags} drags", flush=True)
            records, seed_images = load_or_run(args.out, name, seed, drags, models, args.loras)
            runs[(name, seed)] = [{**r, **score(to01(image), d, classifier)}
                                  for r, image, d in zip(records, seed_images, drags)]
            images.setdefault(name, seed_images)  # the figure shows the first seed
    text = table(runs, drags, args.models, args.seeds, time.time() - start)
    out = Path(args.out)
    atomic_write(out / "table.md", lambda path: path.write_text(text))
    shown = [m for m in args.figure_models if m in images]
    figure(drags, images, shown, out / "figure.png")
    print(text + f"wrote {out / 'table.md'}, {out / 'figure.png'}")


if __name__ == "__main__":
    main()
