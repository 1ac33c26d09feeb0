"""bench/speed.py's 512 px budget (`--budget`) and GPU check (`--gpu-check`): the pieces, on CPU and tiny
configs, so the GPU run calls only tested code (no timing assertions)."""
import json
import math
import os

import pytest
import torch
from conftest import TINY_UNET

from bench import speed as bench
import unet as unet_module


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "SMALL_UNET", {k: v for k, v in TINY_UNET.items() if k != "sample_size"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--gpu-check"])
    assert str(e.value.code).startswith("python -m bench: error: --device cuda") and "no CUDA GPU" in e.value.code


def test_gpu_check_needs_device_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--gpu-check"])
    assert e.value.code == 2 and "--gpu-check runs on a GPU: add --device cuda" in capsys.readouterr().err


def test_budget_cases_cover_every_variant_at_512px():
    cases = bench.budget_cases()
    assert {(c["mode"], c["dtype"], c["ckpt"]) for c in cases} == {
        (m, d, c) for m in ("plain", "vjp") for d in ("float32", "bfloat16") for c in (False, True)}
    assert all(c["side"] == 64 and c["batch"] == 1 and c["cfg"] == "sd15" and c["lora"] for c in cases)
    assert [c["batch"] for c in bench.budget_cases(batches=(1, 3), variants=bench.GPU_CHECK_BUDGET)] \
        == [1] * 4 + [3] * 4


def test_random_unet_is_made_on_the_device_in_the_frozen_dtype(tiny):
    unet, cfg = bench.random_unet("small", "cpu", torch.bfloat16)
    params = list(unet.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16} and {p.device.type for p in params} == {"cpu"}
    assert all(torch.isfinite(p).all() for p in params)
    assert unet.conv_in.weight.std() > 0 and torch.equal(unet.conv_norm_out.weight, torch.ones_like(
        unet.conv_norm_out.weight))  # the modules' own init, not an empty tensor


def test_budget_case_runs_one_checkpointed_regularized_bf16_step_through_the_cli(tiny, monkeypatch, capsys):
    calls = []
    checkpoint = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    case = bench.budget_cases(variants=[("vjp", "bfloat16", True)], cfg="small", side=16, batches=(2,))[0]
    bench.main(["--one", json.dumps(case), "--threads", "1"])  # what run_case's subprocess runs
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls  # the checkpointing of the case, not the mode's default, was used
    assert result["time_s"] > 0 and result["images_per_s"] == pytest.approx(2 / result["time_s"])
    assert result["peak_mb"] >= result["base_mb"] > 0
    assert result["extra_mb"] == result["peak_mb"] - result["base_mb"]


def test_unet_parity_passes_for_the_same_weights_and_fails_for_a_changed_one(tiny, monkeypatch):
    pytest.importorskip("diffusers")
    rows = bench.unet_parity("cpu", cfg_name="small", side=16, dtypes=("float32", "bfloat16"))
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"] and all(r["ok"] for r in rows), rows
    assert rows[0]["ours_error"] < 1e-5  # fp32 on CPU: the same computation

    parity_models = bench.parity_models

    def one_weight_off(*args):  # ours loads every weight but one as given: the output layer's x 1.5
        ref, ours, cfg = parity_models(*args)
        load = ours.load_state_dict
        ours.load_state_dict = lambda sd, **kw: load({**sd, "conv_out.weight": sd["conv_out.weight"] * 1.5}, **kw)
        return ref, ours, cfg

    monkeypatch.setattr(bench, "parity_models", one_weight_off)
    assert not any(r["ok"] for r in bench.unet_parity("cpu", cfg_name="small", side=16,
                                                       dtypes=("float32", "bfloat16")))


def test_toy_run_passes_train_py_a_valid_command_line(tmp_path):
    """fp16 is GPU-only: on CPU, train.py refuses it after parsing the flags. Getting that refusal (not
    an argparse error) shows the command line the GPU check builds is one train.py accepts."""
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on this machine")
    result = bench.toy_run("fp16", 20, os.fspath(tmp_path / "fp16"))
    assert not result["ok"] and "fp16" in result["error"] and "unrecognized arguments" not in result["error"]


def test_toy_run_trains_one_lora_and_reads_its_last_log_line(tmp_path):
    """A real 2-step toy run in fp32 (CPU here): ok with a finite loss from log.jsonl, and none of the
    toy world's extras (the lambda-0 control, the paired report), which took minutes on a GPU machine."""
    result = bench.toy_run("no", 2, os.fspath(tmp_path / "no"), extra=("--threads", "1"))
    assert result["ok"] and result["step"] == 2 and math.isfinite(result["loss"]), result
    assert (tmp_path / "no" / "smooth_lora.safetensors").is_file()
    assert not (tmp_path / "no" / "control").exists() and not (tmp_path / "no" / "report.json").exists()


def test_gpu_check_reports_every_part_and_fails_on_a_failed_toy_run(tiny, monkeypatch, tmp_path, capsys):
    """The orchestration of --gpu-check on CPU: real parity and budget pieces on tiny configs (the
    budget in-process), train.py's toy runs stubbed (one fails), the JSON report and the exit status."""
    pytest.importorskip("diffusers")
    unet_parity = bench.unet_parity
    monkeypatch.setattr(bench, "unet_parity", lambda device: unet_parity(
        device, cfg_name="small", side=16, dtypes=("float32", "bfloat16")))
    budget_cases = bench.budget_cases
    monkeypatch.setattr(bench, "budget_cases", lambda batches, variants: budget_cases(
        batches, variants[:2], cfg="small", side=16))  # plain and vjp in bf16
    monkeypatch.setattr(bench, "run_case", bench.measure_budget)
    monkeypatch.setattr(bench, "toy_run", lambda precision, steps, out: dict(
        precision=precision, ok=precision != "fp16", step=steps, loss=0.1, loss_reg=0.01, var_norm=0.1,
        time_s=1.0) if precision != "fp16" else dict(precision=precision, ok=False, error="fp16 failed"))
    with pytest.raises(SystemExit) as e:
        bench.gpu_check("cpu", os.fspath(tmp_path / "report.json"))
    assert "failed for fp16" in str(e.value.code)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["dtype"] for r in report["parity"]] == ["float32", "bfloat16"]
    assert all(r["ok"] for r in report["parity"])
    assert [(r["batch"], r["mode"]) for r in report["budget"]] == [(1, "plain"), (1, "vjp"), (3, "plain"),
                                                                   (3, "vjp")]
    assert [r["precision"] for r in report["toy"]] == ["no", "bf16", "fp16"]
    out = capsys.readouterr().out
    assert "UNet forward bfloat16" in out and "img/s" in out and "FAILED" in out
