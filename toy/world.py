"""The toy world: a procedural captioned shapes data set, and reading captions off its images.

Smooth Diffusion is a fine-tune of SD-1.5, which cannot be downloaded here and needs a GPU. The toy
world is small enough to run the whole method on a laptop CPU:

  * the data (this file): 32 x 32 RGB images of one shape (circle, square, triangle) of one of six
    colours, small or large, jittered in position, size and tint, on a background of another colour,
    captioned "a small red circle on a blue background". Some (shape, colour, background) triples
    never appear in training: their captions are the held-out prompts (`assets/toy-heldout-prompts.txt`);
  * a tiny SD-1.x trained from scratch on it (toy/pretrain.py, saved in `assets/toy-sd/`);
  * the instruments that read its images (toy/instruments.py; `caption_accuracy` here) and the paired
    report of train.py's main job (toy/report.py, toy/main_job.py).

    python -m toy data FOLDER   # write toy images + captions (train.py's folder format)
"""
import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from toy import instruments

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
MODEL_DIR = ASSETS / "toy-sd"
HELDOUT_PROMPTS = ASSETS / "toy-heldout-prompts.txt"

# ----------------------------------------------------------------------------------------- the data

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (50, 165, 70), "blue": (45, 90, 215),
           "yellow": (235, 205, 50), "purple": (145, 70, 185), "white": (240, 240, 240)}
SIZES = {"small": (5.5, 7.0), "large": (8.5, 11.0)}  # radius range in pixels (32 x 32 image); smaller
# circles and squares (r 4-5.5) came out of the 8 x 8 latents as blobs: a fifth of the held-out samples
TINT = 12  # each channel of a colour is jittered by up to this much
# (shape, colour, background) triples that never appear in training; each colour is held out twice as
# a shape colour and every word still occurs in training in other combinations.
HELDOUT = (("circle", "red", "blue"), ("circle", "yellow", "green"), ("circle", "white", "purple"),
           ("circle", "purple", "yellow"), ("square", "green", "red"), ("square", "blue", "white"),
           ("square", "purple", "green"), ("square", "yellow", "blue"), ("triangle", "red", "yellow"),
           ("triangle", "blue", "green"), ("triangle", "white", "red"), ("triangle", "green", "purple"))
WORDS = ["a", "on", "background", *SIZES, *COLOURS, *SHAPES]


def caption(a):
    """The caption of an attribute dict: "a small red circle on a blue background"."""
    return f"a {a['size']} {a['colour']} {a['shape']} on a {a['background']} background"


