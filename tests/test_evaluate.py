"""`sampler.py evaluate` (Table 1): our FID / KID / CLIP score against torchmetrics' own calls on the same
images (small random feature and CLIP weights made here), resuming, the paired statistics on synthetic data
with a known answer, and the one-line errors for missing extras and weights."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from conftest import TINY_WORDS
from demos import evaluate
from toy import instruments, pretrain, world

torchmetrics = pytest.importorskip("torchmetrics")  # requirements-dev.txt installs it


class TinyFeatures(nn.Module):
    """A random stand-in for Inception: uint8 images [B, 3, H, W] -> features [B, 8]."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 5, stride=2)
        self.fc = nn.Linear(16, 8)

    def forward(self, images):
        h = torch.tanh(self.conv(images.float() / 127.5 - 1))
        return self.fc(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


def blobs(n, seed, size=32):
    """n smooth random uint8 images [n, 3, size, size]: upsampled 4x4 noise (varied, like pictures, not pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(small, size=size, mode="bilinear") * 255).round().to(torch.uint8)


def write_pngs(images, folder, name=evaluate.image_file):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        file = name(folder.parent, k) if name else folder / f"{k:03d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(file)


def make_tiny_clip(folder, seed=0):
    """A tiny random transformers CLIP + processor saved with save_pretrained (as a --clip-model folder). The
    final layer norms share a bias and the two projections a matrix, so that images and captions get positive
    cosines of varied size (a random CLIP gives negative ones, which CLIP score clamps to 0)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocabulary = pretrain.write_clip_tokenizer(folder / "_tok", TINY_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(vocabulary, model_max_length=77)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        shared = torch.randn(32) * 4
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


CAPTIONS = ["a red circle", "a blue square on a red background", "a photo of a cat", "a dog", "a blue circle",
            "a red dog on a blue background", "a square", "a photo of a red square"]


# --------------------------------------------------------------- equal to the library's own call

def test_fid_and_kid_equal_torchmetrics_called_on_the_same_images(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = blobs(40, seed=1), blobs(50, seed=2) // 2 + 60  # two different distributions
    write_pngs(fake, tmp_path / "out" / "images")
    write_pngs(real, tmp_path / "real", name=None)
    files, reference = evaluate.folder_images(tmp_path / "real", batch=7)
    tools = evaluate.Instruments(TinyFeatures(), lambda images, captions: [0.0] * len(images), "clip_score",
                                       reference, {})
    plan = evaluate.Plan(CAPTIONS, num_images=40, istd_prompts=0, frames=11, steps=50, guidance=7.5, seed=3,
                         batch_size=8)
    ours = evaluate.measure(tmp_path / "out", plan, tools, 32, 32)

    library_fid = FrechetInceptionDistance(feature=TinyFeatures())
    library_kid = KernelInceptionDistance(feature=TinyFeatures(), subsets=evaluate.KID_SUBSETS, subset_size=40)
    for metric in (library_fid, library_kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    torch.manual_seed(3)  # KID draws its subsets from torch's generator; ours seeds it with --seed
    kid_mean, kid_std = library_kid.compute()
    assert ours["fid"] == pytest.approx(library_fid.compute().item(), rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(kid_mean.item(), rel=1e-5)
    assert ours["kid_std"] == pytest.approx(kid_std.item(), rel=1e-4)  # the library keeps float32 features
    assert ours["fid"] > 0.01 and (ours["num_images"], ours["num_reference"], ours["kid_subset_size"]) == (40, 50, 40)


def test_toy_fid_is_the_frechet_distance_of_toy_instruments_on_the_same_features():
    fake, real = blobs(60, seed=4), blobs(80, seed=5)
    features = evaluate.ToyFeatures(world.load_classifier())
    a, b = features(fake).double(), features(real).double()
    ours = evaluate.fid(a, b)
    assert ours == pytest.approx(instruments.frechet_distance(
        instruments.features(fake.float() / 255, world.load_classifier()),
        instruments.features(real.float() / 255, world.load_classifier())), rel=1e-6)


def test_clip_score_equals_torchmetrics_and_the_cosine_of_clip_embeddings(tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = make_tiny_clip(tmp_path / "clip")
    images = blobs(len(CAPTIONS), seed=6)
    ours = evaluate.clip_score(evaluate.clip_loader(str(folder)))(images, CAPTIONS)

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():  # CLIP score by hand: 100 cos(image embedding, caption embedding), clamped at 0
        e_image = model.get_image_features(**processor(images=list(images), return_tensors="pt")).pooler_output
        e_text = model.get_text_features(**processor(text=CAPTIONS, return_tensors="pt", padding=True)).pooler_output
    cosine = torch.nn.functional.cosine_similarity(e_image, e_text)
    assert cosine.min() > 0.05 and cosine.max() - cosine.min() > 0.05  # positive and varied: nothing clamped
    np.testing.assert_allclose(ours, (100 * cosine).tolist(), rtol=1e-4)

    library = CLIPScore(model_name_or_path=evaluate.clip_loader(str(folder)))
    library.update(images, CAPTIONS)  # the library's own call on the whole batch: the mean
    assert np.mean(ours) == pytest.approx(library.compute().item(), rel=1e-5)


# ------------------------------------------------------------------------------------- resuming

def toy_evaluate(out, *extra):
    from demos import cli

    return cli.main(["evaluate", "--out", str(out), "--steps", "4", "--num-images", "10", "--batch-size", "4",
                     "--istd-prompts", "2", "--frames", "3", *extra])


def test_a_resumed_evaluation_writes_the_metrics_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    toy_evaluate(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())

    saved, real_save = [], evaluate.save_png

    def interrupted_save(images, path):  # killed after 6 images: blocks [0..3] done, [4..7] half written
        if len(saved) == 6:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(images, path)
    monkeypatch.setattr(evaluate, "save_png", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        toy_evaluate(tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(evaluate, "save_png", lambda images, path: (saved.append(path), real_save(images, path)))
    toy_evaluate(tmp_path / "resumed")
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed == whole
    resampled = [p.name for p in saved[6:]]  # the half-written block again, then what was never sampled
    assert resampled == [f"{k:06d}.png" for k in range(4, 10)] + ["000000.png", "000001.png"]
    assert whole["num_images"] == 10 and len(whole["per_image_caption_accuracy"]) == 10
    assert len(whole["per_prompt_istd"]) == 2 and whole["istd"] > 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ISTD")][-1]
    assert "FID" in line and "caption accuracy" in line and str(tmp_path / "resumed" / "metrics.json") in line


def test_an_out_folder_of_other_settings_is_refused(tmp_path, capsys):
    toy_evaluate(tmp_path / "out")
    with pytest.raises(SystemExit) as error:
        toy_evaluate(tmp_path / "out", "--guidance", "3")
    assert str(error.value).startswith("sampler.py: error: ") and "guidance 7.5 -> 3.0" in str(error.value)


def test_compare_pairs_two_toy_evaluations(tmp_path, capsys):
    toy_evaluate(tmp_path / "a")
    toy_evaluate(tmp_path / "b", "--guidance", "3", "--compare", str(tmp_path / "a"), "--bootstrap", "5")
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    result = b["compare"]
    assert result["istd"]["mean"] == pytest.approx(b["istd"] - a["istd"])
    assert result["fid"]["mean"] == pytest.approx(b["fid"] - a["fid"])
    assert result["caption_accuracy"]["n"] == 10 and result["fid"]["replicates"] == 5
    assert "paired vs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:  # other seeds: not pairs
        toy_evaluate(tmp_path / "c", "--seed", "1", "--compare", str(tmp_path / "a"))
    assert "seed" in str(error.value) and not (tmp_path / "c").exists()


def test_a_real_model_with_lora_against_its_base_end_to_end(tiny_sd, tmp_path, monkeypatch, capsys):
    """The Inception / CLIP path on a tiny random SD with a LoRA and --compare-base: the tiny CLIP folder, a
    folder of real images of another size and shape, and TinyFeatures standing in for the Inception (the real
    one needs torch-fidelity and its weights file; loading that file is all `evaluate.inception` adds)."""
    import checkpoint
    import lora
    from demos import cli

    models = checkpoint.load_models(tiny_sd[0])
    with torch.no_grad():  # the up matrices start at zero; make the LoRA change the UNet
        for k, p in enumerate(lora.inject_lora(models.unet, rank=2)):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + k)))
    lora.save_lora(models.unet, tmp_path / "lora.safetensors")
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS[:5]) + "\n")
    (tmp_path / "real").mkdir()
    for k, image in enumerate(blobs(12, seed=7, size=24)):  # 24 x 20: center-cropped to 20 x 20, resized to 16
        Image.fromarray(image.permute(1, 2, 0).numpy()[:, :20]).save(tmp_path / "real" / f"{k:02d}.jpg")
    (tmp_path / "inception.pth").write_bytes(b"")
    monkeypatch.setattr(evaluate, "inception", lambda weights_file, device="cpu": TinyFeatures())
    common = ["--model", str(tiny_sd[0]), "--steps", "2", "--seed", "5"]
    cli.main(["evaluate", *common, "--lora", str(tmp_path / "lora.safetensors"), "--compare-base",
              "--prompts-file", str(tmp_path / "prompts.txt"), "--reference-images", str(tmp_path / "real"),
              "--clip-model", str(make_tiny_clip(tmp_path / "clip")), "--inception-weights",
              str(tmp_path / "inception.pth"), "--num-images", "6", "--batch-size", "4", "--frames", "3",
              "--bootstrap", "3", "--out", str(tmp_path / "out")])
    smooth, base = (json.loads((tmp_path / folder / "metrics.json").read_text()) for folder in ("out", "out/base"))
    assert (smooth["lora"], base["lora"]) == (str(tmp_path / "lora.safetensors"), None)
    assert (smooth["num_images"], smooth["num_reference"], smooth["istd_prompts"]) == (6, 12, 5)
    assert len(smooth["per_image_clip_score"]) == 6 and smooth["clip_score"] > 0
    assert smooth["compare"]["fid"]["mean"] == pytest.approx(smooth["fid"] - base["fid"])
    assert smooth["compare"]["istd"]["n"] == 5 and "paired vs" in capsys.readouterr().out
    # image k is `generate --seed SEED+k` with prompt k mod P; the LoRA changed it
    cli.main(["generate", *common, "--seed", "6", "--prompt", CAPTIONS[1], "--lora",
              str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "generate")])
    image_1, base_1 = (np.asarray(Image.open(evaluate.image_file(tmp_path / folder, 1)), dtype=np.float64)
                       for folder in ("out", "out/base"))
    generated = np.asarray(Image.open(tmp_path / "generate" / "sample.png"), dtype=np.float64)
    assert np.abs(image_1 - generated).max() <= 1 and np.abs(image_1 - base_1).mean() > 1


# --------------------------------------------------------------------- paired statistics, known answers

def synthetic_evaluation(folder, generated, reference, per_prompt_istd, per_image_score):
    folder.mkdir(parents=True)
    report = {"text_metric": "clip_score", "istd_prompts": len(per_prompt_istd), "per_prompt_istd": per_prompt_istd,
              "per_prompt_mean_adjacent_distance": per_prompt_istd, "per_image_clip_score": per_image_score}
    (folder / "metrics.json").write_text(json.dumps(report))
    save_file({"generated": generated, "reference": reference}, str(folder / "features.safetensors"))


def test_paired_differences_on_synthetic_data_with_a_known_answer(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, m, shift = 300, 400, torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    fake_b = torch.randn(n, 4, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0.5, 0.0, 0.0])
    real = torch.randn(m, 4, generator=g, dtype=torch.float64)
    fake_a = fake_b + shift  # model A's image k = model B's image k, moved by `shift` in feature space
    # per-prompt / per-image differences with mean 0.25 (ISTD) and -1 (CLIP) and known spread
    z = np.random.default_rng(0).standard_normal(50)
    z = (z - z.mean()) / z.std(ddof=1)
    base = np.random.default_rng(1).uniform(1, 2, 50)
    synthetic_evaluation(tmp_path / "a", fake_a, real, list(base + 0.25 + 0.1 * z), list(30 + base - 1 + 2 * z))
    synthetic_evaluation(tmp_path / "b", fake_b, real, list(base), list(30 + base))
    result = evaluate.compare(tmp_path / "a", tmp_path / "b", replicates=10, seed=0)

    assert result["istd"]["mean"] == pytest.approx(0.25) and result["istd"]["se"] == pytest.approx(0.1 / np.sqrt(50))
    assert result["clip_score"]["mean"] == pytest.approx(-1)
    assert result["clip_score"]["se"] == pytest.approx(2 / np.sqrt(50))
    # A shift changes no covariance, so FID(A) - FID(B) = |mu_B + shift - mu_R|^2 - |mu_B - mu_R|^2, and over
    # resamples 2 shift.(mu_B* - mu_R*) + |shift|^2, whose standard error is 2 sqrt(shift'(S_B/n + S_R/m) shift).
    gap = fake_b.mean(0) - real.mean(0)
    assert result["fid"]["mean"] == pytest.approx((2 * shift @ gap + shift @ shift).item(), rel=1e-6)
    cov = lambda x: torch.cov(x.T, correction=0)  # noqa: E731
    se = 2 * torch.sqrt(shift @ (cov(fake_b) / n + cov(real) / m) @ shift).item()
    assert evaluate.paired_bootstrap(evaluate.fid, fake_a, fake_b, real, replicates=400)["se"] == pytest.approx(
        se, rel=0.15)  # 400 replicates: the bootstrap's SE is itself known to ~4% (unpaired: 2.5x larger)
    assert result["kid"]["mean"] == pytest.approx(evaluate.kid(fake_a, real)[0] - evaluate.kid(fake_b, real)[0])


def test_identical_models_differ_by_zero_with_zero_standard_error(tmp_path):
    features = torch.randn(30, 4, dtype=torch.float64)
    for name in "ab":
        synthetic_evaluation(tmp_path / name, features[:20], features[20:], [1.0, 2.0, 3.0], [30.0, 31.0, 32.0])
    result = evaluate.compare(tmp_path / "a", tmp_path / "b", replicates=20)
    for key in ("istd", "clip_score", "fid", "kid"):
        assert result[key]["mean"] == 0 and result[key]["se"] == 0, key


# ------------------------------------------------------------------------------ one-line errors

def assert_one_line_error(error, *needles):
    message = str(error.value)
    assert message.startswith("sampler.py: error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_missing_extras_name_the_install_command(tmp_path, monkeypatch):
    from demos import cli

    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed
    with pytest.raises(SystemExit) as error:
        cli.main(["evaluate", "--out", str(tmp_path / "out")])
    assert_one_line_error(error, "pip install -r requirements-eval.txt")
    assert not (tmp_path / "out").exists()


def test_missing_inception_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    from demos import cli

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    (tmp_path / "real").mkdir()
    args = ["evaluate", "--model", str(tmp_path / "model"), "--prompts-file", str(tmp_path / "prompts.txt"),
            "--reference-images", str(tmp_path / "real"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as error:
        cli.main(args + ["--inception-weights", str(tmp_path / "nope.pth")])
    assert_one_line_error(error, evaluate.INCEPTION_URL, str(tmp_path / "nope.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as error:
        cli.main(args)
    assert_one_line_error(error, evaluate.INCEPTION_URL, str(tmp_path / "hub" / "checkpoints" /
                                                            "weights-inception-2015-12-05-6726825d.pth"))
    assert not (tmp_path / "out").exists()


def test_a_missing_clip_model_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        evaluate.clip_loader(str(tmp_path / "no-clip"))
    assert "no such folder" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        evaluate.clip_loader(str(tmp_path / "empty"))()
    assert "cannot load a CLIP model" in str(error.value) and "\n" not in str(error.value)
