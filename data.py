"""Captioned image data for `train.py`: a folder of images with same-stem .txt captions, or a JSONL file.

Two layouts are read:
  * a folder: `cat.png` + `cat.txt` (one caption per image, searched recursively);
  * a JSONL file, one `{"file_name": path, "caption": caption}` per line (the official data preparation's
    format, for LAION-Aesthetics 6.5+) or `{"image": path, "text": caption}`; relative paths are read
    from `root` (train.py's --data-root), by default the JSONL's folder.

Every image file (training, inversion, the demos) is read by `read_image`, as image viewers show it: EXIF
orientation applied, transparent pixels composited on white, 16-bit and float modes scaled to 8 bits. Then
the shorter side is resized to the resolution, centre cropped (the official
script crops at random; a centre crop keeps a sample a pure function of its index, which exact resume
and world-size independence rely on) and scaled to [-1, 1].

A file that cannot be decoded is skipped, never a crash: the item is replaced by the next readable
index (deterministically, so every rank and every resumed run sees the same substitute) and the
skipped path is returned with the item so that the training script can count and log it. Problems
that would make the whole run meaningless (no data, a missing caption, a missing image file, not one
readable image, a JSONL value that is not a string)
raise `ValueError` when the dataset is built, before any training. `fingerprint` (names, sizes, captions,
count) lets a resumed run check that its data did not change.

`stream_keys` is the sampler: one global, seeded order over all samples, shared by every rank.
`labelled_grid` draws the labelled rows of frames that train.py's validation strips, the demos and
the toy world's reports save.
"""
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DATA_ORDER, SAMPLE_STREAM = 0, 1  # tags that keep the two uses of the seed independent


def derive_seed(*numbers):
    """A 64-bit generator seed from a tuple of non-negative ints, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0])


def _folder_items(folder):
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption = path.with_suffix(".txt")
        if not caption.exists():
            raise ValueError(f"{path} has no caption file {caption.name}: write the caption there, "
                             "or move the image out of the data folder.")
        try:
            items.append((str(path), caption.read_text(encoding="utf-8").strip()))
        except UnicodeDecodeError as e:
            raise ValueError(f"{caption} is not UTF-8 text ({e.reason} at byte {e.start}): save the caption "
                             "as UTF-8.") from None
    return items


JSONL_KEYS = (("file_name", "caption"), ("image", "text"))  # (image path, caption): official, ours


def _jsonl_record(line):
    """(image path, caption) of one JSONL line, in either accepted key pair; KeyError if neither, TypeError
    if a value is not a string (a null caption is not the text "None") or the path is empty."""
    record = json.loads(line)
    for image_key, caption_key in JSONL_KEYS:
        if image_key in record and caption_key in record:
            image, caption = record[image_key], record[caption_key]
            for key, value in ((image_key, image), (caption_key, caption)):
                if not isinstance(value, str):
                    raise TypeError(f'"{key}" is {json.dumps(value)}, not a string')
            if not image.strip():
                raise TypeError(f'"{image_key}" is an empty path')
            return image, caption
    raise KeyError(f"keys {sorted(record)}")


def _jsonl_items(jsonl, root=None):
    root = jsonl.parent if root is None else Path(root)
    items, missing = [], []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            image, text = _jsonl_record(line)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            accepted = " or ".join(f'{{"{i}": path, "{c}": caption}}' for i, c in JSONL_KEYS)
            raise ValueError(f"{jsonl}:{n}: expected a JSON object {accepted} ({e!r}).") from None
        path = Path(image) if Path(image).is_absolute() else root / image
        (items if path.is_file() else missing).append((str(path), text))
    if missing:
        raise ValueError(f"{jsonl}: {len(missing)} of {len(items) + len(missing)} images do not exist, "
                         f"e.g. {missing[0][0]}. Relative paths are read from {root} (set it with "
                         "--data-root); fix the paths or drop those lines.")
    return items


def list_items(path, root=None):
    """[(image path, caption)] from a folder or a .jsonl file (relative paths from `root`, default its
    folder), checked for missing files and captions."""
    path = Path(path)
    if root is not None and not (path.is_file() and path.suffix == ".jsonl"):
        raise ValueError(f"--data-root is for a --data JSONL file, but --data {path} is not one.")
    if root is not None and not Path(root).is_dir():
        raise ValueError(f"--data-root {root} is not a folder.")
    if path.is_dir():
        items = _folder_items(path)
    elif path.is_file() and path.suffix == ".jsonl":
        items = _jsonl_items(path, root)
    else:
        raise ValueError(f"--data {path}: expected a folder of images with .txt captions or a .jsonl "
                         "file, but it " + ("does not exist." if not path.exists() else "is neither."))
    if not items:
        raise ValueError(f"--data {path}: no images found (extensions {sorted(IMAGE_EXTENSIONS)}).")
    return items


def data_root(path, root=None):
    """The folder that names in `fingerprint` are relative to: the data folder, or a JSONL's root."""
    path = Path(path)
    return path if path.is_dir() else Path(root) if root is not None else path.parent


