"""metrics.py: ISTD on frames with known steps, SSIM / PSNR against scikit-image, and LPIPS equal to
the `lpips` package (test-only oracle) on the same weights.

The oracle's lin layers are the real calibrated ones the `lpips` wheel ships (weights/v0.1/*.pth,
pickled on a CUDA machine); the ImageNet backbones cannot be downloaded here, so they are random,
saved in torchvision's own layout by torchvision's own `alexnet()` / `vgg16()`.
"""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics



def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- ISTD

def frames_with_steps(distances, shape=(3, 4, 4), seed=12):
    """Frames walking along one random unit direction with the given step lengths."""
    direction = randn(*shape, seed=seed)
    direction /= direction.norm()
    positions = np.concatenate([[0.0], np.cumsum(distances)])
    return torch.stack([0.5 + float(p) * direction / 100 for p in positions]).float()


def test_istd_is_the_population_std_of_adjacent_l2_distances():
    assert metrics.istd(frames_with_steps([2.0] * 10)) == pytest.approx(0.0, abs=1e-5)  # uniform steps
    distances = [1.0, 3.0, 1.0, 3.0, 2.0, 2.0, 5.0, 1.0, 1.0, 1.0]
    frames = frames_with_steps(distances)
    torch.testing.assert_close(metrics.adjacent_distances(frames),
                               torch.tensor(distances, dtype=torch.float64) / 100, rtol=1e-5, atol=0)
    assert metrics.istd(frames) == pytest.approx(np.std(distances) / 100, rel=1e-5)  # ddof = 0
    assert metrics.istd(frames) != pytest.approx(np.std(distances, ddof=1) / 100, rel=1e-3)


@pytest.fixture(scope="module")
def photos():
    skimage = pytest.importorskip("skimage")
    noise = np.random.default_rng(0)
    pairs = []
    for clean in (skimage.data.astronaut(), skimage.data.chelsea()):
        clean = clean[:128, :160].astype(np.float64) / 255
        noisy = np.clip(clean + noise.normal(0, 0.08, clean.shape), 0, 1)
        pairs.append((clean, noisy))
    blurred = np.asarray(Image.fromarray((pairs[0][0] * 255).astype(np.uint8)).resize((40, 32)).resize((160, 128)))
    pairs.append((pairs[0][0], blurred.astype(np.float64) / 255))
    return pairs


def as_tensor(image):
    return torch.from_numpy(image).permute(2, 0, 1)


def test_ssim_and_psnr_equal_scikit_image_on_photos(photos):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    for clean, other in photos:
        ref_ssim = structural_similarity(clean, other, channel_axis=2, data_range=1.0, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
        assert metrics.ssim(as_tensor(clean), as_tensor(other)).item() == pytest.approx(ref_ssim, rel=1e-6)
        ref_psnr = peak_signal_noise_ratio(clean, other, data_range=1.0)
        assert metrics.psnr(as_tensor(clean), as_tensor(other)).item() == pytest.approx(ref_psnr, rel=1e-9)
        assert metrics.mse(as_tensor(clean), as_tensor(other)).item() == pytest.approx(np.mean((clean - other) ** 2))
    batch = torch.stack([as_tensor(p[1]) for p in photos[:2]]), torch.stack([as_tensor(p[0]) for p in photos[:2]])
    assert metrics.ssim(*batch).shape == (2,) and metrics.psnr(*batch).shape == (2,)


# ---------------------------------------------------------------------------------------------- LPIPS

ORACLE_DIR = Path(sys.prefix) / "lpips-oracle"  # `make test`: pip install --no-deps --target there


def import_oracle():
    """(lpips, torchvision.models), imported from ORACLE_DIR.

    torchvision is kept out of the venv: transformers and diffusers import it whenever they can find
    it, and its package __init__ loads C++ ops built for another torch than ours, which fails. LPIPS
    needs only torchvision's pure-Python model definitions, so those are imported beneath an empty
    `torchvision` package, and afterwards ORACLE_DIR and `torchvision` are taken off sys.path and
    sys.modules again (lpips keeps its references), so that nothing else can find them."""
    if "oracle" not in _ORACLE:
        if not (ORACLE_DIR / "lpips").is_dir():
            pytest.fail(f"the LPIPS test oracle is missing from {ORACLE_DIR}: run `make test`, which installs "
                        "torchvision and lpips there with pip --no-deps --target")
        sys.path.insert(0, str(ORACLE_DIR))
        package = types.ModuleType("torchvision")
        package.__path__ = [str(ORACLE_DIR / "torchvision")]
        sys.modules["torchvision"] = package
        try:
            import lpips
            import torchvision.models
            _ORACLE["oracle"] = lpips, torchvision.models
        finally:
            sys.path.remove(str(ORACLE_DIR))
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    return _ORACLE["oracle"]


_ORACLE = {}


@pytest.fixture(scope="module", params=["alex", "vgg"])
def oracle_and_files(request, tmp_path_factory):
    """(net, lpips.LPIPS oracle, torchvision backbone file, the lpips package's lin file)."""
    net = request.param
    lpips, tv = import_oracle()
    folder = tmp_path_factory.mktemp(net)
    torch.manual_seed(0)
    backbone = (tv.alexnet if net == "alex" else tv.vgg16)()
    features = {k: v for k, v in backbone.state_dict().items() if k.startswith("features.")}
    torch.save(backbone.state_dict() if net == "alex" else features, folder / "backbone.pth")  # alex: + classifier
    oracle = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)  # real lin weights
    for name, slice_ in oracle.net.named_children():  # net.sliceK.<torchvision index>
        for index, layer in slice_.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.data.copy_(features[f"features.{index}.weight"])
                layer.bias.data.copy_(features[f"features.{index}.bias"])
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return net, oracle.eval(), folder / "backbone.pth", lin_file


