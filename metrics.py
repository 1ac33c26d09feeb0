"""The metrics of Smooth Diffusion's evaluation: ISTD (Sec. 4.1) and Table 2's MSE / PSNR / SSIM / LPIPS.

All take images in [0, 1] as float tensors, [C, H, W] or [N, C, H, W].
  * `istd(frames)`: the standard deviation of the L2 distances between adjacent frames of one
    interpolation strip (`adjacent_distances`). The strips themselves, sampled with the paper's
    protocol, come from `sampler.interpolation_strips` / `sampler.evaluate_istd`.
  * `mse`, `psnr`, `ssim`: the reconstruction metrics, equal to scikit-image's (tests/test_metrics.py).
  * `LPIPS`, `load_lpips`, `lpips`: LPIPS (Zhang et al. 2018), below.

LPIPS compares two images through an ImageNet network: at five depths it normalises each pixel's
feature vector to unit length, squares the difference of the two images' vectors, weighs the
channels with a learned non-negative 1x1 "lin" layer, averages over the pixels, and sums the depths:

    d(x, y) = sum_l mean_hw  w_l . ( f_l(x)/||f_l(x)|| - f_l(y)/||f_l(y)|| )^2

This project downloads nothing, so the user brings the two weight files (`load_lpips`):
- the backbone, torchvision's ImageNet `alexnet` (default LPIPS) or `vgg16` file, whose `features.N.*`
  keys are used as they are (its `classifier.*` is not needed and ignored);
- the lin layers, the `lpips` package's `weights/v0.1/alex.pth` (or `vgg.pth`): keys `linK.model.1.weight`.
A single file holding a whole `lpips.LPIPS(...).state_dict()` (`net.sliceK.N.*` + `linK.*`) works too.
Pickled files are read with `torch.load(weights_only=True)` (`checkpoint.read_state_dict`).

Proven equal to the `lpips` package on the same weights (the real lin files it ships, random
backbones): `python -m pytest -q tests/test_metrics.py`.
"""
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import checkpoint


# ---------------------------------------------------------------------------------- ISTD (Sec. 4.1)

def adjacent_distances(frames):
    """L2 distances between consecutive frames, [N - 1], frames [N, C, H, W]."""
    return (frames[1:] - frames[:-1]).flatten(1).double().norm(dim=1)


def istd(frames):
    """ISTD (Sec. 4.1): the standard deviation of the L2 distances between adjacent frames.

    frames: [N, C, H, W] in [0, 1] (float, not uint8). The paper leaves the pixel range and the kind of
    standard deviation open. [0, 1] pixels give distances of the size the paper reports (tens at
    512 x 512: ||d|| = 887 x the per-pixel RMS difference), whereas 0-255 would be ~255x larger.
    We use the population standard deviation (ddof = 0, numpy's default): the N - 1 distances are
    the whole set being described, not a sample; the sample std (ddof = 1) is sqrt(10/9) = 1.054x
    larger for 11 frames.
    """
    return adjacent_distances(frames).std(correction=0).item()


# ------------------------------------------------------------------- reconstruction (Table 2)

def _per_image(values, like):
    """Reduce [N, ...] per-pixel values to [N] per-image means ([] for a single [C, H, W] image)."""
    return values.flatten(1).mean(1) if like.ndim == 4 else values.mean()


def mse(x, y):
    """Mean squared error of images in [0, 1]: [C, H, W] -> scalar tensor, [N, C, H, W] -> [N]."""
    return _per_image((x.double() - y.double()) ** 2, x)


