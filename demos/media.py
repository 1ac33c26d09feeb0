"""Image and video files in and out for the sampler's demos: input images, strips, GIF / MP4, frames.
Input images are read by data.read_image, as training reads them.

Tensors are images in [0, 1], [N, 3, H, W] float (what `sampler.decode_latents` returns). MP4 is
written by piping raw frames to an `ffmpeg` executable on PATH (no Python video package).
"""
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data


def load_image01(path, width, height):
    """An image file (data.read_image: EXIF orientation applied, transparency on white) as [1, 3, height, width]
    in [0, 1].

    An image of another size is center-cropped to the aspect ratio width:height and resized
    (bicubic), as null-text inversion prepares its inputs, with a warning.
    """
    image = data.read_image(path)
    w, h = image.size
    if (w, h) != (width, height):
        warnings.warn(f"{path}: {w}x{h} is not the model's {width}x{height}; center-cropping to that aspect "
                      f"ratio and resizing to {width}x{height} (--width/--height set another size).")
        scale = min(w / width, h / height)
        crop_w, crop_h = round(width * scale), round(height * scale)
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def to_uint8(images):
    """[N, 3, H, W] in [0, 1] -> [N, H, W, 3] uint8 array (rounded, as diffusers does)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images):
    """[N, 3, H, W] in [0, 1] -> list of PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def save_strip(images, path, *, columns=None):
    """Save [N, 3, H, W] images side by side as one PNG; with `columns`, in rows of that many."""
    frames = to_pil(images)
    columns = columns or len(frames)
    rows = -(-len(frames) // columns)
    sheet = Image.new("RGB", (columns * frames[0].width, rows * frames[0].height), "white")
    for k, f in enumerate(frames):
        sheet.paste(f, ((k % columns) * f.width, (k // columns) * f.height))
    sheet.save(path)
    return path


def save_comparison(rows, path, *, scale=1):
    """rows: [(label, frames [N, 3, H, W])] -> one PNG, a labelled row per model, frames enlarged `scale`x."""
    data.labelled_grid(rows, scale=scale, label_width=120).save(path)
    return path


def save_comparison_animation(rows, path, *, scale=1, fps=10.0):
    """The same rows as an animation: frame k of every row above one another, labelled (GIF or MP4)."""
    sheets = [data.labelled_grid([(label, frames[k:k + 1]) for label, frames in rows], scale=scale, label_width=120)
              for k in range(len(rows[0][1]))]
    images = torch.stack([torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255).permute(2, 0, 1)
                          for sheet in sheets])
    return save_animation(images, path, fps=fps)


def draw_drags(image, handles, targets, *, scale=1):
    """One image [3, H, W] in [0, 1] as a PIL image enlarged `scale` times (nearest neighbour), with an
    arrow from each handle (red dot) to its target (blue dot); points are (x, y) pixels."""
    picture = to_pil(image[None])[0]
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    pen = ImageDraw.Draw(picture)
    dot = max(2, scale)
    for (hx, hy), (tx, ty) in zip(handles, targets):
        (hx, hy), (tx, ty) = ((scale * (x + 0.5), scale * (y + 0.5)) for x, y in ((hx, hy), (tx, ty)))
        pen.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(1, scale // 2))
        length = max(((tx - hx) ** 2 + (ty - hy) ** 2) ** 0.5, 1e-6)
        ux, uy = (tx - hx) / length, (ty - hy) / length  # arrowhead: two strokes back from the target
        for side in (1, -1):
            pen.line([(tx, ty), (tx - 2 * dot * (ux - side * 0.6 * uy), ty - 2 * dot * (uy + side * 0.6 * ux))],
                     fill=(255, 255, 255), width=max(1, scale // 2))
        pen.ellipse([hx - dot, hy - dot, hx + dot, hy + dot], fill=(230, 30, 30))
        pen.ellipse([tx - dot, ty - dot, tx + dot, ty + dot], fill=(30, 80, 230))
    return picture


def side_by_side(pictures, path):
    """Save PIL images of one height left to right, 4 px of white between them, as one PNG."""
    sheet = Image.new("RGB", (sum(p.width for p in pictures) + 4 * (len(pictures) - 1), pictures[0].height), "white")
    x = 0
    for picture in pictures:
        sheet.paste(picture, (x, 0))
        x += picture.width + 4
    sheet.save(path)
    return path


def save_frames(images, folder):
    """Save [N, 3, H, W] images as FOLDER/frame-0000.png, frame-0001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(to_pil(images)):
        f.save(folder / f"frame-{k:04d}.png")
    return folder


def save_animation(images, path, *, fps=10.0):
    """Save [N, 3, H, W] images as a looping animation that plays forward then back: a GIF, or an MP4
    (H.264) through the `ffmpeg` executable when path ends in .mp4."""
    images = torch.cat([images, images.flip(0)[1:-1]])
    if Path(path).suffix == ".mp4":
        return _save_mp4(images, path, fps)
    frames = to_pil(images)
    frames[0].save(path, save_all=True, append_images=frames[1:], loop=0, duration=max(20, int(1000 / fps)))
    return path


def ffmpeg_missing_message():
    return ("--video mp4 needs the ffmpeg executable on PATH, and there is none: install it (e.g. `apt install "
            "ffmpeg`, `brew install ffmpeg` or `conda install -c conda-forge ffmpeg`), or use --video gif")


def _save_mp4(images, path, fps):
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError(ffmpeg_missing_message())
    array = to_uint8(images)
    height, width = array.shape[1:3]
    command = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",  # yuv420p needs even sides
               "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    result = subprocess.run(command, input=array.tobytes(), capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({' '.join(command)}): {result.stderr.decode(errors='replace')[-500:]}")
    return path
