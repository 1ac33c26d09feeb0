"""toy/tables.py: the paired statistics and the "holds in all four cells" rule on synthetic numbers, the run
flags derived from toy/main_job.py, the strips of a cell, the markdown, and the whole --quick pipeline on a tiny
random SD (training stubbed; one real train.py run checks the subprocess and its cache)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import sampler
from toy import main_job, tables, world
import train
from conftest import perturb_

FULL = tables.Protocol()
CELLS = [tables.cell_name(c) for c in FULL.cells]


# ------------------------------------------------------------------------------- the statistics

def test_the_four_cells_are_two_disjoint_sets_of_noise_pairs_at_two_step_counts():
    assert CELLS == ["A25", "A50", "B25", "B50"] and tables.cell_name(FULL.quality_cell) == "A50"
    a, b = (set(range(seed, seed + FULL.strips)) for seed in FULL.sets)
    assert FULL.strips >= 64 and not a & b


def cell_scores(per_cell):
    return {cell: {"per_strip_istd": list(v)} for cell, v in per_cell.items()}


def test_compare_is_the_paired_difference_per_cell_relative_to_the_controls_mean():
    control = {c: np.array([1.0, 2.0, 3.0, 2.0]) + i for i, c in enumerate(CELLS)}
    shift = np.array([-0.2, -0.3, -0.4, -0.3])  # mean -0.3, sample std sqrt(0.02 / 3)
    model = {c: control[c] + shift for c in CELLS}
    result = tables.compare(cell_scores(model), cell_scores(control), FULL.cells)
    se = np.sqrt(0.02 / 3) / 2
    for i, c in enumerate(CELLS):
        d = result["istd_vs_control"][c]
        assert d["n"] == 4 and d["mean"] == pytest.approx(-0.3) and d["se"] == pytest.approx(se)
        assert d["relative"] == pytest.approx(-0.3 / (2.0 + i)) and d["relative_se"] == pytest.approx(se / (2.0 + i))
    assert result["holds"] == -1  # |-0.3| > 2 x 0.041 in every cell
    # A shift common to both models cancels however spread the strips are: pairing matters.
    wide = {c: np.array([10.0, -50.0, 80.0, 3.0]) for c in CELLS}
    result = tables.compare(cell_scores({c: wide[c] + 1.0 for c in CELLS}), cell_scores(wide), FULL.cells)
    assert all(d["mean"] == pytest.approx(1.0) and d["se"] == pytest.approx(0, abs=1e-12)
               for d in result["istd_vs_control"].values())
    assert result["holds"] == 1
    # A cell not yet scored: the rule is pending, not decided on three cells.
    partial = tables.compare(cell_scores({c: model[c] for c in CELLS[:3]}), cell_scores(control), FULL.cells)
    assert len(partial["istd_vs_control"]) == 3 and partial["holds"] is None


def diff(mean, se):
    return {"mean": mean, "se": se}


@pytest.mark.parametrize("diffs, expected", [
    ([diff(-0.3, 0.1)] * 4, -1),  # lower everywhere, 3 s.e.
    ([diff(0.3, 0.1)] * 4, 1),  # higher everywhere
    ([diff(-0.3, 0.1)] * 3 + [diff(-0.19, 0.1)], 0),  # one cell under 2 s.e.: no claim
    ([diff(-0.3, 0.1)] * 3 + [diff(-0.21, 0.1)], -1),  # just over 2 s.e. in the weakest cell
    ([diff(-0.3, 0.1)] * 3 + [diff(0.3, 0.1)], 0),  # significant both ways: no claim
    ([diff(-0.2, 0.1)] * 4, 0),  # exactly 2 s.e. is not more than 2 s.e.
    ([], 0),
])
def test_a_claim_holds_only_with_one_sign_and_more_than_two_standard_errors_in_every_cell(diffs, expected):
    assert tables.holds(diffs) == expected


def test_holds_on_synthetic_strips_where_one_set_shows_an_effect_and_the_other_does_not():
    """Issue 11's trap: an effect in set A only must not be reported as holding."""
    rng = np.random.default_rng(0)
    control = {c: rng.uniform(1, 2, 64) for c in CELLS}
    effect = {c: (-0.2 if c.startswith("A") else 0.0) + rng.normal(0, 0.05, 64) for c in CELLS}
    result = tables.compare(cell_scores({c: control[c] + effect[c] for c in CELLS}), cell_scores(control), FULL.cells)
    assert result["istd_vs_control"]["A50"]["mean"] < -5 * result["istd_vs_control"]["A50"]["se"]
    assert result["holds"] == 0
    everywhere = {c: control[c] - 0.2 + rng.normal(0, 0.05, 64) for c in CELLS}
    assert tables.compare(cell_scores(everywhere), cell_scores(control), FULL.cells)["holds"] == -1


