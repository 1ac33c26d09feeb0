"""Issue 24, nothing lost, nothing silent: an output folder belongs to one run, every input is checked before
anything is written, images are read the way viewers show them, a resume checks its data, the toy world's
control stops and resumes like any run, and every numeric flag of train.py and sampler.py is bounded.

Training runs are subprocesses (as users run them) on a tiny random SD at 16 px.
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import runstate
import sampler
import train
from conftest import ROOT, wait_for_lines
from demos import cli as sampler_cli
from demos import media

TINY = ["--resolution", "16", "--batch-size", "2", "--grad-accum", "1", "--num-workers", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(*args, check=True):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                            text=True, timeout=600, env=ENV)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def start_train(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_of(*args):
    """train.py's one error line for `args`, run in this process (faster than a subprocess)."""
    with pytest.raises(SystemExit) as refused:
        train.main([str(a) for a in args])
    message = str(refused.value.code)
    assert message.startswith("train.py: error: ") and "\n" not in message, message
    return message


def error_line(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("train.py: error: ")]
    return line


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red circle", "a blue dog", "a photo of a cat", "a dog"]):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


# ------------------------------------------------------------------------ 1. an output folder, one run

def test_a_second_run_on_a_folder_in_use_is_refused_before_it_writes_and_the_lock_goes_with_the_run(
        tiny_sd, images, tmp_path):
    out = tmp_path / "run"
    first = start_train("--model", tiny_sd[0], "--data", images, "--out", out, *TINY, "--max-steps", 10_000,
                        "--save-every", 1)
    try:
        wait_for_lines(out / "log.jsonl", 2, first, timeout=180)
        for extra in ([], ["--resume"], ["--overwrite"]):  # another seed, a resume, a start over: all refused
            before = folder_bytes(out)
            second = error_of("--model", tiny_sd[0], "--data", images, "--out", out, *TINY, "--max-steps", 3,
                              "--seed", 7, *extra)
            assert f"--out {out} is in use by another run (PID {first.pid} on " in second
            # The first run went on writing meanwhile: what it wrote only grows, nothing of the second's.
            log = out / "log.jsonl"
            assert log.read_bytes().startswith(before[log.relative_to(out)])
            assert all(json.loads(l)["step"] == k for k, l in enumerate(log.read_text().splitlines(), 1))
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143 and not (out / runstate.LOCK).exists()
    assert torch.load(out / "state.pt", weights_only=True)["config"]["seed"] == 0


def test_a_stale_lock_is_recognised_by_its_dead_pid_and_the_message_says_how_to_clear_it(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    world = runstate.World()
    (tmp_path / runstate.LOCK).write_text(json.dumps(dict(pid=gone.pid, host=__import__("socket").gethostname(),
                                                          started=time.time())))
    with pytest.raises(ValueError) as refused:
        runstate.lock_out(tmp_path, world)
    assert f"no longer running (PID {gone.pid} on" in str(refused.value)
    assert f"rm {tmp_path / runstate.LOCK}" in str(refused.value) and "--resume" in str(refused.value)
    (tmp_path / runstate.LOCK).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable: if no run writes to .* remove it"):
        runstate.lock_out(tmp_path, world)
    (tmp_path / runstate.LOCK).unlink()
    lock = runstate.lock_out(tmp_path, world)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(ValueError, match=f"in use by another run \\(PID {os.getpid()} "):
        runstate.lock_out(tmp_path, world)  # of two claims, only the first wins
    runstate.unlock_out(lock)
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_run_over_another_run_is_refused_and_overwrite_starts_over(tiny_sd, images, tmp_path):
    common = ["--model", tiny_sd[0], "--data", images, "--out", tmp_path, *TINY]
    run_train(*common, "--max-steps", 2, "--snapshot-every", 1)
    before = folder_bytes(tmp_path)
    line = error_of(*common, "--max-steps", 1, "--seed", 3)
    assert "holds another run (state.pt, log.jsonl, smooth_lora.safetensors)" in line
    assert "Continue it with --resume, start over with --overwrite" in line
    assert folder_bytes(tmp_path) == before
    run_train(*common, "--max-steps", 1, "--seed", 3, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "smooth_lora.safetensors", "state.pt"]
    assert [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]
    assert torch.load(tmp_path / "state.pt", weights_only=True)["config"]["seed"] == 3


def test_the_ranks_of_one_torchrun_job_share_the_lock(tiny_sd, images, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*launcher, str(ROOT / "train.py"), "--model", str(tiny_sd[0]), "--data", str(images),
                             "--out", str(tmp_path), *TINY, "--batch-size", "1", "--max-steps", "1"],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "state.pt").exists() and not (tmp_path / runstate.LOCK).exists()


