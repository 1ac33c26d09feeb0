"""The toy world: the data generator, the committed tiny SD, the quality proxies, `python train.py`."""
import functools
import json
import signal

import numpy as np
import pytest
import torch

from toy import instruments, pretrain, report, world

# Measured on 1000 held-out real images (seed 7) by `python -m toy evaluate`; see test below.
CLASSIFIER_HELDOUT_ACCURACY = 1.0


def nearest_colour(rgb):
    return min(world.COLOURS, key=lambda name: np.abs(np.array(world.COLOURS[name]) - np.asarray(rgb, float)).sum())


def test_generator_is_deterministic_and_held_out_triples_never_appear_in_training():
    images, attributes = world.make_images(40, seed=3)
    again, attributes_again = world.make_images(40, seed=3)
    other, _ = world.make_images(40, seed=4)
    assert np.array_equal(images, again) and attributes == attributes_again
    assert not np.array_equal(images, other)
    assert all((a["shape"], a["colour"], a["background"]) not in world.HELDOUT for a in attributes)
    _, heldout = world.make_images(40, seed=3, split="heldout")
    assert all((a["shape"], a["colour"], a["background"]) in world.HELDOUT for a in heldout)
    train_words = {w for a in attributes for w in world.caption(a).split()}
    assert {w for p in world.heldout_prompts() for w in p.split()} <= train_words | set(world.SIZES)


def test_captions_match_the_pixels():
    images, attributes = world.make_images(60, seed=5)
    for image, a in zip(images, attributes):
        words = world.caption(a).split()
        shape_at = words.index(a["shape"])
        assert words[shape_at - 1] == a["colour"] and words[shape_at - 2] == a["size"]
        assert words[-2] == a["background"]
        corner = image[0, 0] if a["cx"] > 16 or a["cy"] > 16 else image[-1, -1]
        centre = image[int(a["cy"]), int(a["cx"])]  # the shape's centre (centroid for the triangle)
        assert nearest_colour(corner) == a["background"]
        assert nearest_colour(centre) == a["colour"]
        # The shape's area in pixels: those at least half-way from the background to the shape colour.
        contrast = np.abs(centre.astype(int) - corner.astype(int)).sum()
        covered = (np.abs(image.astype(int) - corner.astype(int)).sum(-1) > contrast / 2).sum()
        side = {"square": 1.76 * a["r"], "triangle": 1.2 * a["r"] * 3 ** 0.5}
        area, perimeter = {"circle": (np.pi * a["r"] ** 2, 2 * np.pi * a["r"]),
                           "square": (side["square"] ** 2, 4 * side["square"]),
                           "triangle": (3 ** 0.5 / 4 * side["triangle"] ** 2, 3 * side["triangle"])}[a["shape"]]
        assert abs(covered - area) <= 0.4 * perimeter + 2, (covered, area, a)
        assert world.SIZES[a["size"]][0] <= a["r"] <= world.SIZES[a["size"]][1]


def test_prepare_data_writes_the_caption_folder_that_train_reads(tmp_path):
    import data

    folder = world.prepare_data(tmp_path / "toy", n=6, seed=2)
    dataset = data.CaptionDataset(folder, world.RESOLUTION)
    images, attributes = world.make_images(6, seed=2)
    for i, a in enumerate(attributes):
        item = dataset[(i, i)]
        assert item["caption"] == world.caption(a)
        assert torch.equal(item["pixels"], pretrain.to_pixels(images[i:i + 1])[0])


def test_prepare_data_reuses_only_a_folder_that_this_toy_py_would_draw(tmp_path, monkeypatch):
    folder = world.prepare_data(tmp_path / "toy", n=4, seed=2)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert world.prepare_data(folder, n=4, seed=2) == folder  # the same images: reused
    with pytest.raises(ValueError, match="another toy_data.json"):
        world.prepare_data(folder, n=4, seed=3)  # other arguments
    monkeypatch.setitem(world.SIZES, "small", (4.0, 5.5))  # an older world.py drew smaller shapes
    with pytest.raises(ValueError, match="delete the folder"):
        world.prepare_data(folder, n=4, seed=2)
    (folder / world.DATA_RECORD).unlink()  # a folder of images without the record (e.g. an older version)
    with pytest.raises(ValueError, match="no toy_data.json"):
        world.prepare_data(folder, n=4, seed=2)
    assert {f.name: f.read_bytes() for f in folder.iterdir() if f.name != world.DATA_RECORD} == \
        {k: v for k, v in before.items() if k != world.DATA_RECORD}  # nothing was overwritten


def test_heldout_prompts_file_is_the_heldout_captions():
    lines = world.HELDOUT_PROMPTS.read_text().splitlines()
    assert lines == world.heldout_prompts() and len(lines) == 2 * len(world.HELDOUT)
    _, attributes = world.make_images(500, seed=0)
    assert not set(lines) & {world.caption(a) for a in attributes}


