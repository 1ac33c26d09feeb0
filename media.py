"""Image files in and out for the sampler's demos: an input image as a tensor, strips, GIF animations.

Tensors are images in [0, 1], [N, 3, H, W] float (what `sampler.decode_latents` returns).
"""
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_image01(path, size):
    """An image file as [1, 3, size, size] in [0, 1].

    Any mode becomes RGB (transparent pixels over white). An image that is not size x size is
    center-cropped to a square and resized (bicubic), as null-text inversion prepares its inputs,
    with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    image = Image.open(path)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        warnings.warn(f"{path}: {w}x{h} is not the model's {size}x{size}; center-cropping to a square and "
                      f"resizing to {size}x{size} (--size sets another side).")
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def to_pil(images):
    """[N, 3, H, W] in [0, 1] -> list of PIL images (rounded to uint8, as diffusers does)."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def save_strip(images, path):
    """Save [N, 3, H, W] images side by side as one PNG."""
    frames = to_pil(images)
    strip = Image.new("RGB", (sum(f.width for f in frames), frames[0].height))
    for k, f in enumerate(frames):
        strip.paste(f, (k * f.width, 0))
    strip.save(path)
    return path


def save_gif(images, path, seconds=2.0):
    """Save [N, 3, H, W] images as a looping GIF that plays forward then back."""
    frames = to_pil(images)
    frames = frames + frames[-2:0:-1]
    frames[0].save(path, save_all=True, append_images=frames[1:], loop=0,
                   duration=max(20, int(1000 * seconds / len(frames))))
    return path
