"""bench.py's 512 px budget (`--budget`) and GPU check (`--gpu-check`): the pieces, on CPU and tiny
configs, so the GPU run calls only tested code (no timing assertions)."""
import json
import os

import pytest
import torch
from conftest import TINY_UNET

import bench
import unet as unet_module


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "SMALL_UNET", {k: v for k, v in TINY_UNET.items() if k != "sample_size"})


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
    assert result["peak_mb"] >= result["base_mb"] > 0 and result["extra_mb"] == result["peak_mb"] - result["base_mb"]