# ------------------------------------------------------------------------------------- the runs

def parsed(flags):
    cfg, _ = train.parse_args(["--model", "m", "--data", "d", "--out", "o", *tables.train_flags(flags)])
    return cfg


def test_the_plan_derives_every_run_from_toy_defaults_and_the_two_forms():
    plan = tables.plan_runs(FULL)
    common = {k: v for k, v in main_job.TRAIN_DEFAULTS.items() if k not in main_job.OUR_FORM}
    assert plan["ours"].flags == main_job.TRAIN_DEFAULTS == {**common, **main_job.OUR_FORM}  # the main job's run
    assert plan["paper"].flags == {**common, **main_job.PAPER_FORM}
    # Both forms differ only in lambda and reg_* flags, inert at lambda 0: one control, trained as
    # main_job.control_config trains the main job's (TRAIN_DEFAULTS at lambda 0) up to those inert flags.
    assert plan["control"].flags == {**common, "lambda_reg": 0.0}
    assert {k: v for k, v in main_job.TRAIN_DEFAULTS.items() if k not in plan["control"].flags} == \
        {k: v for k, v in main_job.OUR_FORM.items() if k.startswith("reg_")}
    assert plan["paper"].control == plan["ours"].control == plan["base"].control == "control"
    for form in ("paper", "ours"):
        for seed in (1, 2):  # >= 3 training seeds (issue 21)
            assert plan[f"{form}_seed{seed}"].flags == {**plan[form].flags, "seed": seed}
            assert plan[f"{form}_seed{seed}"].control == f"control_seed{seed}"
        for steps in FULL.lengths:
            assert plan[f"{form}_steps{steps}"].flags == {**plan[form].flags, "max_steps": steps}
            assert plan[f"{form}_steps{steps}"].control == f"control_steps{steps}"
            assert plan[f"control_steps{steps}"].flags["max_steps"] == steps
    assert plan["control_seed1"].control == plan["control_seed2"].control == "control"
    assert plan["control"].control is None
    assert [plan[f"paper_lambda{x:g}"].flags["lambda_reg"] for x in (0.1, 1, 10, 100)] == [0.1, 1.0, 10.0, 100.0]
    lam = main_job.OUR_FORM["lambda_reg"]
    assert [plan[n].flags["lambda_reg"] for n in tables.table_rows(FULL)["lambda"] if n.startswith("ours")] == \
        pytest.approx([lam / 3, lam, 3 * lam, 10 * lam])
    names = tables.canonical(plan)  # the same flags: trained and scored once
    assert names["ours_steps300"] == "ours" and names["paper_lambda1"] == "paper" and names["paper_seed1"] != "paper"
    assert len(set(names.values())) == 26  # the base and 25 LoRA runs
    for seed in (1, 2):  # the validation search's choice at every seed, against the control of its length and seed
        chosen = plan[f"ours_steps1000_seed{seed}"]
        assert chosen.flags == {**plan["ours_steps1000"].flags, "seed": seed}
        assert chosen.control == f"control_steps1000_seed{seed}"
        assert plan[chosen.control].flags == {**plan["control_steps1000"].flags, "seed": seed}
    assert tables.table_rows(FULL)["chosen"][:2] == ["control_steps1000", "ours_steps1000"]
    for table in tables.table_rows(FULL).values():
        assert set(table) <= set(plan)


