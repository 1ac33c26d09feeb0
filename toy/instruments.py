"""Quality proxies for the toy world: the miniatures of CLIP score and FID (Sec. 4.1, Table 1).

The paper scores image quality with FID (Inception-v3 features) and text alignment with CLIP score.
Neither network exists here, and neither would mean much on 32 x 32 shapes, so the toy world uses a
small CNN trained on the toy data to read a picture's four attributes (shape, colour, background,
size):
  * `caption_accuracy(images01, captions)`: the fraction of images whose every attribute named in
    their caption is what the classifier sees (and the per-attribute fractions). A CLIP-score *proxy*.
  * `frechet_distance(features_a, features_b)`: the Frechet distance between Gaussians fitted to the
    classifier's penultimate features (`features(images01)`) of two image sets. An FID *proxy*: the
    same formula on other features, so its values are not comparable with FID's. Biased upward at small
    N (the plug-in covariances' noise adds to the trace term): only numbers at the same N compare.
  * `kid(features_a, features_b, groups_a)`: the kernel distance of Binkowski et al. (KID: the unbiased
    MMD^2 with the cubic kernel (x.y/d + 1)^3) on the same features, with a jackknife standard error.
    Unbiased in N, so a report of 24 strips and a table of 64 strips estimate the same number. A KID
    *proxy*, like the FID-proxy.
The classifier is a measuring instrument, not the model under test, so it is trained on every
(shape, colour, background) triple, held-out ones included: trained on the training triples only, it
learns shortcuts (red on blue is never a circle there) and reads the shape of held-out combinations at
chance. Its accuracy is measured on fresh images (other seeds) of the held-out triples.
`python -m toy pretrain` (or `python -m toy classifier`) trains it and writes
`assets/toy-classifier.safetensors`.

This module knows nothing of the toy world's vocabulary: the attribute heads ({name: class names}),
the training images and their labels come from toy/world.py (`world.HEADS`, `world.caption_accuracy`), which
imports this file, never the other way round.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

CLASSIFIER_PATH = Path(__file__).resolve().parents[1] / "assets" / "toy-classifier.safetensors"


class AttributeClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 pixels), global average and max pooling, a 128-d feature
    layer (the features of the Frechet distance) and one linear head per attribute. (Circle and square
    have the same area here, so shape is told by corners, which max pooling picks up and averages hide.)"""

    def __init__(self, heads, width=16, feature_dim=128):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * c_in, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in heads.items()})

    def features(self, images01):
        """Penultimate features [N, 128] of images in [0, 1], [N, 3, 32, 32]."""
        h = self.conv(images01 * 2 - 1)  # [N, C, 4, 4]
        return F.silu(self.fc(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)))

    def forward(self, images01):
        h = self.features(images01)
        return {name: head(h) for name, head in self.heads.items()}


def images01(images_uint8):
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float() / 255


def train_classifier(images_uint8, labels, heads, seed=0, steps=800, batch=64, lr=2e-3, noise=0.03):
    """The attribute classifier on uint8 images [N, H, W, 3] with labels {head: class indices [N]}.
    Each batch gets Gaussian pixel noise (std `noise`) so that the slightly grainy, soft-edged samples
    of the diffusion model read like the data."""
    torch.manual_seed(seed)
    x, y, n = images01(images_uint8), labels, len(images_uint8)
    model = AttributeClassifier(heads).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="classifier")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, n, (batch,), generator=g)
        xb = (x[idx] + noise * torch.randn(x[idx].shape, generator=g)).clamp(0, 1)
        logits = model(xb)
        loss = sum(F.cross_entropy(logits[name], y[name][idx]) for name in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save_classifier(model, path=CLASSIFIER_PATH):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path, heads):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the classifier with `python -m toy pretrain`.")
    model = AttributeClassifier(heads)
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(images01, classifier, batch=500):
    """{head: predicted class indices [N]} for images in [0, 1], [N, 3, 32, 32]."""
    out = {name: [] for name in classifier.heads}
    for i in range(0, len(images01), batch):
        for name, logits in classifier(images01[i:i + batch].float()).items():
            out[name].append(logits.argmax(1))
    return {name: torch.cat(v) for name, v in out.items()}


@torch.no_grad()
def features(images01, classifier, batch=500):
    """The classifier's penultimate features [N, 128] (float64 numpy) of images in [0, 1]."""
    return torch.cat([classifier.features(images01[i:i + batch].float())
                      for i in range(0, len(images01), batch)]).double().numpy()


