"""toy/search.py (issue 21's validation search) and toy.diagnose's second image set: which prompts, runs and
controls, and the paired comparison and goal on synthetic numbers. The search itself trains and samples for an
hour: it is a documented command (docs/claims.md), not a test."""
import numpy as np
import pytest

import train
from toy import diagnose, instruments, main_job, search, tables, world


def test_validation_prompts_are_24_training_triple_captions_of_every_shape_and_size():
    prompts = search.validation_prompts()
    assert len(set(prompts)) == 24 and not set(prompts) & set(world.heldout_prompts())
    parsed = [world.parse_caption(p) for p in prompts]
    assert all((a["shape"], a["colour"], a["background"]) in world.triples("train") for a in parsed)
    assert {a["shape"] for a in parsed} == set(world.SHAPES) and {a["size"] for a in parsed} == set(world.SIZES)


@pytest.mark.parametrize("name", list(search.CANDIDATES))
@pytest.mark.parametrize("seed", [0, 2])
def test_every_candidate_is_our_form_with_its_changes_and_the_tables_control_of_its_length_and_seed(name, seed):
    flags, control, control_flags = search.run_flags(name, seed)
    assert flags == {**tables.variant(tables.Protocol(), "ours", seed=seed)[1].flags, **search.CANDIDATES[name]}
    steps = flags["max_steps"]
    expected = tables.variant(tables.Protocol(), "ours", control=True,
                              max_steps=None if steps == main_job.TRAIN_DEFAULTS["max_steps"] else steps, seed=seed)
    assert (control, control_flags) == (expected[0], expected[1].flags)
    assert control_flags["lambda_reg"] == 0 and control_flags["max_steps"] == steps and flags.get("seed", 0) == seed
    cfg, _ = train.parse_args(["--model", "m", "--data", "d", "--out", "o", *tables.train_flags(flags)])
    assert all(getattr(cfg, k) == v for k, v in flags.items())


def scores(istd_per_cell, features, cells=("V25",), strips=8, frames=3):
    """A model's synthetic scores: per-strip ISTD, caption accuracy, KID-proxy against fixed real features."""
    real = np.random.default_rng(0).normal(size=(60, 4))
    return {**{c: {"per_strip_istd": list(istd_per_cell[c]), "istd": float(np.mean(istd_per_cell[c])),
                   "caption_accuracy": {"caption": 1.0},
                   "kid_proxy": instruments.kid(features, real, groups_a=np.repeat(np.arange(strips), frames))}
               for c in cells},
            "inversion": {**{f"{n}_cfg{g}": [20.0, 21.0, 22.0] for n in (10, 50) for g in ("1", "7.5")}, "eval_s": 1.0}}


def test_the_goal_needs_istd_at_most_060x_in_every_cell_and_kid_within_2_se():
    rng, cells = np.random.default_rng(1), ("A25", "B50")
    features = rng.normal(size=(24, 4))
    control_istd = {c: 1.0 + 0.1 * rng.normal(size=8) for c in cells}
    control = scores(control_istd, features, cells)
    half = scores({c: 0.5 * v for c, v in control_istd.items()}, features, cells)  # -50% everywhere, same frames
    row = search.compare(half, control)
    assert row["goal"] and all(row["istd"][c]["relative"] == pytest.approx(-0.5) for c in cells)
    assert row["kid"]["A25"]["mean"] == 0 and row["inversion"]["10_cfg1"]["mean"] == 0
    one_cell = scores({"A25": 0.5 * control_istd["A25"], "B50": 0.7 * control_istd["B50"]}, features, cells)
    assert not search.compare(one_cell, control)["goal"]  # -30% in B50
    worse = scores({c: 0.5 * v for c, v in control_istd.items()}, features + 3.0, cells)  # frames far from real
    row = search.compare(worse, control)
    assert row["kid"]["A25"]["mean"] > 2 * row["kid"]["A25"]["se"] and not row["goal"]
    assert "| V25 |" in search.table([{"candidate": "x", "seed": 0, "compare": search.compare(
        scores({"V25": [1, 2, 1, 2, 1, 2, 1, 2]}, features), scores({"V25": [2, 2, 2, 2, 2, 2, 2, 2]}, features)),
        "control_kid": {"V25": 1.0}}])


def test_the_second_image_set_pairs_each_run_with_the_control_of_its_seed():
    def model(psnr, success, mse):
        return {"ddim": {"per_image": {"psnr": psnr}}, "ddim1_10": {"per_image": {"psnr": [p + 5 for p in psnr]}},
                "edit": {"per_image": {"success": success, "outside_mse": mse}}}
    s = {"control": model([20, 21, 22], [1, 0, 0], [0.1, 0.2, 0.3]),
         "control_seed1": model([10, 11, 12], [0, 1, 0], [0.5, 0.5, 0.5]),
         "ours": model([21, 22, 23], [1, 1, 0], [0.1, 0.1, 0.1]),
         "ours_seed1": model([10, 12, 14], [1, 1, 1], [0.4, 0.5, 0.6])}
    rows = diagnose.paired_with_controls(s)
    assert set(rows) == {"ours", "ours_seed1"}
    assert rows["ours"]["ddim"]["mean"] == pytest.approx(1.0) and rows["ours"]["ddim1_10"]["se"] == pytest.approx(0)
    assert rows["ours_seed1"]["ddim"]["mean"] == pytest.approx(1.0) and rows["ours_seed1"]["edit_success"]["mean"] == pytest.approx(2 / 3)
    assert rows["ours"]["edit_outside_mse"]["mean"] == pytest.approx(-0.1)
    assert diagnose.build_parser().parse_args(["images", "--runs", "ours"]).image_seed == 13
    with pytest.raises(SystemExit):
        diagnose.build_parser().parse_args(["images", "--image-seed", "11"])  # the tables' own draw


def test_the_second_image_set_is_scored_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "smooth_lora.safetensors").write_bytes(b"a LoRA")
    calls = []

    def score(models, inputs, p):
        calls.append(len(inputs[0]))
        return {"ddim": {"psnr": 20.0}, "edit": {"success": 0.5}}, {}

    monkeypatch.setattr(tables, "load", lambda *a: None)
    monkeypatch.setattr(tables, "score_reconstruction", score)
    first = diagnose.second_image_set(tmp_path, ["ours"], 13)
    again = diagnose.second_image_set(tmp_path, ["ours"], 13)
    assert calls == [tables.Protocol().recon_images + 1] and again == first  # the figure's image + 32
    diagnose.second_image_set(tmp_path, ["ours"], 14)  # another draw: computed
    assert len(calls) == 2