@pytest.mark.parametrize("name", list(tables.plan_runs(FULL))[1:])
def test_train_py_parses_every_runs_flags_to_exactly_those_values(name):
    flags = tables.plan_runs(FULL)[name].flags
    cfg = parsed(flags)
    for key, value in flags.items():
        assert getattr(cfg, key) == value, key
    default = train.TrainConfig()  # everything else is train.py's default, hence shared by every run
    assert cfg.weight_decay == default.weight_decay and cfg.seed == flags.get("seed", default.seed) == \
        (int(name[-1]) if "_seed" in name else 0)


def test_changing_our_form_in_toy_changes_the_runs_without_editing_tables(monkeypatch):
    our_form = dict(lambda_reg=12.0, reg_normalize="none", reg_timestep_buckets=10, lr=3e-3)
    monkeypatch.setattr(main_job, "OUR_FORM", our_form)
    monkeypatch.setattr(main_job, "TRAIN_DEFAULTS", {**main_job.TRAIN_DEFAULTS, **our_form})
    monkeypatch.setitem(tables.FORMS, "ours", our_form)
    plan = tables.plan_runs(FULL)
    assert plan["ours"].flags["lambda_reg"] == 12.0 and plan["ours"].flags["lr"] == 3e-3
    assert {"ours_lambda4", "ours_lambda12", "ours_lambda36", "ours_lambda120"} <= set(plan)
    # lr acts without the regularizer: each form now gets its own control, trained like it.
    assert plan["ours"].control == "control_ours" and plan["paper"].control == "control_paper"
    assert plan["control_ours"].flags["lr"] == 3e-3 and plan["control_ours"].flags["lambda_reg"] == 0.0
    # A flag that OUR_FORM sets and PAPER_FORM does not is train.py's default in the paper's runs (and
    # their control): a form is all its flags say, nothing inherited from the other form.
    assert "lr" not in plan["paper"].flags and "lr" not in plan["control_paper"].flags
    assert plan["paper"].flags == {**plan["control_paper"].flags, **main_job.PAPER_FORM}


def test_the_estimate_counts_the_runs_steps_and_strips():
    e = tables.estimate_seconds(FULL, tables.plan_runs(FULL))
    assert e["runs"] == 25 and e["strips"] == 26 * 4 * 64
    # 3 runs x 3 seeds, 3 + 3 more lambdas at 300 steps; 3 runs at 1000 and at 3000 (see the docstring)
    # and the validation search's choice (ours, 1000 steps) and its control at seeds 1 and 2
    assert e["train_steps"] == 9 * 300 + 6 * 300 + 3 * 1000 + 3 * 3000 + 4 * 1000 == 20_500
    assert e["train_s"] == pytest.approx(0.2 * (6900 + 2 * 13600))  # plain and regularized steps
    assert e["recon_s"] == 26 * 150  # Table 2 for the base and every LoRA, each once


def test_table2_covers_every_model_once_and_the_claims_plot_labels_each_run():
    names = tables.canonical(tables.plan_runs(FULL))
    assert {names[n] for n in tables.table_rows(FULL)["reconstruction"]} == set(names.values())
    assert [tables.short_label(n) for n in ("ours", "ours_seed2", "paper_lambda10", "ours_steps1000",
                                            "ours_steps1000_seed1", "ours_lambda0.333333")] == \
        ["s0", "s2", "lam10", "1000 st", "1000 st s1", "lam0.333"]