# ------------------------------------------------------------- 2. every input checked before writing

def test_bad_inputs_are_refused_before_anything_is_written(tiny_sd, images, tmp_path):
    out = tmp_path / "run"
    common = ["--model", tiny_sd[0], "--data", images, "--out", out, *TINY]
    run_train(*common, "--max-steps", 1)
    (tmp_path / "empty.txt").write_text("\n   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "a-file").write_text("not a folder")
    for name, record in [("null-file", {"file_name": None, "caption": "a dog"}),
                         ("null-caption", {"file_name": "img0.png", "caption": None}),
                         ("number-caption", {"image": "img0.png", "text": 5})]:
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
    before = folder_bytes(out)
    cases = [
        (["--resume", "--validate-every", 1, "--validation-prompts", tmp_path / "empty.txt"],
         f"--validation-prompts {tmp_path / 'empty.txt'} has no prompts"),
        (["--resume", "--validate-every", 1, "--validation-prompts", tmp_path / "latin1.txt"], "is not UTF-8 text"),
        (["--resume", "--lr", -1], "--lr must be > 0 and finite, got -1.0"),
        (["--resume", "--lr", "nan"], "--lr must be > 0 and finite, got nan"),
        (["--resume", "--reg-decay", "inf"], "--reg-decay must be in (0, 1] and finite, got inf"),
        (["--resume", "--validation-steps", 1001], "--validation-steps 1001: this model's schedule has 1000 "
                                                   "timesteps; use 1 to 1000"),
        (["--overwrite", "--reg-timestep-buckets", 1001], "--reg-timestep-buckets 1001: this model's schedule"),
        (["--resume", "--seed", 2**64], "--seed must be in [0, 18446744073709551615], got 18446744073709551616"),
        (["--overwrite", "--data", tmp_path / "null-file.jsonl"], 'null-file.jsonl:1: expected a JSON object'),
        (["--overwrite", "--data", tmp_path / "null-caption.jsonl", "--data-root", images],
         '"caption" is null, not a string'),
        (["--overwrite", "--data", tmp_path / "number-caption.jsonl", "--data-root", images],
         '"text" is 5, not a string'),
    ]
    for args, message in cases:
        assert message in error_of(*common, *args), args
        assert folder_bytes(out) == before, args
    assert cases[0][1] in error_line(run_train(*common, *cases[0][0], check=False))  # as a user sees it
    file_out = ["--model", tiny_sd[0], "--data", images, "--out", tmp_path / "a-file", *TINY]
    assert f"--out {tmp_path / 'a-file'} is a file, not a folder" in error_of(*file_out)
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_jsonl_values_must_be_strings_and_caption_files_utf8(images, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    for record, message in [({"file_name": None, "caption": "x"}, '"file_name" is null, not a string'),
                            ({"file_name": "img0.png", "caption": None}, '"caption" is null, not a string'),
                            ({"file_name": " ", "caption": "x"}, '"file_name" is an empty path'),
                            ({"image": ["img0.png"], "text": "x"}, r'"image" is \["img0.png"\], not a string')]:
        jsonl.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=message):
            data.list_items(jsonl, root=images)
    folder = tmp_path / "folder"
    shutil.copytree(images, folder)
    (folder / "img1.txt").write_bytes(b"\xff\xfe a dog")
    with pytest.raises(ValueError, match=f"{folder / 'img1.txt'} is not UTF-8 text"):
        data.list_items(folder)


def test_the_ddim_grid_at_1000_steps_is_every_timestep_once_where_diffusers_indexes_past_the_end():
    from diffusers import DDIMScheduler

    from conftest import SD15_SCHEDULER

    schedule = sampler.make_schedule()
    assert sampler.ddim_timesteps(1000, schedule).tolist() == list(range(999, -1, -1))
    assert sampler.ddim_timesteps(999, schedule)[[0, -1]].tolist() == [999, 1]  # one below: the offset stays
    ref = DDIMScheduler.from_config(SD15_SCHEDULER)
    ref.set_timesteps(1000)
    assert ref.timesteps[0].item() == 1000  # diffusers keeps the offset ...
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(IndexError):
        ref.step(x, ref.timesteps[0].item(), x)  # ... and its first step reads abar_1000 of a 1000-entry schedule
    no_offset = sampler.make_schedule({"steps_offset": 0})
    ref = DDIMScheduler.from_config({**SD15_SCHEDULER, "steps_offset": 0})
    ref.set_timesteps(1000)
    assert sampler.ddim_timesteps(1000, no_offset).tolist() == ref.timesteps.tolist()  # no offset: the same grid


def test_sampling_inversion_and_interpolation_run_at_1000_steps_the_boundary(tiny_sd, tmp_path):
    def unet(x, t, context):  # eps does not depend on x: inversion then sampling is exact
        return torch.full_like(x, 0.1) + t.view(-1, 1, 1, 1) * 1e-4

    cond = torch.zeros(1, 77, 8)
    x0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    x_T = sampler.ddim_invert(unet, x0, cond, steps=1000, progress=False)
    back = sampler.ddim_sample(unet, x_T, cond, steps=1000, guidance=1.0, progress=False)
    torch.testing.assert_close(back, x0, rtol=1e-3, atol=1e-3)
    out = tmp_path / "gen"
    assert sampler_cli.main(["generate", "--model", str(tiny_sd[0]), "--steps", "1000", "--out", str(out)]) == 0
    assert np.isfinite(np.asarray(Image.open(out / "sample.png"), dtype=float)).all()
    cfg = train.TrainConfig(validation_steps=1000, resolution=16)
    import checkpoint
    sd = checkpoint.load_models(tiny_sd[0])
    assert train.check_model_limits(cfg, sd) == (4, 8, 8)  # 1000 validation steps: allowed, the boundary


# ------------------------------------------------------------------------------- 3. one image reader

def _saved(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_read_image_scales_every_mode_to_8_bits_and_composites_transparency_on_white(tmp_path):
    grey16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    cases = {  # mode as PIL opens the file -> (file, the RGB pixels a viewer shows)
        "L": (_saved(tmp_path, "l.png", Image.fromarray(np.array([[0, 100, 255]], np.uint8))),
              [(0,) * 3, (100,) * 3, (255,) * 3]),
        "1": (_saved(tmp_path, "1.png", Image.fromarray(np.array([[0, 255, 0]], np.uint8)).convert("1")),
              [(0,) * 3, (255,) * 3, (0,) * 3]),
        "LA": (_saved(tmp_path, "la.png", Image.fromarray(np.array([[[100, 255], [100, 0], [0, 255]]], np.uint8),
                                                          mode="LA")), [(100,) * 3, (255,) * 3, (0,) * 3]),
        "RGBA": (_saved(tmp_path, "rgba.png", Image.fromarray(np.array(
            [[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 0]]], np.uint8))), [(10, 20, 30), (255,) * 3, (255,) * 3]),
        "P": (_saved(tmp_path, "p.png", palette), [(255, 0, 0), (0, 255, 0), (0, 0, 255)]),
        "P+transparency": (_saved(tmp_path, "pt.png", palette, transparency=1),
                           [(255, 0, 0), (255,) * 3, (0, 0, 255)]),
        "I;16": (_saved(tmp_path, "i16.png", Image.fromarray(grey16)), [(0,) * 3, (100,) * 3, (255,) * 3]),
        "I": (_saved(tmp_path, "i.tif", Image.fromarray(grey16.astype(np.int32))),
              [(0,) * 3, (100,) * 3, (255,) * 3]),
        "F": (_saved(tmp_path, "f.tif", Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))),
              [(0,) * 3, (128,) * 3, (255,) * 3]),
        "CMYK": (_saved(tmp_path, "cmyk.tif", Image.frombytes("CMYK", (3, 1), bytes(
            [0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 255]))), [(255, 0, 0), (255,) * 3, (0,) * 3]),
    }
    for mode, (path, expected) in cases.items():
        with Image.open(path) as opened:
            assert opened.mode == mode.split("+")[0], (mode, opened.mode)  # the file really is in that mode
        image = data.read_image(path)
        assert image.mode == "RGB" and list(image.getdata()) == expected, (mode, list(image.getdata()))