def psnr(x, y, *, data_range=1.0):
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), per image."""
    return 10 * torch.log10(data_range ** 2 / mse(x, y))


def _gaussian_window(size, sigma):
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x, y, *, data_range=1.0, window=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03.

    Images in [0, 1], [C, H, W] or [N, C, H, W]; the SSIM map is averaged over the valid positions
    (no padding) and over channels. Returns a scalar tensor or [N].
    """
    single = x.ndim == 3
    x, y = (v.double()[None] if single else v.double() for v in (x, y))
    channels = x.shape[1]
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).to(x.device)

    def blur(v):  # local weighted mean, one channel at a time
        return F.conv2d(v, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    values = ssim_map.flatten(1).mean(1)
    return values[0] if single else values


# ------------------------------------------------------------------------------------------- LPIPS

# torchvision's `features` Sequential, layer by layer: (in, out, kernel, stride, padding) for a conv,
# "M" for its max-pool (AlexNet's pools are 3x3 stride 2, VGG's 2x2 stride 2); a ReLU follows each
# conv, so a conv at index i has its ReLU at i + 1. LPIPS reads the five ReLU outputs in `TAPS`.
LAYERS = {
    "alex": [(3, 64, 11, 4, 2), "M", (64, 192, 5, 1, 2), "M", (192, 384, 3, 1, 1), (384, 256, 3, 1, 1),
             (256, 256, 3, 1, 1)],
    "vgg": [(3, 64, 3, 1, 1), (64, 64, 3, 1, 1), "M", (64, 128, 3, 1, 1), (128, 128, 3, 1, 1), "M",
            (128, 256, 3, 1, 1), (256, 256, 3, 1, 1), (256, 256, 3, 1, 1), "M",
            (256, 512, 3, 1, 1), (512, 512, 3, 1, 1), (512, 512, 3, 1, 1), "M",
            (512, 512, 3, 1, 1), (512, 512, 3, 1, 1), (512, 512, 3, 1, 1)],
}
POOL = {"alex": 3, "vgg": 2}
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}  # conv1..conv5 (alex), relu{1_2..5_3} (vgg)
MIN_SIZE = {"alex": 31, "vgg": 16}  # smallest side whose last tap is not empty
# The fixed input normalisation of LPIPS v0.1, for images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """The LPIPS v0.1 distance with an `alex` or `vgg` backbone; parameter names follow torchvision."""

    def __init__(self, net="alex"):
        super().__init__()
        if net not in LAYERS:
            raise ValueError(f"LPIPS backbone must be one of {sorted(LAYERS)}, got {net!r}")
        self.net = net
        layers = []
        for spec in LAYERS[net]:
            if spec == "M":
                layers.append(nn.MaxPool2d(POOL[net], 2))
            else:
                c_in, c_out, kernel, stride, padding = spec
                layers += [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        widths = [m.out_channels for i, m in enumerate(layers) if i + 1 in TAPS[net]]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def taps(self, images):
        """The five unit-normalised feature maps of images in [-1, 1]."""
        x, taps = (images - self.shift) / self.scale, []
        for i, layer in enumerate(self.features[:TAPS[self.net][-1] + 1]):
            x = layer(x)
            if i in TAPS[self.net]:
                taps.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # eps as in LPIPS
        return taps

    def forward(self, images0, images1):
        """Images [N, 3, H, W] in [0, 1] -> LPIPS distance per image, [N]."""
        taps0, taps1 = self.taps(images0 * 2 - 1), self.taps(images1 * 2 - 1)
        return sum(lin((a - b) ** 2).mean((1, 2, 3)) for lin, a, b in zip(self.lins, taps0, taps1))


def _our_name(key):
    """A key of a torchvision backbone, an lpips lin file or a whole lpips state dict -> ours (or None)."""
    if re.fullmatch(r"features\.\d+\.(weight|bias)", key):  # torchvision
        return key
    if m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):  # lpips.LPIPS: net.sliceK.<index>
        return f"features.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"lin(\d)\.model\.\d\.weight", key):  # with or without the Dropout in front
        return f"lins.{m[1]}.weight"
    return None  # classifier.*, scaling_layer.*: not part of the distance


def load_lpips(paths, *, net=None, device="cpu"):
    """LPIPS from the user's weight files (one or more paths, any order); `net` is read from them if None."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    state = {}
    for path in paths:
        for key, value in checkpoint.read_state_dict(path).items():
            if (name := _our_name(key)) is not None:
                state[name] = value.float()
    if net is None:
        first = state.get("features.0.weight")
        if first is None:
            raise ValueError(f"no LPIPS backbone in {[str(p) for p in paths]}: pass torchvision's alexnet "
                             "(or vgg16) ImageNet weights beside the lpips lin file (weights/v0.1/alex.pth)")
        net = "alex" if first.shape[-1] == 11 else "vgg"
    model = LPIPS(net)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        need = ("the lin layers: the lpips package's weights/v0.1/" + ("alex" if net == "alex" else "vgg") + ".pth"
                if any(k.startswith("lins.") for k in missing) else f"torchvision's {net} ImageNet backbone")
        raise ValueError(f"LPIPS ({net}) weights incomplete: missing {', '.join(missing[:6])}"
                         f"{' ...' if len(missing) > 6 else ''} ({len(missing)} keys); pass {need}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # shapes of another network (e.g. vgg lins with an alex backbone)
        raise ValueError(f"LPIPS ({net}) weights do not fit: {error}") from None
    return model.to(device)


@torch.no_grad()
def lpips(model, images0, images1):
    """Mean LPIPS distance between two batches of images in [0, 1], [N, 3, H, W]."""
    if min(images0.shape[-2:]) < MIN_SIZE[model.net]:
        raise ValueError(f"LPIPS ({model.net}) needs images of at least {MIN_SIZE[model.net]} px, got "
                         f"{tuple(images0.shape[-2:])}: its pooled feature maps would be empty")
    return model(images0, images1).mean()
