"""tables.py: the statistics, the run flags, batched ISTD against sampler.evaluate_istd, the markdown, and
the whole --quick pipeline on a tiny random SD (training stubbed; one real train.py run checks the
subprocess and its cache)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import sampler
import tables
import toy
import train
from conftest import perturb_


def test_paired_difference_is_the_mean_and_standard_error_of_the_differences():
    d = tables.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4
    assert d["n"] == 3 and d["mean"] == pytest.approx(3.0)
    assert d["se"] == pytest.approx(1.0 / np.sqrt(3))  # sample std 1 over sqrt(3)
    # Pairing matters: a shift common to both sides cancels, however spread the values are.
    shifted = tables.paired_difference([10.0, -50.0, 80.0, 3.0], [9.0, -51.0, 79.0, 2.0])
    assert shifted["mean"] == pytest.approx(1.0) and shifted["se"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="paired"):
        tables.paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("name", list(tables.RUNS))
def test_every_run_is_the_toy_defaults_plus_only_its_own_flags(name):
    cfg, _ = train.parse_args(["--model", "m", "--data", "d", "--out", "o", *tables.train_flags(name)])
    expected = {**toy.TRAIN_DEFAULTS, **tables.RUNS[name]}
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field
    # Everything else (seed, steps, data order, weight decay, ...) is train.py's default, hence shared.
    default = train.TrainConfig()
    others = [f.name for f in dataclasses.fields(cfg) if f.name not in {*expected, "model", "data", "out"}]
    assert "weight_decay" in others and "lr" not in others
    for field in others:
        assert getattr(cfg, field) == getattr(default, field), field


def test_edit_targets_change_only_the_shape_colour_and_never_to_the_background():
    for shape, colour, background in toy.triples("all"):
        a = dict(shape=shape, colour=colour, background=background, size="small")
        target = tables.edit_target(a)
        words, source = target.split(), toy.caption(a).split()
        changed = [i for i, (x, y) in enumerate(zip(words, source)) if x != y]
        assert changed == [2], (target, toy.caption(a))  # "a small <colour> circle ..."
        assert words[2] not in (colour, background)


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    return tables.load(tiny_sd[0])


def test_strip_k_uses_prompt_k_mod_prompts_and_the_noise_pair_of_seed_plus_k(tiny):
    prompts = ["a red circle on a blue background", "a small white square on a green background"]
    p = tables.Protocol(strips=3, steps=3, chunk=2)  # strip 2 reuses prompt 0 with the noise pair of seed 2
    strips = tables.sample_strips(tiny, prompts, p)
    assert strips.shape == (3, 11, 3, 16, 16)
    noise_a, noise_b = sampler.noise_pair(2, tables.latent_shape(tiny))
    strip2 = sampler.interpolate(tiny.unet, tiny.vae, noise_a, noise_b, cond_a=tiny.encode_prompt(prompts[:1]),
                                 uncond_a=tiny.encode_prompt([""]), steps=3, progress=False)
    torch.testing.assert_close(strips[2], strip2, rtol=1e-4, atol=1e-5)  # batched vs one frame at a time
    assert not torch.allclose(strips[0], strips[2], atol=1e-3)  # same prompt, another noise pair


def fake_scores(istd, rng):
    return {"per_strip_istd": list(istd), "per_strip_mean_adjacent_distance": list(rng.uniform(1, 2, len(istd))),
            "caption_accuracy": {"caption": 0.75}, "frechet_distance": 12.5, "eval_s": 30.0}


def test_markdown_has_every_table_the_command_and_pending_rows_for_missing_models():
    rng = np.random.default_rng(0)
    control = rng.uniform(1, 2, 60)
    scores = {"control": fake_scores(control, rng), "smooth": fake_scores(control - 0.25, rng)}
    runs = {"control": {"wall_s": 100.0}, "smooth": {"wall_s": 300.0}}
    rows = {n: tables.summary(n, scores, runs) for n in scores}
    assert rows["smooth"]["istd_vs_control"]["mean"] == pytest.approx(-0.25)
    results = {"command": "python tables.py", "cache": "runs/tables", "protocol_text": "60 strips",
               "total_s": 600.0, "rows": rows, "runs": runs, "reconstruction": {}}
    md = tables.render_markdown(results)
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Cheaper regularizer variants"):
        assert f"### {title}" in md
    assert "`python tables.py`" in md
    smooth_line = next(l for l in md.splitlines() if l.startswith("| Smooth-LoRA, lambda 1 |"))
    relative = -0.25 / control.mean()
    assert f"-0.250 ± 0.000 ({100 * relative:+.0f}%)" in smooth_line
    assert "| base (no LoRA) | pending |" in md and "| lambda 10 | pending |" in md
    assert "train + score time of these rows: 7.7 min" in md  # Table 1: (100 + 300 + 2 x 30) s


def stub_train_run(name, model, data, cache, overrides=None, threads=1):
    """A random LoRA per run instead of train.py, kept once written (as train_run's cache does)."""
    out = cache / name
    if (out / "smooth_lora.safetensors").is_file():
        return {"lora": str(out / "smooth_lora.safetensors"), "wall_s": 1.0, "train_loop_s": 1.0, "cached": True}
    models = tables.load(model)
    lora.inject_lora(models.unet, rank=tables.RUNS[name].get("rank", 8))
    for layer in lora.lora_layers(models.unet).values():
        perturb_(layer.lora_up, seed=list(tables.RUNS).index(name), scale=0.05)
    out.mkdir(parents=True, exist_ok=True)
    lora.save_lora(models.unet, out / "smooth_lora.safetensors")
    regularized = tables.RUNS[name]["lambda_reg"] > 0
    (out / "log.jsonl").write_text(json.dumps(dict(step=1, loss_base=0.1, loss_reg=0.01, var_norm=0.2, a=0.1,
                                                   regularized=regularized, time=1.0)) + "\n")
    return {"lora": str(out / "smooth_lora.safetensors"), "wall_s": 1.0, "train_loop_s": 1.0, "cached": False}


def test_quick_pipeline_writes_every_table_and_figure_then_reuses_its_cache(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "train_run", stub_train_run)
    monkeypatch.setattr(toy, "prepare_data", lambda folder: folder)
    argv = ["--quick", "--model", str(tiny_sd[0]), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    assert tables.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["rows"]) == {"base", *tables.RUNS}
    for name, row in results["rows"].items():
        assert len(results["scores"][name]["per_strip_istd"]) == tables.QUICK.strips
        assert np.isfinite(row["istd"]) and np.isfinite(row["fid_proxy"])
        assert ("istd_vs_control" in row) == (name != "control")
    # Different LoRAs give different strips; the same strips (paired) for the same model.
    assert results["scores"]["smooth"]["per_strip_istd"] != results["scores"]["control"]["per_strip_istd"]
    assert set(results["reconstruction"]) == {"vae", *tables.RECONSTRUCTED}
    for name in tables.RECONSTRUCTED:
        for inversion in ("ddim", "nti"):
            r = results["reconstruction"][name][inversion]
            assert len(r["per_image"]["psnr"]) == tables.QUICK.recon_images and np.isfinite(r["mse"])
    assert results["reconstruction"]["vae"]["psnr"] > 0
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "pending" not in md and "`python tables.py --quick`" in md
    for figure in ("interpolation.png", "edit.png"):
        assert Image.open(tmp_path / "out" / figure).size[0] > 100

    # Run again: everything comes from the cache, nothing is sampled or inverted.
    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(tables, "sample_strips", fail)
    monkeypatch.setattr(tables, "reconstruct", fail)
    assert tables.main(argv) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["scores"] == results["scores"] and again["reconstruction"] == results["reconstruction"]


def test_train_run_trains_through_train_py_once_and_then_reuses_the_lora(tiny_sd, tmp_path):
    data = tmp_path / "data"
    toy.prepare_data(data, n=4)
    overrides = dict(max_steps=1, batch_size=2, resolution=16, save_every=1)
    first = tables.train_run("smooth", tiny_sd[0], data, tmp_path / "cache", overrides)
    assert not first["cached"] and first["wall_s"] > 0
    lora_file = tmp_path / "cache" / "smooth" / "smooth_lora.safetensors"
    log = [json.loads(l) for l in (tmp_path / "cache" / "smooth" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["regularized"] and log[0]["loss_reg"] > 0  # lambda 1: the regularizer ran
    mtime = lora_file.stat().st_mtime_ns
    second = tables.train_run("smooth", tiny_sd[0], data, tmp_path / "cache", overrides)
    assert second["cached"] and second["lora"] == first["lora"] and lora_file.stat().st_mtime_ns == mtime