def test_plan_prints_every_run_and_the_estimate_and_trains_nothing(capsys, monkeypatch):
    monkeypatch.setattr(tables, "train_run", None)  # would fail if called
    assert tables.main(["--plan"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(tables.plan_runs(FULL)) + 1 and "ours_steps300 (= ours)" in "\n".join(out)
    assert out[-1].startswith("25 LoRA runs, 20500 toy steps: ~114 min of training; 6656 strips: ~78 min")


def test_edit_targets_change_only_the_shape_colour_and_never_to_the_background():
    for shape, colour, background in world.triples("all"):
        a = dict(shape=shape, colour=colour, background=background, size="small")
        target = tables.edit_target(a)
        words, source = target.split(), world.caption(a).split()
        changed = [i for i, (x, y) in enumerate(zip(words, source)) if x != y]
        assert changed == [2], (target, world.caption(a))  # "a small <colour> circle ..."
        assert words[2] not in (colour, background)


# ------------------------------------------------------------------------------ sampling and tables

@pytest.fixture(scope="module")
def tiny(tiny_sd):
    return tables.load(tiny_sd[0])


def test_strip_k_uses_prompt_k_mod_prompts_and_the_noise_pair_of_the_sets_seed_plus_k(tiny):
    prompts = ["a red circle on a blue background", "a small white square on a green background"]
    p = tables.Protocol(strips=3, chunk=2)  # strip 2 reuses prompt 0 with the noise pair of seed + 2
    strips = tables.sample_strips(tiny, prompts, p, seed=1000, steps=3)
    assert strips.shape == (3, 11, 3, 16, 16)
    noise_a, noise_b = sampler.noise_pair(1002, tables.latent_shape(tiny))
    strip2 = sampler.interpolate(tiny.unet, tiny.vae, noise_a, noise_b, cond_a=tiny.encode_prompt(prompts[:1]),
                                 uncond_a=tiny.encode_prompt([""]), steps=3, progress=False)
    torch.testing.assert_close(strips[2], strip2, rtol=1e-4, atol=1e-5)  # batched vs one frame at a time
    assert not torch.allclose(strips[0], strips[2], atol=1e-3)  # same prompt, another noise pair


def fake_cell(istd, rng):
    return {"per_strip_istd": list(istd), "istd": float(np.mean(istd)), "mean_adjacent_distance": 1.5,
            "caption_accuracy": {"caption": 0.75}, "fid_proxy": 12.5, "eval_s": 30.0}


def test_markdown_has_every_table_the_holds_column_and_pending_rows():
    rng = np.random.default_rng(0)
    plan, names = tables.plan_runs(FULL), tables.canonical(tables.plan_runs(FULL))
    control = {c: rng.uniform(1, 2, 64) for c in CELLS}
    scores = {"control": {c: fake_cell(control[c], rng) for c in CELLS},
              "ours": {c: fake_cell(control[c] - 0.25, rng) for c in CELLS},
              "paper": {c: fake_cell(control[c] + (0.1 if c == "B25" else -0.1), rng) for c in CELLS}}
    results = {"command": "python -m toy tables", "cache": "runs/tables", "protocol_text": "64 strips.",
               "protocol": {"recon_images": 32, "step_counts": [25, 50], "edit_r": 0.8}, "cells": CELLS,
               "quality_cell": "A50", "total_s": 600.0, "runs": {}, "reconstruction": {}, "common": {},
               "tables": tables.table_rows(FULL), "prompts": world.heldout_prompts(), "figure_rows": []}
    results["rows"] = {n: tables.summary(n, plan, names, scores, FULL) for n in plan}
    md = tables.render_markdown(results)
    for title in ("Table 1", "Table 2", "Table 3", "ISTD and FID-proxy vs fine-tune length", "Seed check"):
        assert f"### {title}" in md
    assert "`python -m toy tables`" in md and "rank 4" in md  # what was dropped is said
    ours = plan["ours"].label  # "our form, lambda L" with main_job.OUR_FORM's lambda
    ours_line = next(l for l in md.splitlines() if l.startswith(f"| {ours} |"))
    relative = -0.25 / control["A50"].mean()
    assert f"{100 * relative:+.0f}% ± 0%" in ours_line and "| yes: lower |" in ours_line
    paper_line = next(l for l in md.splitlines() if l.startswith("| paper's form, lambda 1 |"))
    assert "| no |" in paper_line  # higher in one cell
    # "ours, 300 steps" is the same run as "ours": its row shows the same numbers; other lengths are pending.
    ours_300 = next(l for l in md.splitlines() if l.startswith(f"| {plan['ours_steps300'].label} |"))
    assert ours_300.split(" | ")[1:] == ours_line.split(" | ")[1:]
    assert f"| {plan['ours_steps1000'].label} | pending |" in md and "| base (no LoRA) | pending |" in md


def test_the_tradeoff_is_the_mean_relative_istd_change_and_the_quality_proxies_against_the_budget(tmp_path):
    rng = np.random.default_rng(1)
    plan, names = tables.plan_runs(FULL), tables.canonical(tables.plan_runs(FULL))
    control = {c: rng.uniform(1, 2, 64) for c in CELLS}
    drops = {"A25": 0.2, "A50": 0.3, "B25": 0.4, "B50": 0.5}  # ours: a different drop in each cell
    scores = {"control": {c: fake_cell(control[c], rng) for c in CELLS},
              "ours": {c: {**fake_cell(control[c] - drops[c], rng), "fid_proxy": 13.5} for c in CELLS},
              "paper": {c: {**fake_cell(control[c] - 0.1, rng), "caption_accuracy": {"caption": 0.6}}
                        for c in CELLS}}
    results = {"rows": {n: tables.summary(n, plan, names, scores, FULL) for n in plan},
               "tables": tables.table_rows(FULL), "quality_cell": "A50"}
    points = tables.tradeoff_points(results)
    assert set(points) == {"ours", "paper"}  # the scored runs, each once; no control, nothing pending
    ours = points["ours"]
    assert ours["istd"] == pytest.approx(np.mean([-drops[c] / control[c].mean() for c in CELLS]))
    assert ours["istd_nearest_zero"] == pytest.approx(-0.2 / control["A25"].mean())
    assert ours["fid_proxy"] == pytest.approx(13.5 / 12.5 - 1) and ours["caption_accuracy"] == 0
    assert ours["within_budget"] and ours["holds"] == -1  # FID-proxy +8%: inside the 10% budget
    assert points["paper"]["caption_accuracy"] == pytest.approx(-0.2) and not points["paper"]["within_budget"]
    assert "| no |" in next(l for l in tables.tradeoff_table(results) if l.startswith("| paper's form"))
    assert tables.relative_change(0.5, 0.0) == float("inf") and tables.relative_change(0.0, 0.0) == 0.0
    tables.save_tradeoff_plot(tmp_path / "tradeoff.png", points)
    assert Image.open(tmp_path / "tradeoff.png").size == (640, 440)


def stub_train_run(name, flags, model, data, cache, threads=1, cached_only=False):
    """A random LoRA per run instead of train.py, kept once written (as train_run's cache does)."""
    out = cache / name
    if (out / "smooth_lora.safetensors").is_file():
        return {"lora": str(out / "smooth_lora.safetensors"), "wall_s": 1.0, "train_loop_s": 1.0, "cached": True}
    if cached_only:
        return None
    models = tables.load(model)
    lora.inject_lora(models.unet, rank=flags["rank"])
    seed = int(flags["lambda_reg"] * 10) + flags["max_steps"] + 1000 * flags.get("seed", 0)
    for layer in lora.lora_layers(models.unet).values():
        perturb_(layer.lora_up, seed=seed, scale=0.05)
    out.mkdir(parents=True, exist_ok=True)
    lora.save_lora(models.unet, out / "smooth_lora.safetensors")
    (out / "log.jsonl").write_text(json.dumps(dict(step=1, loss_base=0.1, loss_reg=0.01, var_norm=0.2, a=0.1,
                                                   regularized=flags["lambda_reg"] > 0, time=1.0)) + "\n")
    return {"lora": str(out / "smooth_lora.safetensors"), "wall_s": 1.0, "train_loop_s": 1.0, "cached": False}


def test_quick_pipeline_writes_every_table_and_figure_then_reuses_its_cache(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "train_run", stub_train_run)
    monkeypatch.setattr(world, "prepare_data", lambda folder: folder)
    argv = ["--quick", "--model", str(tiny_sd[0]), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    assert tables.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    plan, names = tables.plan_runs(tables.QUICK), tables.canonical(tables.plan_runs(tables.QUICK))
    assert set(results["rows"]) == set(plan) and set(results["scores"]) == set(names.values())
    quick_cells = [tables.cell_name(c) for c in tables.QUICK.cells]
    assert quick_cells == ["A2", "A3", "B2", "B3"]
    for name, row in results["rows"].items():
        cells = results["scores"][names[name]]
        assert list(cells) == quick_cells
        assert all(len(c["per_strip_istd"]) == tables.QUICK.strips for c in cells.values())
        assert np.isfinite(row["istd"]) and np.isfinite(row["fid_proxy"])
        paired = plan[name].control is not None and names[plan[name].control] != names[name]
        assert ("istd_vs_control" in row) == paired
        if "istd_vs_control" in row:
            assert set(row["istd_vs_control"]) == set(quick_cells) and row["holds"] in (-1, 0, 1)
            ref = results["scores"][names[plan[name].control]]["B3"]["per_strip_istd"]
            assert row["istd_vs_control"]["B3"]["mean"] == pytest.approx(
                np.mean(cells["B3"]["per_strip_istd"]) - np.mean(ref))
    assert results["rows"]["ours_steps2"]["istd"] == results["rows"]["ours"]["istd"]  # one run, two names
    s = results["scores"]["ours"]
    assert s["A2"]["per_strip_istd"] != s["B2"]["per_strip_istd"] != s["B3"]["per_strip_istd"]  # four cells differ
    assert results["scores"]["ours"]["A3"] != results["scores"]["control"]["A3"]
    recon_rows = list(dict.fromkeys(names[n] for n in tables.table_rows(tables.QUICK)["reconstruction"]))
    assert set(results["reconstruction"]) == {"vae", *recon_rows} == {"vae", *names.values()}  # every model once
    for name in recon_rows:
        for inversion in ("ddim", "ddim_2", "nti"):  # DDIM inversion at QUICK's 3 steps and at 2
            r = results["reconstruction"][name][inversion]
            assert len(r["per_image"]["psnr"]) == tables.QUICK.recon_images and np.isfinite(r["mse"])
        edit = results["reconstruction"][name]["edit"]
        assert 0 <= edit["success"] <= edit["target_seen"] <= 1 and np.isfinite(edit["outside_mse"])
        reference = plan[name].control  # ours_seed2 against control_seed2, control_seed2 against control
        if reference is not None:
            mine, theirs = (results["reconstruction"][n]["ddim_2"]["per_image"]["psnr"] for n in (name, names[reference]))
            assert results["reconstruction"][name]["ddim_2"]["psnr_vs_control"]["mean"] == \
                pytest.approx(np.mean(mine) - np.mean(theirs))
            assert set(edit["vs_control"]) == {"success", "outside_mse"}
    assert all("kid_proxy" in row and "kid_vs_control" in row for row in results["rows"].values() if "reference" in row)
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "pending" not in md and "`python -m toy tables --quick`" in md
    assert "### The trade-off" in md and "### The paper's three claims" in md and "instrument's own noise" in md
    assert "### Quality in every cell" in md and "### The validation search's choice at three seeds" in md
    kid_cells = results["rows"]["ours_seed1"]["kid_vs_control_cells"]  # against control_seed1, every cell
    assert set(kid_cells) == set(quick_cells) and kid_cells["B2"]["mean"] == pytest.approx(
        results["scores"]["ours_seed1"]["B2"]["kid_proxy"]["kid"] - results["scores"]["control_seed1"]["B2"]["kid_proxy"]["kid"])
    claims = tables.claims_points(results)  # every regularized run, each against its own control
    assert set(claims) == {names[n] for n, run in plan.items() if run.flags and run.flags["lambda_reg"] > 0}
    assert {f + s for f in ("paper", "ours") for s in ("", "_seed1", "_seed2")} <= set(claims)
    assert claims["ours_seed2"]["inversion"]["ddim"] == results["reconstruction"]["ours_seed2"]["ddim"]["psnr_vs_control"]
    for figure in ("interpolation.png", "edit.png", "tradeoff.png", "claims.png"):
        assert Image.open(tmp_path / "out" / figure).size[0] > 100

    figure = (tmp_path / "out" / "interpolation.png").read_bytes()

    # Run again: everything comes from the cache, nothing is sampled or inverted.
    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(tables, "sample_strips", fail)
    monkeypatch.setattr(tables, "reconstruct", fail)
    assert tables.main(argv) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["scores"] == results["scores"] and again["reconstruction"] == results["reconstruction"]
    # --cells computes only the cells named; the others are still shown from the cache
    assert tables.main([*argv, "--cells", "A3"]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["scores"] == results["scores"]
    # --cached-only: the same tables from the cache; from an empty cache, every row pending, nothing trained
    assert tables.main([*argv, "--cached-only"]) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["scores"] == results["scores"] and again["reconstruction"] == results["reconstruction"]
    assert (tmp_path / "out" / "interpolation.png").read_bytes() == figure
    assert tables.main([*argv[:-1], str(tmp_path / "empty"), "--cached-only"]) == 0
    empty = json.loads((tmp_path / "out" / "results.json").read_text())
    assert empty["scores"] == {"base": {}} and set(empty["reconstruction"]) <= {"vae", "base"}
    assert "pending" in (tmp_path / "out" / "tables.md").read_text()


def test_bad_arguments_end_in_an_error_line(capsys, tmp_path):
    with pytest.raises(SystemExit, match="python -m toy tables: error: no model"):
        tables.main(["--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="python -m toy tables: error: --cells Z9: the cells are A25, A50, B25, B50"):
        tables.main(["--cells", "A50", "Z9", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(SystemExit) as e:
        tables.main(["--threads", "0"])
    assert e.value.code == 2 and "python -m toy tables: error: --threads must be at least 1" in capsys.readouterr().err


def test_train_run_trains_through_train_py_once_and_then_reuses_the_lora(tiny_sd, tmp_path):
    data = tmp_path / "data"
    world.prepare_data(data, n=4)
    flags = {**tables.plan_runs(tables.QUICK)["paper"].flags, "max_steps": 1, "resolution": 16, "save_every": 1}
    first = tables.train_run("paper", flags, tiny_sd[0], data, tmp_path / "cache")
    assert not first["cached"] and first["wall_s"] > 0
    lora_file = tmp_path / "cache" / "paper" / "smooth_lora.safetensors"
    log = [json.loads(l) for l in (tmp_path / "cache" / "paper" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["regularized"] and log[0]["loss_reg"] > 0  # lambda 1: the regularizer ran
    mtime = lora_file.stat().st_mtime_ns
    second = tables.train_run("paper", flags, tiny_sd[0], data, tmp_path / "cache")
    assert second["cached"] and second["lora"] == first["lora"] and lora_file.stat().st_mtime_ns == mtime
    (data / world.DATA_RECORD).write_text("{}")  # other toy images under the same path: trained again
    assert not tables.train_run("paper", flags, tiny_sd[0], data, tmp_path / "cache")["cached"]


def test_runs_option_selects_the_named_runs_and_the_controls_they_are_paired_with():
    s = tables.start(tables.parse_args(["--runs", "paper_seed1", "ours", "base"]))
    assert tables.selected_runs(s, s.args.runs) == {"paper_seed1", "control_seed1", "control", "ours", "base"}
    assert tables.selected_runs(s, None) >= set(s.names.values()) | {"base", "table2"}
    with pytest.raises(SystemExit, match="not in the plan"):
        tables.selected_runs(s, ["nonsense"])
