"""bench/speed.py: each training-step mode runs what train.py's option does (no timing assertions).

Every mode is measured in-process on the tiny UNet; the UNet's forward, the optimizer, the Eq. 10
norm and the Eq. 9 penalty are wrapped to record what the step really did.
"""
import math

import pytest
import torch
from conftest import TINY_UNET

from bench import speed as bench
import ops
import regularizer
import unet as unet_module


@pytest.fixture
def record(monkeypatch):
    """Run one step mode on the tiny UNet -> (result, log of what happened in the timed repeats too)."""
    monkeypatch.setattr(bench, "SMALL_UNET", {k: v for k, v in TINY_UNET.items() if k != "sample_size"})
    # vjp-math swaps ops.DoubleBackwardAttention for the run; put it back afterwards.
    monkeypatch.setattr(ops, "DoubleBackwardAttention", ops.DoubleBackwardAttention)
    log = {}

    forward = unet_module.UNet.forward
    def logged_forward(self, sample, *args):
        log["forwards"].append((sample.shape[0], ops.double_backward_enabled()))
        return forward(self, sample, *args)

    adamw_step = torch.optim.AdamW.step
    def logged_step(self, *args, **kwargs):
        log["adamw_steps"] += 1
        return adamw_step(self, *args, **kwargs)

    variation_norm = regularizer.variation_norm
    def logged_norm(x0_pred, noise, *args):
        log["norm_batches"].append(x0_pred.shape[0])
        return variation_norm(x0_pred, noise, *args)

    penalty = regularizer.StepwiseVariationRegularizer.penalty
    def logged_penalty(self, norms, timesteps=None):
        loss = penalty(self, norms, timesteps)
        # d(step loss) / d(penalty): the factor the step puts on Eq. 9 (lambda x k in train.py).
        loss.register_hook(lambda g: log["penalty_grads"].append(g.item()))
        return loss

    checkpoint = unet_module.checkpoint
    def logged_checkpoint(*args, **kwargs):
        log["checkpointed"] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet_module.UNet, "forward", logged_forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", logged_step)
    monkeypatch.setattr(regularizer, "variation_norm", logged_norm)
    monkeypatch.setattr(regularizer.StepwiseVariationRegularizer, "penalty", logged_penalty)
    monkeypatch.setattr(unet_module, "checkpoint", logged_checkpoint)

    def run(mode, batch=2, repeats=1):
        log.update(forwards=[], adamw_steps=0, norm_batches=[], penalty_grads=[], checkpointed=0)
        case = dict(name="tiny", kind="step", cfg="small", impl="ours", mode=mode, side=16, batch=batch,
                    lora=False, repeats=repeats)
        return bench.measure(case, "cpu"), log
    return run


@pytest.mark.parametrize("mode", list(bench.STEP_MODES))
def test_every_step_mode_runs_with_finite_time_and_memory(record, mode):
    result, log = record(mode, repeats=2)
    assert len(result["times_s"]) == 2 and all(math.isfinite(t) and t > 0 for t in result["times_s"])
    assert math.isfinite(result["peak_mb"]) and result["peak_mb"] > 0
    every = bench.STEP_MODES[mode].get("every", 1)
    assert log["adamw_steps"] == 3 * every  # warm-up + 2 repeats, `every` optimizer steps each


def test_plain_vjp_and_fd_steps_run_the_forwards_train_py_runs(record):
    assert record("plain", batch=3)[1]["forwards"] == [(3, False)] * 2
    _, log = record("vjp", batch=3)
    assert log["forwards"] == [(3, True)] * 2  # the whole batch through the double-backward path
    assert log["norm_batches"] == [3, 3] and log["penalty_grads"] == [1.0, 1.0]  # Eq. 14, lambda 1


def test_fd_step_batches_x_t_and_the_shifted_x_t_in_one_plain_forward(record):
    _, log = record("fd", batch=3)
    assert log["forwards"] == [(6, False)] * 2 and log["norm_batches"] == []
    assert log["penalty_grads"] == [1.0, 1.0]


def test_reg_every4_does_four_optimizer_steps_per_repeat_one_regularized_with_the_penalty_times_4(record):
    result, log = record("reg-every4", repeats=2)
    assert log["adamw_steps"] == 12  # warm-up + 2 repeats
    # Per repeat: the regularized step first (step % k == 0 in train.py), then 3 plain steps.
    assert log["forwards"] == ([(2, True)] + [(2, False)] * 3) * 3
    assert log["norm_batches"] == [2] * 3
    assert log["penalty_grads"] == [4.0] * 3  # lazy regularization: the penalty scaled by k


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_reg_frac_regularizes_only_the_first_ceil_half_of_the_batch(record, batch):
    n = math.ceil(0.5 * batch)
    _, log = record("reg-frac0.5", batch=batch)
    # The regularized samples through the double-backward path, the rest through a plain forward.
    assert log["forwards"] == [(n, True), (batch - n, False)] * 2
    assert log["norm_batches"] == [n, n]


def test_vjp_ckpt_checkpoints_the_unet_blocks_and_vjp_does_not(record):
    assert record("vjp")[1]["checkpointed"] == 0
    assert record("vjp-ckpt")[1]["checkpointed"] > 0
