"""train.py and data.py on a tiny random SD (saved by diffusers) and a tiny image folder, on the CPU.

The training runs are subprocesses (as users run them), 4 steps of batch 2 x accumulation 2 at 16 px.
"""
import dataclasses
import contextlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import data
import lora
import regularizer
import runstate
import sampler
import train
from conftest import ROOT, perturb_, wait_for_lines
from toy import main_job

TINY = ["--resolution", "16", "--batch-size", "2", "--grad-accum", "2", "--num-workers", "0"]
CAPTIONS = ["a red circle", "a blue square on a red background", "a photo of a cat", "a dog", "a blue dog"]
OFFICIAL_KEY = re.compile(r".+\.attn[12]\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight")


def run_train(*args, nproc=1, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(ROOT / "train.py"), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def start_train(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def relative_difference(a, b):
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five captioned images of different sizes and aspect ratios, and one corrupt file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        pixels = rng.integers(0, 256, (20 + 6 * i, 36 - 4 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "broken.txt").write_text("a corrupt image")
    return folder


@pytest.fixture(scope="module")
def straight(tiny_sd, images, tmp_path_factory):
    """Four steps in one process: the reference for the distributed, resume and checkpointing runs."""
    out = tmp_path_factory.mktemp("straight")
    result = run_train("--model", tiny_sd[0], "--data", images, "--out", out, "--max-steps", 4, *TINY)
    return out, result


def test_a_few_steps_write_an_official_layout_lora_that_moved_and_report_the_corrupt_image(straight, tiny_sd):
    out, result = straight
    lora = load_file(out / "smooth_lora.safetensors")
    attention_modules = [n for n, _ in tiny_sd[1].unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert len(lora) == len(attention_modules) * 4 * 2  # to_q, to_k, to_v, to_out; down and up
    assert all(OFFICIAL_KEY.fullmatch(k) for k in lora), sorted(lora)[:4]
    ups = [v for k, v in lora.items() if k.endswith(".up.weight")]
    assert all(v.abs().max() > 0 for v in ups)  # up starts at zero; every one was trained
    assert "skipped 1 unreadable images" in result.stdout
    assert "broken.jpg" in result.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss_reg"] > 0 and r["var_norm"] > 0 for r in log)
    assert log[-1]["a"] > 0 and log[-1]["samples_seen"] == 4 * 2 * 2
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["regularizer"]["a"].item() == pytest.approx(log[-1]["a"])
    assert re.search(r"done: 4 steps .* images/s, .* peak", result.stdout)


def test_two_processes_of_batch_1_give_the_lora_of_one_process_of_batch_2(straight, tiny_sd, images,
                                                                          tmp_path):
    run_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 4,
              *TINY, "--batch-size", 1, nproc=2)
    one = load_file(straight[0] / "smooth_lora.safetensors")
    two = load_file(tmp_path / "smooth_lora.safetensors")
    assert relative_difference(one, two) < 1e-3
    a1 = torch.load(straight[0] / "state.pt", weights_only=True)["regularizer"]["a"]
    a2 = torch.load(tmp_path / "state.pt", weights_only=True)["regularizer"]["a"]
    assert torch.allclose(a1, a2, rtol=1e-4)


def test_stopping_at_2_and_resuming_to_4_equals_a_straight_run_to_4(straight, tiny_sd, images, tmp_path):
    common = ["--model", tiny_sd[0], "--data", images, "--out", tmp_path, *TINY]
    run_train(*common, "--max-steps", 2)
    resumed = run_train(*common, "--max-steps", 4, "--resume", "auto")
    assert "resumed from" in resumed.stdout and "done: 2 steps (to step 4)" in resumed.stdout
    assert relative_difference(load_file(straight[0] / "smooth_lora.safetensors"),
                               load_file(tmp_path / "smooth_lora.safetensors")) < 1e-5
    log = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_gradient_checkpointing_gives_the_same_regularized_training(straight, tiny_sd, images, tmp_path):
    run_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 4, *TINY,
              "--gradient-checkpointing")
    assert relative_difference(load_file(straight[0] / "smooth_lora.safetensors"),
                               load_file(tmp_path / "smooth_lora.safetensors")) < 1e-5


def test_fd_mode_with_lazy_and_partial_regularization_regularizes_every_kth_step(tiny_sd, images, tmp_path):
    run_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 3, *TINY,
              "--reg-mode", "fd", "--reg-every", 2, "--reg-batch-frac", 0.5)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["regularized"] for r in log] == [True, False, True]
    assert log[0]["loss_reg"] > 0 and log[1]["loss_reg"] == 0 and log[1]["a"] == log[0]["a"] > 0
    assert log[0]["loss"] == pytest.approx(log[0]["loss_base"] + 2 * log[0]["loss_reg"], rel=1e-5)