def frechet_distance(features_a, features_b):
    """FID's formula on any features [N, D]: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    matrix S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues and needs no general matrix sqrt.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"expected two [N, D] feature arrays with the same D and N >= 2, got {a.shape} and {b.shape}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def polynomial_kernel(x, y):
    """KID's kernel k(x, y) = (x.y / d + 1)^3 between the rows of x [M, D] and y [N, D] -> [M, N]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(features_a, features_b, groups_a=None):
    """KID (the unbiased estimate of MMD^2 with the cubic kernel) between features a [M, D] (the samples)
    and b [N, D] (the real images), with its standard error.

    MMD^2_u = sum_{i != j} k(a_i, a_j) / (M (M-1)) + sum_{i != j} k(b_i, b_j) / (N (N-1))
              - 2 sum_{i, j} k(a_i, b_j) / (M N).
    Standard error: the jackknife, one sample set at a time (a two-sample U-statistic's variance is the
    sum of the two one-sample parts), deleting one GROUP of a at a time (`groups_a`: a label per row; the
    11 frames of one interpolation strip share prompt and noise, so they are not independent draws) and
    one row of b at a time (independent real images). Disjoint subsets (torchmetrics' way) would throw
    away the cross terms between subsets and need a subset size; the jackknife uses every pair and is
    O(M^2 + N^2 + M N) from three kernel sums.
    Returns {"kid", "se", "leave_out_a" (the estimate without each group of a, in group order),
    "leave_out_b" (without each row of b)}; the s.e. is NaN for a single group. Two models scored against the same real images with the
    same groups can be compared by `kid_difference`.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 3:
        raise ValueError(f"expected two [N, D] feature arrays with the same D and N >= 3, got {a.shape} and {b.shape}.")
    groups = np.arange(len(a)) if groups_a is None else np.asarray(groups_a)
    if groups.shape != (len(a),):
        raise ValueError(f"groups_a needs one label per row of a, got shape {groups.shape} for {len(a)} rows.")
    m, n = len(a), len(b)
    k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    np.fill_diagonal(k_aa, 0)
    np.fill_diagonal(k_bb, 0)
    s_aa, s_bb, s_ab = k_aa.sum(), k_bb.sum(), k_ab.sum()
    value = s_aa / (m * (m - 1)) + s_bb / (n * (n - 1)) - 2 * s_ab / (m * n)
    # Without group g of a (size c_g): the pairs inside the rest, the cross pairs of the rest.
    labels, index = np.unique(groups, return_inverse=True)
    if len(labels) < 2:  # one strip: no jackknife over the samples, so no standard error
        return {"kid": float(value), "se": float("nan"), "leave_out_a": [], "leave_out_b": []}
    c = np.bincount(index).astype(np.float64)
    by_group = np.zeros((len(labels), m))
    np.add.at(by_group, index, k_aa)  # row g: the sum of k_aa's rows in group g
    inside = np.bincount(index, weights=by_group[index, np.arange(m)])  # sum over i != j in the group (diagonal 0)
    row_aa, row_ab = np.bincount(index, weights=k_aa.sum(1)), np.bincount(index, weights=k_ab.sum(1))
    rest = m - c
    out_a = (s_aa - 2 * row_aa + inside) / (rest * (rest - 1)) + s_bb / (n * (n - 1)) - 2 * (s_ab - row_ab) / (rest * n)
    out_b = s_aa / (m * (m - 1)) + (s_bb - 2 * k_bb.sum(1)) / ((n - 1) * (n - 2)) - \
        2 * (s_ab - k_ab.sum(0)) / (m * (n - 1))
    return {"kid": float(value), "se": jackknife_se(out_a, out_b), "leave_out_a": out_a.tolist(),
            "leave_out_b": out_b.tolist()}


def jackknife_se(*leave_outs):
    """The jackknife standard error from leave-one-out estimates, one array per independent sample set:
    sqrt(sum over sets of (g-1)/g sum_k (theta_-k - mean)^2)."""
    var = sum((len(t) - 1) / len(t) * ((np.asarray(t) - np.mean(t)) ** 2).sum() for t in leave_outs)
    return float(np.sqrt(var))


def kid_difference(scored, reference):
    """KID(scored) - KID(reference) of two `kid` results measured against the same real images with
    paired groups (the same strips for both models): the difference, and its jackknife standard error
    from the paired leave-out estimates (deleting strip k from both, real image j from both), which
    removes what the two share (the real set, the prompts and noise pairs)."""
    for key in ("leave_out_a", "leave_out_b"):
        if len(scored[key]) != len(reference[key]):
            raise ValueError(f"kid_difference needs the same groups and real images for both models "
                             f"({key}: {len(scored[key])} vs {len(reference[key])}).")
    out = [np.subtract(scored[k], reference[k]) for k in ("leave_out_a", "leave_out_b")]
    diff = scored["kid"] - reference["kid"]
    return {"mean": float(diff), "se": jackknife_se(*out), "relative": float(diff / reference["kid"])
            if reference["kid"] else float("nan")}


def paired_difference(values, reference):
    """values - reference over paired samples (the same strips or images for both models): the mean
    difference, its standard error (sample std / sqrt(n)), n, and the mean difference relative to the
    reference's mean."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two equal-length lists of at least 2 paired values (the same strips or "
                         f"images for both models), got shapes {a.shape} and {b.shape}.")
    d = a - b
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "n": len(d),
            "relative": float(d.mean() / b.mean())}