def test_equals_lpips_package(oracle_and_files):
    net, oracle, backbone_file, lin_file = oracle_and_files
    ours = metrics.load_lpips([lin_file, backbone_file])  # any order; net read from the weights
    assert ours.net == net
    g = torch.Generator().manual_seed(1)
    for size in (32, 48):
        x, y = torch.rand(3, 3, size, size, generator=g), torch.rand(3, 3, size, size, generator=g)
        y[0] = x[0] + 0.02 * torch.randn(3, size, size, generator=g)  # one near pair, two far pairs
        expected = oracle(x, y, normalize=True).flatten()  # normalize: inputs in [0, 1]
        got = ours(x, y)
        assert got.shape == (3,)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        assert got[0] < got[1:].min()  # the measured pairs differ, so equality above is not trivial
        torch.testing.assert_close(metrics.lpips(ours, x, y), expected.mean(), rtol=1e-5, atol=1e-7)


def test_reads_a_whole_lpips_state_dict(oracle_and_files, tmp_path):
    net, oracle, _, _ = oracle_and_files
    # net.sliceK.N.*, linK.model.1.weight and its alias lins.K.model.1.weight, scaling_layer.*
    torch.save(oracle.state_dict(), tmp_path / "lpips.pth")
    ours = metrics.load_lpips(tmp_path / "lpips.pth")
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ours(x, y), oracle(x, y, normalize=True).flatten(), rtol=1e-5, atol=1e-7)


def test_distance_is_zero_on_equal_images_and_symmetric(oracle_and_files):
    _, _, backbone_file, lin_file = oracle_and_files
    ours = metrics.load_lpips([backbone_file, lin_file])
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert ours(x, x).abs().max() == 0
    torch.testing.assert_close(ours(x, y), ours(y, x))


def test_incomplete_or_wrong_weights_say_what_to_pass(oracle_and_files, tmp_path):
    net, _, backbone_file, lin_file = oracle_and_files
    with pytest.raises(ValueError, match=r"missing lins\.0\.weight.*lin layers"):
        metrics.load_lpips(backbone_file)
    with pytest.raises(ValueError, match="no LPIPS backbone"):
        metrics.load_lpips(lin_file)
    other = metrics.load_lpips([backbone_file, lin_file])
    with pytest.raises(ValueError, match="do not fit"):  # the other network's lin layers
        metrics.load_lpips([backbone_file, lin_file.with_name("vgg.pth" if net == "alex" else "alex.pth")])
    with pytest.raises(ValueError, match=f"at least {metrics.MIN_SIZE[net]} px"):
        small = torch.rand(1, 3, metrics.MIN_SIZE[net] - 1, metrics.MIN_SIZE[net] - 1)
        metrics.lpips(other, small, small)


def test_sampler_invert_reports_lpips(tiny_sd, tmp_path):
    """`sampler.py invert --lpips-weights` adds LPIPS beside MSE/PSNR/SSIM; without it, nothing is needed."""
    import checkpoint
    from demos import media
    import sampler
    from demos import cli as sampler_cli
    lpips, tv = import_oracle()
    torch.manual_seed(0)
    torch.save(tv.alexnet().state_dict(), tmp_path / "alexnet.pth")
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    folder, _ = tiny_sd
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "in.png")
    args = ["invert", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--prompt", "a cat",
            "--steps", "2", "--inversion", "ddim", "--width", "32", "--height", "32"]
    sampler_cli.main(args + ["--out", str(tmp_path / "a"), "--lpips-weights", str(lin_file), str(tmp_path / "alexnet.pth")])
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert report["lpips_net"] == "alex" and report["reconstruction"]["lpips"] > 0
    # The VAE row is deterministic (posterior mean): recompute it here.
    models = checkpoint.load_models(folder)
    image = media.load_image01(tmp_path / "in.png", 32, 32)
    vae_recon = sampler.decode_latents(models.vae, sampler.encode_images(models.vae, image))
    expected = metrics.lpips(metrics.load_lpips([tmp_path / "alexnet.pth", lin_file]), vae_recon, image)
    assert report["vae_reconstruction"]["lpips"] == pytest.approx(expected.item(), rel=1e-5)

    sampler_cli.main(args + ["--out", str(tmp_path / "b")])
    report = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "lpips" not in report["reconstruction"] and report["lpips_net"].startswith("skipped")
    with pytest.raises(SystemExit, match="missing lins"):  # a bad file fails before any inversion
        sampler_cli.main(args + ["--out", str(tmp_path / "c"), "--lpips-weights", str(tmp_path / "alexnet.pth")])