def test_trajectory_direction_changes_what_the_fd_regularizer_trains(tiny_sd, images, tmp_path):
    common = ["--model", tiny_sd[0], "--data", images, "--max-steps", 1, *TINY, "--reg-mode", "fd"]
    run_train(*common, "--out", tmp_path / "random")
    run_train(*common, "--out", tmp_path / "trajectory", "--reg-direction", "trajectory")
    random, trajectory = (load_file(tmp_path / n / "smooth_lora.safetensors") for n in ("random", "trajectory"))
    log = json.loads((tmp_path / "trajectory" / "log.jsonl").read_text().splitlines()[0])
    assert log["regularized"] and log["loss_reg"] > 0
    assert relative_difference(random, trajectory) > 1e-4


def test_lazy_regularization_compounds_the_decay_and_timestep_buckets_start_at_the_first_mean(tiny_sd, images,
                                                                                              tmp_path):
    common = ["--model", tiny_sd[0], "--data", images, "--max-steps", 1, *TINY, "--grad-accum", 1]
    run_train(*common, "--out", tmp_path / "lazy", "--reg-every", 3)
    (record,) = [json.loads(line) for line in (tmp_path / "lazy" / "log.jsonl").read_text().splitlines()]
    # a was 0; one update with decay 1 - 0.99^3, so a moves as far in 3 steps as every-step regularization
    assert record["a"] == pytest.approx((1 - 0.99 ** 3) * record["var_norm"], rel=1e-5)
    run_train(*common, "--out", tmp_path / "buckets", "--reg-timestep-buckets", 4)
    (record,) = [json.loads(line) for line in (tmp_path / "buckets" / "log.jsonl").read_text().splitlines()]
    started = [a for a in record["a_per_bucket"] if a > 0]
    assert len(record["a_per_bucket"]) == 4 and 1 <= len(started) <= 2  # the batch's 2 samples' buckets
    assert np.mean(started) == pytest.approx(record["var_norm"], rel=1e-5)  # each bucket = its first mean


def test_sigkill_during_training_leaves_a_loadable_checkpoint(tiny_sd, images, tmp_path):
    proc = start_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 10_000,
                       "--save-every", 1, *TINY)
    try:
        wait_for_lines(tmp_path / "log.jsonl", 3, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    lora = load_file(tmp_path / "smooth_lora.safetensors")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert len(lora) > 0 and all(OFFICIAL_KEY.fullmatch(k) for k in lora)
    assert state["step"] >= 2 and set(state) >= {"lora", "optimizer", "regularizer", "rng", "samples_seen"}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_the_current_step_and_exit_128_plus_the_signal(tiny_sd, images, tmp_path,
                                                                               signum, code):
    proc = start_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 10_000,
                       "--save-every", 1000, *TINY)
    wait_for_lines(tmp_path / "log.jsonl", 1, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr  # not 0: a job scheduler must not think the run finished
    assert "stopped by signal" in stdout + stderr and "Traceback" not in stderr
    last_logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"]
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == last_logged


def test_a_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tiny_sd, images, tmp_path):
    # lr 1e30 makes the LoRA weights ~1e30 after step 1, so step 2's output overflows.
    result = run_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 5,
                       "--save-every", 1, "--lr", 1e30, *TINY, check=False)
    assert result.returncode != 0
    assert "loss is nan at step 2" in result.stderr
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 1