def test_exif_orientation_is_applied_and_training_and_the_demos_read_the_same_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 32, 3), dtype=np.uint8)  # stored 32 wide, 16 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer rotates it 90 degrees clockwise
    rgba = np.concatenate([pixels, np.full((16, 32, 1), 255, np.uint8)], axis=2)
    rgba[:, :4, 3] = 0  # a transparent strip on the stored left edge: the displayed top
    path = _saved(tmp_path, "rotated.png", Image.fromarray(rgba), exif=exif)
    shown = np.rot90(np.where(rgba[..., 3:] == 0, 255, pixels), k=-1)  # [32, 16, 3]
    assert np.array_equal(np.asarray(data.read_image(path)), shown)
    trained = data.load_training_image(path, 16)  # short side 16 already: only the centre crop acts
    assert torch.equal(((trained + 1) * 127.5).round().byte(), torch.from_numpy(shown[8:24].copy()).permute(2, 0, 1))
    demo = media.load_image01(path, 16, 32)
    assert torch.equal((demo[0] * 255).round().byte(), torch.from_numpy(shown.copy()).permute(2, 0, 1))


def test_a_16_bit_training_image_is_not_white_and_a_transparent_one_not_black(tmp_path):
    grey = (np.linspace(0, 65535, 16 * 16).reshape(16, 16)).astype(np.uint16)
    pixels = data.load_training_image(_saved(tmp_path, "g16.png", Image.fromarray(grey)), 16)
    torch.testing.assert_close(pixels[0], torch.from_numpy(np.round(grey / 257).astype(np.float32)) / 127.5 - 1)
    clear = _saved(tmp_path, "clear.png", Image.new("RGBA", (16, 16), (0, 0, 0, 0)))
    assert data.load_training_image(clear, 16).eq(1.0).all()  # white, as the sampler shows it