def triples(split):
    """The (shape, colour, background) triples of a split: "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    every = [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]
    return every if split == "all" else [t for t in every if (t in HELDOUT) == (split == "heldout")]


def heldout_prompts():
    """The captions never seen in training: each held-out triple, small and large (24 prompts)."""
    return [caption(dict(shape=s, colour=c, background=b, size=z)) for s, c, b in HELDOUT for z in SIZES]


def _outline(shape, cx, cy, r):
    """The shape's PIL outline (bounding box or polygon) around centre (cx, cy) with radius r."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":  # half side 0.88 r: about the circle's area
        h = 0.88 * r
        return [cx - h, cy - h, cx + h, cy + h]
    R = 1.2 * r  # equilateral triangle, pointing up, circumradius R; (cx, cy) is its centroid
    return [(cx + R * math.sin(a), cy - R * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]


def draw(a, supersample=4):
    """Render an attribute dict to a 32 x 32 RGB uint8 array (drawn 4x larger, box-filtered down)."""
    n, s = RESOLUTION * supersample, supersample
    image = Image.new("RGB", (n, n), tuple(a["background_rgb"]))
    pen = ImageDraw.Draw(image)
    outline = _outline(a["shape"], a["cx"] * s, a["cy"] * s, a["r"] * s)
    fill = tuple(a["colour_rgb"])
    if a["shape"] == "circle":
        pen.ellipse(outline, fill=fill)
    elif a["shape"] == "square":
        pen.rectangle(outline, fill=fill)
    else:
        pen.polygon(outline, fill=fill)
    return np.asarray(image.resize((RESOLUTION, RESOLUTION), Image.BOX))


def sample_attributes(rng, split="train"):
    """One random attribute dict of a split, drawn from a numpy Generator."""
    options = triples(split)
    shape, colour, background = options[rng.integers(len(options))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    r = float(rng.uniform(*SIZES[size]))
    margin = 1.2 * r + 1  # the triangle reaches furthest from its centre
    cx, cy = (float(v) for v in rng.uniform(margin, RESOLUTION - margin, size=2))
    tint = lambda name: [int(np.clip(v + rng.integers(-TINT, TINT + 1), 0, 255)) for v in COLOURS[name]]
    return dict(shape=shape, colour=colour, background=background, size=size, cx=cx, cy=cy, r=r,
                colour_rgb=tint(colour), background_rgb=tint(background))


def make_images(n, seed=0, split="train"):
    """n images of a split, deterministic from the seed: (uint8 [n, 32, 32, 3], list of attribute dicts)."""
    rng = np.random.default_rng(seed)
    attributes = [sample_attributes(rng, split) for _ in range(n)]
    return np.stack([draw(a) for a in attributes]), attributes


DATA_RECORD = "toy_data.json"  # what prepare_data wrote: its arguments and the fingerprint of the images


def data_fingerprint(images, attributes):
    """sha256 of the pixels and captions: changes whenever world.py would draw other training images."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update("\n".join(map(caption, attributes)).encode())
    return h.hexdigest()


def prepare_data(folder, n=2000, seed=0, split="train"):
    """Write n images of a split as 00000.png + 00000.txt (the folder layout train.py reads) and
    DATA_RECORD. A folder that already holds them is reused (nothing written) only if this toy/world.py
    would draw the same images; otherwise a ValueError says to delete it (a folder made by an older
    world.py would silently fine-tune on another world). Returns the folder as a Path."""
    folder = Path(folder)
    images, attributes = make_images(n, seed, split)  # ~0.5 s for 2000
    record = {"n": n, "seed": seed, "split": split, "sha256": data_fingerprint(images, attributes)}
    if folder.is_dir() and any(folder.glob("*.png")):
        record_path = folder / DATA_RECORD
        saved = json.loads(record_path.read_text()) if record_path.is_file() else None
        if saved != record:
            raise ValueError(f"{folder} holds images that this toy/world.py does not draw ("
                             f"{'no ' + DATA_RECORD if saved is None else 'another ' + DATA_RECORD}: made by "
                             f"another version or other arguments); delete the folder to have it written again, "
                             f"or pass --data with your own images.")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, a) in enumerate(zip(images, attributes)):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption(a) + "\n")
    (folder / DATA_RECORD).write_text(json.dumps(record, indent=1))  # last: a killed write is not reused
    return folder


# ---------------------------------------------------------------- reading captions off images

HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(COLOURS), "size": tuple(SIZES)}


def attribute_labels(attributes):
    """{head: LongTensor [N]} class indices of a list of attribute dicts."""
    return {name: torch.tensor([values.index(a[name]) for a in attributes]) for name, values in HEADS.items()}


def train_classifier(seed=0, n=10_000):
    """The attribute classifier (toy/instruments.py) on n images of ALL triples, held-out ones included: it is
    the measuring instrument, not the model under test (see instruments' docstring)."""
    images, attributes = make_images(n, seed=seed + 100, split="all")
    return instruments.train_classifier(images, attribute_labels(attributes), HEADS, seed=seed)


@lru_cache(maxsize=2)
def load_classifier(path=instruments.CLASSIFIER_PATH):
    """The classifier `python -m toy pretrain` wrote, loaded once per process."""
    return instruments.load_classifier(path, HEADS)


def parse_caption(text):
    """The attributes a toy caption names: {"shape", "colour", "background", "size"} (those present).

    The colour before the shape word is the shape's, the one after it the background's; so "a red
    circle on blue background" and "a small red circle on a blue background" both parse.
    """
    words = text.lower().replace(",", " ").split()
    shapes = [i for i, w in enumerate(words) if w in SHAPES]
    if not shapes:
        raise ValueError(f"caption {text!r} names no shape ({', '.join(SHAPES)}): not a toy caption.")
    i = shapes[0]
    named = {"shape": words[i]}
    before = [w for w in words[:i] if w in COLOURS]
    after = [w for w in words[i + 1:] if w in COLOURS]
    sizes = [w for w in words if w in SIZES]
    if before:
        named["colour"] = before[-1]
    if after:
        named["background"] = after[0]
    if sizes:
        named["size"] = sizes[0]
    return named


def caption_accuracy(images01, captions, classifier=None):
    """CLIP-score proxy: how often the classifier sees what each caption names, images in [0, 1].

    Returns {"caption": fraction of images with every named attribute right, and per attribute
    ("shape", "colour", "background", "size") the fraction right among the captions that name it}.
    """
    if len(images01) != len(captions):
        raise ValueError(f"{len(images01)} images but {len(captions)} captions: pass one caption per image.")
    predicted = instruments.predict(images01, classifier or load_classifier())
    named = [parse_caption(c) for c in captions]
    right = {name: [] for name in HEADS}
    every = []
    for k, attrs in enumerate(named):
        ok = [HEADS[name][predicted[name][k]] == value for name, value in attrs.items()]
        for (name, _), r in zip(attrs.items(), ok):
            right[name].append(r)
        every.append(all(ok))
    return {"caption": float(np.mean(every)), **{name: float(np.mean(r)) for name, r in right.items() if r}}