def test_bad_input_is_a_clear_error_before_training(tiny_sd, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"image": "img0.png", "text": "x"}) + "\n")  # not next to the JSONL
    no_caption = tmp_path / "no_caption"
    no_caption.mkdir()
    Image.new("RGB", (8, 8)).save(no_caption / "a.png")
    out = tmp_path / "out"
    cases = [
        (["--data", empty], "no images found"),
        (["--data", jsonl], "do not exist"),
        (["--data", no_caption], "no caption file"),
        (["--data", images, "--resolution", 18], "not a multiple of 4 (this model's VAE downsamples by 2 and "
                                                 "its UNet by 2): use e.g. 16"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            train.main(["--model", str(tiny_sd[0]), "--out", str(out), *map(str, args)])
        assert message in str(e.value.code)
    # And as the user sees it: a non-zero exit with the message, before anything is written.
    result = run_train("--model", images, "--data", images, "--out", out, *TINY, check=False)
    assert result.returncode != 0 and "error" in result.stderr and str(images) in result.stderr
    assert not out.exists()


def test_jsonl_paths_are_relative_to_the_jsonl_folder(images, tmp_path):
    jsonl = images / "captions.jsonl"
    lines = [json.dumps({"image": f"img{i}.png", "text": c}) for i, c in enumerate(CAPTIONS)]
    jsonl.write_text("\n".join(lines) + "\n")
    try:
        items = data.list_items(jsonl)
    finally:
        jsonl.unlink()
    assert items == [(str(images / f"img{i}.png"), c) for i, c in enumerate(CAPTIONS)]


def test_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    x = np.arange(32, dtype=np.uint8) * 8  # red = 8 * column
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[..., 0] = x
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = data.load_training_image(tmp_path / "wide.png", 16)  # short side already 16: only the crop acts
    assert image.shape == (3, 16, 16)
    expected_red = torch.from_numpy(x[8:24].astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(image[0, 0], expected_red)
    assert data.load_training_image(tmp_path / "wide.png", 8).shape == (3, 8, 8)


def test_data_order_depends_on_the_global_position_only():
    def take(rank, world, batch, start=0, n=12):
        return list(itertools.islice(data.stream_keys(5, 3, start, rank, world, batch), n))

    one = take(0, 1, 2, n=24)
    r0, r1 = take(0, 2, 1), take(1, 2, 1)
    assert [x for pair in zip(r0, r1) for x in pair] == one  # rank r takes slice r of each global batch
    assert [key for _, key in one] == list(range(24))
    for epoch in range(4):  # each epoch is a permutation of all items
        assert sorted(i for i, key in one if key // 5 == epoch) == list(range(5))
    assert take(0, 1, 2, start=8, n=16) == one[8:]  # resuming at a data position continues the stream
    assert [i for i, _ in one[:5]] != [i for i, _ in one[5:10]]  # a new order each epoch


def test_toy_world_defaults_apply_unless_the_flag_was_given(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(main_job, "prepare_data", written.append)
    monkeypatch.setattr(main_job, "ROOT", tmp_path)
    cfg, explicit = train.parse_args(["--lr=5e-4", "--max-steps", "7"])
    main_job.use_toy_world(cfg, explicit, master=True)
    assert cfg.lr == 5e-4 and cfg.max_steps == 7  # given on the command line
    for name, value in main_job.TRAIN_DEFAULTS.items():
        if name not in ("lr", "max_steps"):
            assert getattr(cfg, name) == value
    assert cfg.model == str(tmp_path / "assets" / "toy-sd") and cfg.out == str(tmp_path / "runs" / "toy")
    assert written == [cfg.data] and cfg.data == str(tmp_path / "data" / "toy")


def test_partial_regularization_equals_its_per_sample_pieces(tiny_sd, images):
    """--reg-batch-frac 0.5 on [s0, s1]: d/dw of mean(base0, base1) + reg(s0), with s1 in a plain forward."""
    models = checkpoint.load_models(tiny_sd[0])
    lora.inject_lora(models.unet, rank=2)
    params = lora.freeze_all_but_lora(models.unet)
    perturb_(models.unet.requires_grad_(False))  # non-zero LoRA up weights, so that every grad is non-zero
    lora.freeze_all_but_lora(models.unet)
    reg = regularizer.StepwiseVariationRegularizer().eval()  # a fixed running mean
    reg.a.fill_(0.3)
    schedule = sampler.make_schedule(models.scheduler_config)
    dataset = data.CaptionDataset(images, 16)
    s0, s1 = dataset[(0, 10)], dataset[(1, 11)]

    def step(samples, regularize, **config):
        loss, base, loss_reg, _ = train.micro_step(
            train.TrainConfig(**config), models.unet, models, reg, data.collate(samples), schedule, regularize,
            torch.device("cpu"), contextlib.nullcontext)
        return base, loss_reg, torch.autograd.grad(loss, params)

    base, loss_reg, grads = step([s0, s1], True, reg_batch_frac=0.5)
    base0_reg0, reg0, grads0_reg0 = step([s0], True)
    base0, _, grads0 = step([s0], False)
    base1, _, grads1 = step([s1], False)
    assert base.item() == pytest.approx((base0 + base1).item() / 2, rel=1e-5)
    assert base0_reg0.item() == pytest.approx(base0.item(), rel=1e-6)
    assert loss_reg.item() == pytest.approx(reg0.item(), rel=1e-5) and reg0 > 0
    for g, g0r, g0, g1 in zip(grads, grads0_reg0, grads0, grads1):
        torch.testing.assert_close(g, g0r - g0 / 2 + g1 / 2, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ issue 14

def lora_bytes(out):
    return (out / "smooth_lora.safetensors").read_bytes()


def test_validation_strips_istd_in_the_log_and_a_resume_with_validation_stays_bit_exact(straight, tiny_sd,
                                                                                         images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue dog\n")
    common = ["--model", tiny_sd[0], "--data", images, "--out", tmp_path / "run", *TINY, "--validate-every", 2,
              "--validation-prompts", prompts, "--validation-steps", 2]
    run_train(*common, "--max-steps", 2)
    run_train(*common, "--max-steps", 4, "--resume")  # no value: auto
    folder = tmp_path / "run" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["progress.png", "step-0.png", "step-2.png", "step-4.png"]
    step_image = Image.open(folder / "step-2.png")
    assert step_image.size == (90 + 11 * 64, 2 * 64)  # a label column, 11 frames x 2 prompts, 16 px drawn 4x
    label = np.asarray(step_image.convert("L"))[:, :90]
    assert (label[:64] < 128).sum() > 20 and (label[64:] < 128).sum() > 20  # each row has its step / ISTD text
    assert Image.open(folder / "progress.png").size == (step_image.width, 3 * (step_image.height + 2))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    assert [("istd" in r) for r in log] == [True, False, True, False, True]
    assert all(r["istd"] > 0 and r["mean_adjacent_distance"] > 0 for r in log if "istd" in r)
    # Validating (the sampler, rank 0) does not touch the training RNG or data: the same bytes as the
    # straight run without validation.
    assert lora_bytes(tmp_path / "run") == lora_bytes(straight[0])


def test_official_file_name_caption_jsonl_with_a_data_root(images, tmp_path):
    jsonl = tmp_path / "meta" / "train.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"file_name": f"img{i}.png", "caption": c}) + "\n"
                             for i, c in enumerate(CAPTIONS)))
    assert data.list_items(jsonl, root=images) == [(str(images / f"img{i}.png"), c) for i, c in enumerate(CAPTIONS)]
    with pytest.raises(ValueError, match="Relative paths are read from .*meta.*--data-root"):
        data.list_items(jsonl)  # the images are not next to the JSONL
    jsonl.write_text(json.dumps({"path": "img0.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r'train.jsonl:1: expected a JSON object \{"file_name": path, '
                                         r'"caption": caption\} or \{"image": path, "text": caption\}'):
        data.list_items(jsonl, root=images)


def test_snapshots_keep_the_newest_k_and_the_last_equals_the_final_lora(tiny_sd, images, tmp_path):
    run_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 4, *TINY,
              "--snapshot-every", 1, "--keep-snapshots", 2)
    assert sorted(p.name for p in tmp_path.glob("smooth_lora*")) == [
        "smooth_lora-step3.safetensors", "smooth_lora-step4.safetensors", "smooth_lora.safetensors"]
    assert (tmp_path / "smooth_lora-step4.safetensors").read_bytes() == lora_bytes(tmp_path)
    assert load_file(tmp_path / "smooth_lora-step3.safetensors").keys() == load_file(tmp_path /
                                                                                     "smooth_lora.safetensors").keys()


def test_a_resume_with_other_settings_is_refused_unless_overridden_and_then_the_optimizer_uses_them(
        tiny_sd, images, tmp_path):
    common = ["--model", tiny_sd[0], "--data", images, "--out", tmp_path, *TINY]
    run_train(*common, "--max-steps", 2)
    before = (lora_bytes(tmp_path), (tmp_path / "state.pt").read_bytes())
    refused = run_train(*common, "--max-steps", 3, "--resume", "--lr", 0.1, "--lambda-reg", 0, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert ("train.py: error: --resume: the checkpoint was trained with other settings (--lr: saved 0.0001, "
            "now 0.1; --lambda-reg: saved 1.0, now 0.0)") in refused.stderr
    assert "--resume-override lr,lambda_reg" in refused.stderr
    assert (lora_bytes(tmp_path), (tmp_path / "state.pt").read_bytes()) == before  # nothing touched
    resumed = run_train(*common, "--max-steps", 3, "--resume", "--lr", 0.1, "--lambda-reg", 0,
                        "--resume-override", "lr,lambda_reg")
    assert "lr 0.0001 -> 0.1 (--resume-override)" in resumed.stdout
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1 and state["config"]["lr"] == 0.1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[2] == {"step": 2, "resume_override": {"lr": [0.0001, 0.1], "lambda_reg": [1.0, 0.0]}}
    assert log[3]["step"] == 3 and log[3]["lr"] == 0.1 and log[3]["regularized"] is False


def test_bad_inputs_end_in_one_error_line_and_leave_the_run_untouched(tiny_sd, images, tmp_path):
    common = ["--model", tiny_sd[0], "--data", images, "--out", tmp_path / "run", *TINY, "--rank", 2]
    run_train(*common, "--max-steps", 1)
    state = tmp_path / "run" / "state.pt"
    good = state.read_bytes()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for i in range(2):
        (unreadable / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        (unreadable / f"{i}.txt").write_text("a dog")
    single_file = tmp_path / "model.safetensors"
    single_file.write_bytes(b"x")

    def error_of(*args, state_bytes=good):
        state.write_bytes(state_bytes)
        before = lora_bytes(tmp_path / "run")
        result = run_train(*args, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert state.read_bytes() == state_bytes and lora_bytes(tmp_path / "run") == before  # nothing lost
        (line,) = [l for l in result.stderr.splitlines() if l.startswith("train.py: error: ")]
        return line

    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()  # the unpickler's
    assert "not a readable train.py checkpoint" in error_of(*common, "--resume", state_bytes=garbage)  # error varies
    assert "not a readable train.py checkpoint" in error_of(*common, "--resume", state_bytes=good[:len(good) // 2])
    assert "--rank: saved 2, now 4" in error_of(*common[:-1], 4, "--resume")
    assert "rank, lora_targets, reg_timestep_buckets cannot change" in error_of(*common[:-1], 4, "--resume",
                                                                     "--resume-override", "rank")
    assert "none of the 2 images can be read" in error_of(*common, "--data", unreadable)
    assert "pass --tokenizer FOLDER" in error_of(*common, "--model", single_file)
    assert "not a multiple of 4" in error_of(*common, "--resolution", 18)
    assert "fp16 needs a CUDA GPU" in error_of(*common, "--mixed-precision", "fp16", "--device", "cpu")
    assert "is not a setting a resume checks" in error_of(*common, "--resume", "--resume-override", "out")
    if not torch.cuda.is_available():
        assert "no usable CUDA GPU" in error_of(*common, "--device", "cuda")


def test_help_shows_the_toy_world_defaults():

    help_text = " ".join(train.build_parser().format_help().split())
    for name, value in main_job.TRAIN_DEFAULTS.items():
        assert f"toy world (no --model): {value}" in help_text, name
    assert "optimizer steps (paper: 30k); toy world (no --model): 300 (default: 30000)" in help_text


def test_world_size_independence_with_a_corrupt_image_in_the_issue_14_setting(tiny_sd, tmp_path):
    """12 captioned 80x64 images + a corrupt PNG, 64 px, rank 4, lambda 1, 4 steps of accumulation 2:
    1 process x batch 2 == 2 processes x batch 1 (to fp32 reduction noise)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    (folder / "corrupt.png").write_bytes((folder / "00.png").read_bytes()[:300])  # a truncated PNG
    (folder / "corrupt.txt").write_text("a corrupt image")
    common = ["--model", tiny_sd[0], "--data", folder, "--resolution", 64, "--rank", 4, "--lambda-reg", 1,
              "--seed", 0, "--grad-accum", 2, "--max-steps", 4, "--num-workers", 1]
    one = run_train(*common, "--out", tmp_path / "one", "--batch-size", 2)
    two = run_train(*common, "--out", tmp_path / "two", "--batch-size", 1, nproc=2)
    assert "skipped 1 unreadable images" in one.stdout and "skipped 1 unreadable images" in two.stdout
    assert relative_difference(load_file(tmp_path / "one" / "smooth_lora.safetensors"),
                               load_file(tmp_path / "two" / "smooth_lora.safetensors")) < 1e-4


# ------------------------------------------------------------------------------ issue 12

def test_bf16_regularized_run_on_cpu_has_finite_losses_an_fp32_lora_and_ends_near_the_fp32_run(straight, tiny_sd,
                                                                                                 images, tmp_path):
    """bf16 autocast (frozen weights bf16; LoRA, AdamW state and a fp32) vs the fp32 `straight` run.

    bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per op), so the logged losses may differ by
    a few tenths of a percent (measured: <= 0.28% over 4 steps; tolerance 2%). The LoRA's up weights start at 0
    and are the sum of 4 AdamW updates; Adam moves every element by ~lr whatever its gradient's size, so an
    element whose gradient is within bf16 noise of 0 can move either way: measured 9.1% relative difference
    (tolerance 25%; a wrong gradient, e.g. a dropped regularizer or a bf16 LoRA, differs by ~100%).
    """
    result = run_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 4, *TINY,
                       "--mixed-precision", "bf16", "--device", "cpu")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (straight[0] / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["loss_reg"] > 0 for r in log)
    for r, f in zip(log, ref):
        for key in ("loss", "loss_base", "loss_reg", "a"):
            assert r[key] == pytest.approx(f[key], rel=0.02), (r["step"], key)
    bf16, fp32 = load_file(tmp_path / "smooth_lora.safetensors"), load_file(straight[0] / "smooth_lora.safetensors")
    assert {v.dtype for v in bf16.values()} == {torch.float32}
    ups = [k for k in bf16 if k.endswith(".up.weight")]
    difference = math.sqrt(sum((bf16[k] - fp32[k]).norm() ** 2 for k in ups) / sum(fp32[k].norm() ** 2 for k in ups))
    assert 0 < difference < 0.25
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["regularizer"]["a"].dtype == torch.float32
    assert {v.dtype for s in state["optimizer"]["state"].values() for v in s.values() if v.ndim} == {torch.float32}


def test_device_default_and_backend_choice(monkeypatch):
    cfg = train.TrainConfig()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runstate.resolve_device(cfg, local_rank=0) == torch.device("cpu")
    with pytest.raises(ValueError, match="no usable CUDA GPU"):
        runstate.resolve_device(train.TrainConfig(device="cuda"), local_rank=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runstate.resolve_device(cfg, local_rank=3) == torch.device("cuda", 3)  # torchrun's LOCAL_RANK
    assert runstate.resolve_device(train.TrainConfig(device="cpu"), local_rank=3) == torch.device("cpu")
    assert runstate.process_group_backend(torch.device("cuda", 3)) == "nccl"
    assert runstate.process_group_backend(torch.device("cpu")) == "gloo"


DDP_CHECK = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
import lora, regularizer, sampler, train
from conftest import TINY_UNET, perturb_
from unet import UNet, UNetConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
unet = perturb_(UNet(UNetConfig(**{k: v for k, v in TINY_UNET.items()})))
lora.inject_lora(unet, rank=2)
params = lora.freeze_all_but_lora(unet)
perturb_(unet.requires_grad_(False))
params = lora.freeze_all_but_lora(unet)
abar = sampler.make_schedule().alphas_cumprod
reg = regularizer.StepwiseVariationRegularizer().eval()
reg.a.fill_(0.3)
g = torch.Generator().manual_seed(10 + rank)  # each rank its own micro-batches
batches = [dict(latents=torch.randn(2, 4, 8, 8, generator=g), noise=torch.randn(2, 4, 8, 8, generator=g),
                direction=torch.randn(2, 4, 8, 8, generator=g), t=torch.randint(0, 1000, (2,), generator=g),
                text=torch.randn(2, 77, 32, generator=g)) for _ in range(2)]

def accumulate(model):
    for micro, b in enumerate(batches):
        with model.no_sync() if isinstance(model, DDP) and micro == 0 else torch.enable_grad():
            loss, *_ = train.smooth_diffusion_loss(model, b["latents"], b["noise"], b["t"], b["text"],
                                                   b["direction"], abar, reg=reg, reg_mode="vjp")
            (loss / len(batches)).backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return grads

local = accumulate(unet)  # this rank's accumulated gradient, no communication
expected = local.clone()
dist.all_reduce(expected)
expected /= 2
calls = []
def counting_allreduce(state, bucket):
    calls.append(len(calls))
    return allreduce_hook(state, bucket)
ddp = DDP(unet, find_unused_parameters=False)
ddp.register_comm_hook(dist.group.WORLD, counting_allreduce)
reduced = accumulate(ddp)
torch.testing.assert_close(reduced, expected, rtol=1e-5, atol=1e-7)
assert not torch.allclose(local, expected)  # the ranks' gradients differ: the all-reduce did something
print(f"rank {rank}: buckets all-reduced {len(calls)}, max grad diff {(reduced - expected).abs().max():.2e}")
del ddp
dist.destroy_process_group()
'''


def test_ddp_with_the_double_backward_all_reduces_once_per_optimizer_step_under_accumulation(tmp_path):
    """find_unused_parameters=False with Eq. 10's double backward (vjp) and no_sync on all but the last
    micro-step: every LoRA gradient is the mean of the ranks' accumulated gradients, with one bucket
    all-reduce pass per optimizer step (the tiny UNet's LoRA fits one 25 MB bucket)."""
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(ROOT)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("buckets all-reduced 1,") == 2, result.stdout


def test_a_resume_refuses_another_regularizer_form_unless_overridden():
    cfg, _ = train.parse_args(["--reg-normalize", "relative"])
    saved = {**dataclasses.asdict(cfg), "reg_normalize": "none"}
    with pytest.raises(ValueError, match="--reg-normalize: saved none, now relative"):
        runstate.resume_changes(cfg, saved)
    cfg, _ = train.parse_args(["--reg-normalize", "relative", "--resume-override", "reg_normalize"])
    assert runstate.resume_changes(cfg, saved) == {"reg_normalize": ("none", "relative")}


def test_all_linear_lora_trains_every_linear_saves_peft_and_loads_back_to_the_same_model(tiny_sd, images,
                                                                                          tmp_path):
    run_train("--model", tiny_sd[0], "--data", images, "--out", tmp_path, "--max-steps", 2, *TINY,
              "--lora-targets", "all-linear")
    saved = load_file(tmp_path / "smooth_lora.safetensors")
    unet = checkpoint.load_models(tiny_sd[0]).unet
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in saved} == linears
    assert any(".ff." in n for n in linears) and any("time_emb" in n for n in linears)  # beyond attention
    assert all(v.abs().max() > 0 for k, v in saved.items() if k.endswith("lora_B.weight"))  # all trained
    # The file alone rebuilds the trained UNet: equal to the LoRA weights in the checkpoint, and its
    # output differs from the base model's.
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, text)
        assert len(lora.load_lora(unet, tmp_path / "smooth_lora.safetensors")) == len(linears)
        after = unet(x, t, text)
    trained = {k: v for k, v in unet.named_parameters() if "lora" in k}
    assert trained.keys() == state["lora"].keys()
    assert all(torch.equal(trained[k], state["lora"][k]) for k in trained)
    assert (after - before).abs().max() > 1e-6


def test_a_resume_never_changes_the_lora_targets_and_older_checkpoints_count_as_attention():
    cfg, _ = train.parse_args(["--lora-targets", "all-linear", "--resume-override", "lora_targets"])
    with pytest.raises(ValueError, match="--lora-targets: saved attention, now all-linear"):
        runstate.resume_changes(cfg, {**dataclasses.asdict(cfg), "lora_targets": "attention"})
    cfg, _ = train.parse_args([])
    older = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("lora_targets", "reg_normalize")}
    assert runstate.resume_changes(cfg, older) == {}