# ----------------------------------------------------------------------------- 4. a resume checks data

def test_a_resume_on_changed_data_is_refused_unless_overridden_and_the_log_records_it(tiny_sd, images, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(images, folder)
    out = tmp_path / "run"
    common = ["--model", tiny_sd[0], "--data", folder, "--out", out, *TINY]
    run_train(*common, "--max-steps", 1)
    saved = torch.load(out / "state.pt", weights_only=True)["data"]
    assert saved == data.fingerprint(data.list_items(folder), folder) and saved["count"] == 4
    shutil.copy(folder / "img0.png", folder / "img9.png")
    (folder / "img9.txt").write_text("a new image")
    before = folder_bytes(out)
    line = error_of(*common, "--max-steps", 2, "--resume")
    assert "the data changed since the checkpoint (4 images then, 5 now" in line
    assert "--resume-override data" in line and folder_bytes(out) == before
    resumed = run_train(*common, "--max-steps", 2, "--resume", "--resume-override", "data")
    assert "data_fingerprint" in resumed.stdout
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    old, new = log[1]["resume_override"]["data_fingerprint"]
    assert log[1]["step"] == 1 and old == saved and new["count"] == 5 and log[2]["step"] == 2
    assert torch.load(out / "state.pt", weights_only=True)["data"] == new


def test_the_fingerprint_sees_names_sizes_captions_and_count_and_older_checkpoints_still_resume(
        tiny_sd, images, tmp_path):
    items = data.list_items(images)
    base = data.fingerprint(items, images)
    assert base == data.fingerprint(items, images)
    changed = [items[:-1], [(items[0][0], "another caption")] + items[1:], items[1:] + items[:1]]
    assert all(data.fingerprint(other, images) != base for other in changed)
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    assert data.fingerprint(data.list_items(moved), moved) == base  # names are relative to the data folder
    with open(moved / "img0.png", "ab") as f:
        f.write(b"\0")  # one byte more: another size
    assert data.fingerprint(data.list_items(moved), moved) != base
    out = tmp_path / "run"
    common = ["--model", tiny_sd[0], "--data", images, "--out", out, *TINY]
    run_train(*common, "--max-steps", 1)
    state = torch.load(out / "state.pt", weights_only=True)
    del state["data"]  # a checkpoint written before the fingerprint existed
    torch.save(state, out / "state.pt")
    assert "resumed from" in run_train(*common, "--max-steps", 2, "--resume").stdout


# --------------------------------------------------------------------- 5. the toy world's control phase

def test_the_toy_control_stopped_by_sigterm_exits_143_and_resume_continues_it_where_it_stopped(tmp_path,
                                                                                               monkeypatch):
    import functools

    from toy import report, world

    folder = world.prepare_data(tmp_path / "data", n=8)
    args = ["--data", folder, "--out", tmp_path / "run", "--batch-size", 2, "--validate-every", 0]
    proc = start_train(*args, "--max-steps", 10_000, "--save-every", 1)
    control_log = tmp_path / "run" / "control" / "log.jsonl"
    wait_for_lines(control_log, 2, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    stopped = torch.load(tmp_path / "run" / "control" / "state.pt", weights_only=True)["step"]
    assert not (tmp_path / "run" / "state.pt").exists()  # the Smooth-LoRA never started
    refused = error_of(*args, "--max-steps", stopped + 1)  # without --resume: not a silent restart
    assert "holds another run" in refused and "--resume" in refused
    quick = report.ReportProtocol(strips=2, steps=2, real=16, figure_strips=1)
    monkeypatch.setattr(report, "report", functools.partial(report.report, protocol=quick))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert train.main([*map(str, args), "--max-steps", str(stopped + 1), "--resume"]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    steps = [json.loads(l)["step"] for l in control_log.read_text().splitlines()]
    assert steps == list(range(1, stopped + 2))  # continued at stopped + 1, not restarted from step 1
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == stopped + 1


# ---------------------------------------------------------------------------- 6. sampler.py on the GPU

def test_sampler_runs_on_the_gpu_when_there_is_one_unless_device_says_otherwise(monkeypatch):
    for available, device in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        for command in ("generate", "interpolate", "istd --prompts-file p.txt", "invert --image x.png"):
            assert sampler_cli.build_parser().parse_args(command.split()).device == device
        assert sampler_cli.build_parser().parse_args(["generate", "--device", "cpu"]).device == "cpu"


# ------------------------------------------------------------------ 7. every numeric flag, walked

TRIES = {"zero": "0", "minus one": "-1", "huge": str(10**12), "nan": "nan", "inf": "inf"}


def numeric_options(parser):
    """{--flag: action} of every option whose argparse type reads a number (int, float or a checked number)."""
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and
            getattr(a.type, "__name__", None) in ("int", "float")}


def test_every_numeric_flag_of_train_py_gets_one_clean_error_or_is_legal(tiny_sd, images, tmp_path, capsys):
    """Each numeric flag at 0, -1, 10^12, NaN and inf: argparse's error, or check_config's / the model's
    one-line ValueError naming the flag, or accepted; accepted must be exactly the values listed below."""
    import checkpoint

    sd = checkpoint.load_models(tiny_sd[0])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n")
    base = ["--model", str(tiny_sd[0]), "--data", str(images), "--out", str(tmp_path / "out"), "--resolution", "16",
            "--validation-prompts", str(prompts)]
    flags = numeric_options(train.build_parser())
    assert {f[2:].replace("-", "_") for f in flags} == set(runstate.NUMBER_RANGES)  # a new flag needs its range
    accepted = set()
    for flag in flags:
        for name, value in TRIES.items():
            try:
                cfg, _ = train.parse_args(base + [flag, value])  # argparse's type, then NUMBER_RANGES
            except SystemExit as e:
                err = capsys.readouterr().err
                assert (e.code == 2 and f"error: argument {flag}: invalid" in err.splitlines()[-1] or
                        str(e.code).startswith(f"train.py: error: {flag} must be ") and "\n" not in str(e.code)), err
                continue
            try:
                runstate.check_config(cfg, torch.device("cpu"))
                train.check_model_limits(cfg, sd)
            except ValueError as e:
                assert str(e).startswith(flag) and "\n" not in str(e), e
                continue
            accepted.add((flag, name))
    legal_zero = {"--weight-decay", "--lambda-reg", "--snapshot-every", "--keep-snapshots", "--validate-every",
                  "--seed", "--num-workers"}
    legal_huge = {"--grad-accum", "--max-steps", "--lr", "--weight-decay", "--lambda-reg", "--reg-every", "--fd-h",
                  "--save-every", "--snapshot-every", "--keep-snapshots", "--validate-every", "--seed"}
    assert accepted == {(f, "zero") for f in legal_zero} | {(f, "huge") for f in legal_huge}
    assert not (tmp_path / "out").exists()


def test_every_numeric_flag_of_sampler_py_gets_one_clean_error_or_is_legal(tiny_sd, tmp_path, capsys):
    """The same walk over every sampler.py command: argparse's error, the CLI's input checks, or the loaded
    model's limits (--steps, --width/--height); accepted must be exactly the values listed below."""
    import checkpoint

    models = checkpoint.load_models(tiny_sd[0])
    Image.new("RGB", (16, 16)).save(tmp_path / "photo.png")
    (tmp_path / "prompts.txt").write_text("a dog\n")
    required = {"invert": ["--image", str(tmp_path / "photo.png")],
                "edit": ["--image", str(tmp_path / "photo.png"), "--target-prompt", "a cat"],
                "istd": ["--prompts-file", str(tmp_path / "prompts.txt")],
                "drag": ["--image", str(tmp_path / "photo.png"), "--points", "1,1:2,2"]}
    parser = sampler_cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    accepted, accepted_in = set(), set()
    for command, subparser in commands.items():
        for flag, action in numeric_options(subparser).items():
            for name, value in TRIES.items():
                values = [value] * (2 if action.nargs == "+" else 1)  # --seeds: two keyframes
                argv = [command, *required.get(command, []), flag, *values]
                try:
                    args = parser.parse_args(argv)
                    sampler_cli._check_inputs(args)
                    sampler_cli._schedule(args, models)
                    sampler_cli._geometry(args, models)
                except SystemExit as e:
                    err = capsys.readouterr().err or str(e.code)
                    assert e.code not in (0, None) and "Traceback" not in err, err
                    assert f"error: argument {flag}" in err or err.startswith(f"sampler.py: error: {flag}"), err
                    continue
                accepted.add((flag, name))
                accepted_in.add((command, flag, name))
    assert ("generate", "--num-images", "huge") not in accepted_in
    # evaluate's --num-images and --bootstrap take 10^12 (only slower: FID's sample counts have no natural top).
    assert accepted == {("--guidance", "zero"), ("--seed", "zero"), ("--seed", "huge"), ("--eta", "zero"),
                        ("--seeds", "zero"), ("--seeds", "huge"), ("--r", "zero"), ("--inner-steps", "huge"),
                        ("--batch-size", "huge"), ("--num-images", "huge"), ("--bootstrap", "zero"),
                        ("--bootstrap", "huge"), ("--istd-prompts", "zero"),
                        ("--lora-steps", "zero"), ("--lam", "zero")}  # drag: no identity LoRA, no mask term