def test_tokenizer_folder_is_bpe_files_and_knows_every_toy_word():
    from transformers import CLIPTokenizer

    folder = world.MODEL_DIR / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    assert not (folder / "tokenizer.json").exists()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    ids = tokenizer("a small red circle on a blue background").input_ids
    assert len(ids) == 2 + 8  # start, one token per word, end


def test_committed_model_loads_and_generates_finite_images_of_the_right_size():
    import checkpoint

    size = sum(f.stat().st_size for f in world.MODEL_DIR.rglob("*") if f.is_file())
    assert size < 20e6
    models = checkpoint.load_models(world.MODEL_DIR)
    assert models.unet.config.cross_attention_dim == models.text_encoder.config.hidden_size
    images = report.generate(models, ["a small red circle on a blue background", ""], steps=4)
    assert images.shape == (2, 3, world.RESOLUTION, world.RESOLUTION)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_classifier_recognises_heldout_real_images():
    images, attributes = world.make_images(300, seed=11, split="heldout")
    accuracy = world.caption_accuracy(instruments.images01(images), [world.caption(a) for a in attributes])
    assert accuracy["caption"] >= CLASSIFIER_HELDOUT_ACCURACY - 0.03, accuracy


def test_caption_accuracy_fails_captions_that_name_the_wrong_attributes():
    images, attributes = world.make_images(100, seed=12, split="heldout")
    wrong = [world.caption({**a, "background": a["colour"], "colour": a["background"]}) for a in attributes]
    accuracy = world.caption_accuracy(instruments.images01(images), wrong)
    assert accuracy["colour"] < 0.1 and accuracy["background"] < 0.1 and accuracy["caption"] < 0.1
    assert world.parse_caption("a red circle on blue background") == dict(
        shape="circle", colour="red", background="blue")


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    shift = rng.normal(size=5)
    assert instruments.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert instruments.frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-8)
    # b = 2a + c: S_b = 4 S_a, so Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) = Tr(S_a) (1 + 4 - 4).
    b = 2 * a + shift
    expected = ((b.mean(0) - a.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert instruments.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_train_py_without_arguments_trains_control_and_smooth_lora_and_reports_the_pair(tmp_path, monkeypatch, capsys):
    import train

    folder = world.prepare_data(tmp_path / "data", n=8)
    quick = report.ReportProtocol(strips=3, steps=2, real=16, figure_strips=2, inversion_images=4)
    monkeypatch.setattr(report, "report", functools.partial(report.report, protocol=quick))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    args = ["--max-steps", "2", "--batch-size", "2", "--data", str(folder), "--out", str(tmp_path / "run")]
    try:  # the no-argument path, shortened: fewer steps and a local data/out folder
        assert train.main(args) == 0
        control_lora = tmp_path / "run" / "control" / "smooth_lora.safetensors"
        first_bytes = control_lora.read_bytes()
        mtime = control_lora.stat().st_mtime_ns
        assert train.main(args) == 0  # the same seeded command again: the control is reused, not retrained
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert control_lora.stat().st_mtime_ns == mtime and control_lora.read_bytes() == first_bytes
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(written["models"]) == ["control", "smooth"] and written["reference"] == "control"
    smooth, control = written["models"]["smooth"], written["models"]["control"]
    assert len(smooth["per_strip_istd"]) == 3 and np.isfinite(smooth["istd"]) and np.isfinite(smooth["fid_proxy"])
    d = np.array(smooth["per_strip_istd"]) - np.array(control["per_strip_istd"])
    assert smooth["istd_vs_control"]["mean"] == pytest.approx(d.mean())
    assert smooth["istd_vs_control"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    # The quality instrument (KID-proxy, jackknife s.e. over the 3 strips and the 16 real images) and
    # Table 2's DDIM inversion of 4 real held-out images, each paired with the control.
    assert len(smooth["kid_proxy"]["leave_out_a"]) == 3 and len(smooth["kid_proxy"]["leave_out_b"]) == 16
    assert smooth["kid_proxy_vs_control"]["mean"] == pytest.approx(smooth["kid_proxy"]["kid"] - control["kid_proxy"]["kid"])
    assert np.isfinite(smooth["kid_proxy"]["se"]) and smooth["kid_proxy"]["se"] > 0
    psnr = [np.array(m["ddim_inversion"]["per_image"]["psnr"]) for m in (smooth, control)]
    assert len(psnr[0]) == 4 and smooth["ddim_inversion_psnr_vs_control"]["mean"] == pytest.approx((psnr[0] - psnr[1]).mean())
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("ISTD on held-out prompts")][-1]
    assert "FID-proxy" in line and "KID-proxy" in line and "DDIM inversion PSNR" in line and "4 real held-out images" in line
    from PIL import Image
    figure = Image.open(tmp_path / "run" / "interpolation_before_after.png")  # 2 strips x 2 models, 4x frames
    assert figure.size[1] == 2 * 2 * 4 * world.RESOLUTION and figure.size[0] > 11 * 4 * world.RESOLUTION
    # The control is the same run with lambda 0 (and no validation strips): its config differs only there.
    c = torch.load(tmp_path / "run" / "control" / "state.pt", weights_only=True)["config"]
    s = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["config"]
    assert {k for k in c if c[k] != s[k]} == {"lambda_reg", "out", "validate_every"} and c["lambda_reg"] == 0.0


def test_paired_statistics_of_synthetic_strips_have_the_known_answer():
    """Strips whose frames move by known steps: ISTD is the std of those steps, and the paired
    difference of two models is the mean and standard error of the per-strip ISTD differences."""
    def strip(steps):  # frames 0, s1, s1 + s2, ... along one pixel axis: adjacent distances = steps
        positions = np.concatenate([[0.0], np.cumsum(steps)])
        frames = torch.zeros(len(positions), 1, 2, 2, dtype=torch.float64)
        frames[:, 0, 0, 0] = torch.tensor(positions)
        return frames

    uniform = [strip([0.1] * 10), strip([0.2] * 10), strip([0.05] * 10)]  # ISTD 0: perfectly smooth
    jumpy = [strip([0.0] * 9 + [1.0]), strip([0.1] * 8 + [0.5, 0.5]), strip([0.3, 0.0] * 5)]
    want_jumpy = [np.std([0.0] * 9 + [1.0]), np.std([0.1] * 8 + [0.5, 0.5]), 0.15]
    images = torch.zeros(1, 3, world.RESOLUTION, world.RESOLUTION)  # scores need real features; values irrelevant
    real = instruments.features(images.repeat(4, 1, 1, 1) + torch.rand(4, 1, 1, 1), world.load_classifier())

    def scores(strips):  # ISTD only depends on distances, so pad the tiny frames into full-size images
        full = torch.zeros(len(strips), 11, 3, world.RESOLUTION, world.RESOLUTION, dtype=torch.float64)
        for k, s in enumerate(strips):
            full[k, :, 0, :2, :2] = s[:, 0]
        return report.score_strips(full.float(), world.heldout_prompts(), real)

    a, b = scores(jumpy), scores(uniform)
    np.testing.assert_allclose(a["per_strip_istd"], want_jumpy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b["per_strip_istd"], [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(b["per_strip_mean_adjacent_distance"], [0.1, 0.2, 0.05], rtol=1e-5)
    np.testing.assert_allclose(a["per_strip_relative_istd"], np.array(want_jumpy) / [0.1, 0.18, 0.15], rtol=1e-5)
    twice = scores([strip([0.6, 0.0] * 5)])  # the third jumpy strip with every step doubled: ISTD doubles,
    assert twice["per_strip_istd"][0] == pytest.approx(2 * want_jumpy[2], rel=1e-5)  # its ratio does not
    assert twice["per_strip_relative_istd"][0] == pytest.approx(a["per_strip_relative_istd"][2], rel=1e-5)
    d = instruments.paired_difference(b["per_strip_istd"], a["per_strip_istd"])
    diffs = -np.array(want_jumpy)
    assert d["n"] == 3 and d["mean"] == pytest.approx(diffs.mean(), rel=1e-5)
    assert d["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3), rel=1e-5)
    assert d["relative"] == pytest.approx(-1.0, rel=1e-5)  # all of the jumpy model's ISTD is gone
    with pytest.raises(ValueError, match="equal-length"):
        instruments.paired_difference([1.0, 2.0], [1.0])


def test_pretrain_is_seeded_byte_for_byte_and_writes_a_loadable_model(tmp_path, monkeypatch):
    """`python -m toy pretrain` at a tiny size, twice: identical files (the full-size command reproduced
    the committed assets/toy-sd byte for byte, 27 min on CPU), loadable like SD-1.5."""
    import checkpoint

    monkeypatch.setattr(pretrain, "train_classifier", lambda seed: None)  # its own test is above
    monkeypatch.setattr(instruments, "save_classifier", lambda model: None)
    monkeypatch.setattr(pretrain, "HELDOUT_PROMPTS", tmp_path / "prompts.txt")
    cfg = pretrain.PretrainConfig(images=64, vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8, warmup=1)
    pretrain.pretrain(tmp_path / "a", cfg)
    pretrain.pretrain(tmp_path / "b", cfg)
    files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3  # unet, vae, text encoder
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    models = checkpoint.load_models(tmp_path / "a")
    images = report.generate(models, ["a small red circle on a blue background"], steps=2)
    assert images.shape == (1, 3, world.RESOLUTION, world.RESOLUTION) and torch.isfinite(images).all()