def fingerprint(items, root):
    """What a resume checks about the data: {count, sha256 of each image's name (relative to `root`), file
    size and caption}. A file added, removed, renamed, rewritten to another size or recaptioned changes it."""
    digest = hashlib.sha256()
    for path, caption in items:
        name = os.path.relpath(path, root)
        digest.update(json.dumps([name, os.path.getsize(path), caption]).encode() + b"\n")
    return {"count": len(items), "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------- image files

WHITE = (255, 255, 255, 255)  # the background that transparent pixels are composited on (as the demos show them)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_image(path):
    """An image file as PIL RGB, the way image viewers show it: EXIF orientation applied, transparency
    composited on white, 16-bit (I;16, and I: what PIL gives for some 16-bit files; 65535 = white) and
    float (F: 0..1) grey scaled to 8 bits, CMYK / palette / grey converted by PIL. The first frame of an
    animation. FileNotFoundError if there is no file, ValueError if it cannot be decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:  # PIL's errors for a bad file
        raise ValueError(f"cannot read the image {path}: {error}. Is it a complete PNG/JPEG file?") from None


def _to_rgb(image):
    if image.mode in SIXTEEN_BIT or image.mode == "I":
        image = _grey_to_8_bits(image, 65535)
    elif image.mode == "F":
        image = _grey_to_8_bits(image, 1.0)
    if image.mode in ALPHA_MODES or "transparency" in image.info:  # also P, L or RGB with a transparent colour
        return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _grey_to_8_bits(image, white):
    """A grey image of values in [0, white] -> mode L (PIL's own conversion clips them at 255 instead)."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.round(np.clip(values / white, 0, 1) * 255).astype(np.uint8))  # 2-D uint8: mode L


def load_training_image(path, resolution):
    """`read_image`, shorter side resized to `resolution`, centre crop -> [3, res, res] float in [-1, 1]."""
    im = read_image(path)
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]
    return pixels.float() / 127.5 - 1.0


class CaptionDataset(torch.utils.data.Dataset):
    """Indexed by `(index, key)` pairs from `stream_keys`; returns a dict with pixels, caption, key."""

    def __init__(self, path, resolution, root=None):
        self.items = list_items(path, root)
        self.resolution = resolution
        self.root = data_root(path, root)
        self._check_one_is_readable()

    def _check_one_is_readable(self):
        """A ValueError now, not in the training loop, when no image at all can be decoded."""
        errors = []
        for path, _ in self.items:  # usually the first one reads: one image decoded
            try:
                load_training_image(path, 8)
                return
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                errors.append(f"{path}: {e}")
        raise ValueError(f"none of the {len(self.items)} images can be read, e.g. {errors[0]}. Check the "
                         "files (corrupt, truncated, not images?).")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index_key):
        index, key = index_key
        skipped = []
        for i in range(len(self.items)):  # the next readable item replaces an unreadable one
            path, caption = self.items[(index + i) % len(self.items)]
            try:
                pixels = load_training_image(path, self.resolution)
            except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                skipped.append(path)
                continue
            return {"pixels": pixels, "caption": caption, "key": key, "skipped": skipped}
        raise RuntimeError(f"none of the {len(self.items)} images could be read, e.g. {skipped[0]}.")


def ignore_stop_signals(worker_id):
    """worker_init_fn: SIGTERM / Ctrl-C are for the training process, which saves, then ends the workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(samples):
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "keys": torch.tensor([s["key"] for s in samples], dtype=torch.long),
        "skipped": [p for s in samples for p in s["skipped"]],
    }


def stream_keys(num_items, seed, start, rank, world_size, batch_size):
    """Yield (index, key) for this rank, forever, from global sample position `start`.

    The global stream is the concatenation of seeded permutations of all items, one per epoch; the
    key of a sample is its position in that stream. Each global micro-batch is `world_size *
    batch_size` consecutive positions, and rank r takes the slice [r * batch_size, (r + 1) *
    batch_size). So which image a sample is, and its key (which seeds its noise), depend only on the
    seed and the position: the same for any world size with the same global batch.
    """
    epoch, perm = -1, None
    position = start
    while True:
        for j in range(batch_size):
            key = position + rank * batch_size + j
            if key // num_items != epoch:
                epoch = key // num_items
                g = torch.Generator().manual_seed(derive_seed(seed, DATA_ORDER, epoch))
                perm = torch.randperm(num_items, generator=g)
            yield int(perm[key % num_items]), key
        position += world_size * batch_size


def per_sample_randomness(seed, keys, shape, num_train_timesteps):
    """Timestep, noise, regularizer direction and VAE posterior noise for each sample.

    Drawn from a generator seeded by (seed, key), with key = the sample's position in the global data
    stream, so they do not depend on the rank, the world size or the micro-batch split.
    """
    t, noise, direction, posterior = [], [], [], []
    for key in keys.tolist():
        g = torch.Generator().manual_seed(derive_seed(seed, SAMPLE_STREAM, key))
        t.append(torch.randint(0, num_train_timesteps, (), generator=g))  # t ~ U{0..T-1}, as the official code
        noise.append(torch.randn(shape, generator=g))
        direction.append(torch.randn(shape, generator=g))
        posterior.append(torch.randn(shape, generator=g))
    return torch.stack(t), torch.stack(noise), torch.stack(direction), torch.stack(posterior)


# ------------------------------------------------------------------------------ figures

def labelled_grid(rows, scale=2, label_width=150):
    """rows: [(label, images [N, 3, H, W] in [0, 1])] -> one PIL image, a text label left of each row,
    every frame enlarged `scale` times (nearest neighbour: the pixels stay visible)."""
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
