"""What a careless or hostile user, a flipped bit, or a kill -9 can do to fastpixel: damaged
files are refused by name, bad requests are refused before any long work (one line, exit
code 2, nothing left on disk), runs are exclusive, and a killed run resumes exactly."""
import importlib
import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastpixel
from fastpixel.io import data as data_module
from fastpixel import eval as eval_module
from fastpixel import train as train_module
from fastpixel import usage
from fastpixel.io.checkpoint import CheckpointError
from fastpixel.io.integrity import IntegrityError, load_sealed, sealed, tensors_digest
from tests.conftest import tiny_model, write_random_mnist
from tests.test_train import ROOT, TINY, metrics, train_losses

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
sample_module = importlib.import_module("fastpixel.sample")  # `from fastpixel import sample` is the function


def flipped(data: bytes, offset: int, bit: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 1 << bit
    return bytes(damaged)


def seeded_offsets(rng: random.Random, size: int, header: int, count: int) -> list[tuple[int, int]]:
    """`count` (offset, bit) pairs: half anywhere in the file, half in its first `header` bytes."""
    return [(rng.randrange(header if i % 2 else size), rng.randrange(8)) for i in range(count)]


# ------------------------------------------------------------------------------ model files
def test_every_bit_flip_in_a_model_file_is_refused_by_name(tmp_path):
    path = fastpixel.save(tiny_model(dtype=torch.float32, num_classes=3), tmp_path / "m.safetensors")
    good = path.read_bytes()
    header = 8 + struct.unpack("<Q", good[:8])[0]
    for offset, bit in seeded_offsets(random.Random(15), len(good), header, 50):
        path.write_bytes(flipped(good, offset, bit))
        with pytest.raises(CheckpointError, match="m.safetensors"):
            fastpixel.load(path)


def test_truncated_model_files_are_refused(tmp_path):
    path = fastpixel.save(tiny_model(dtype=torch.float32), tmp_path / "m.safetensors")
    good = path.read_bytes()
    for length in (0, 7, 8, 100, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:length])
        with pytest.raises(CheckpointError, match="m.safetensors"):
            fastpixel.load(path)


def write_model_file(path: Path, model, tensors=None, config=None, format="fastpixel.PixelCNNpp/2", digest=True):
    """A model file as `save` writes it, with its parts replaced: a forger who also updates the digest."""
    tensors = dict(model.state_dict()) if tensors is None else tensors
    metadata = {"format": format, "config": config or model.config.to_json()}
    if digest:
        metadata["sha256"] = tensors_digest(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_files_from_before_digests_still_load(tmp_path):
    model = tiny_model(dtype=torch.float32)
    write_model_file(tmp_path / "old.safetensors", model, format="fastpixel.PixelCNNpp/1", digest=False)
    with pytest.warns(UserWarning, match="written before model files carried a digest"):
        loaded = fastpixel.load(tmp_path / "old.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    write_model_file(tmp_path / "stripped.safetensors", model, digest=False)  # a new file that lost its digest
    with pytest.raises(CheckpointError, match="lost its sha256"):
        fastpixel.load(tmp_path / "stripped.safetensors")


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.fill_(float("nan")), "NaN or infinite"),
    (lambda t: t.fill_(float("inf")), "NaN or infinite"),
    (lambda t: t.to(torch.int32), "I32, expected floating point"),
])
def test_non_finite_or_integer_weights_are_refused(tmp_path, damage, message):
    model = tiny_model(dtype=torch.float32)
    tensors = {name: t.clone() for name, t in model.state_dict().items()}
    name = next(iter(tensors))
    tensors[name] = damage(tensors[name])
    write_model_file(tmp_path / "m.safetensors", model, tensors)
    with pytest.raises(CheckpointError, match=message):
        fastpixel.load(tmp_path / "m.safetensors")


def test_config_that_contradicts_the_weights_names_the_tensor_before_allocating(tmp_path):
    model = tiny_model(dtype=torch.float32)
    huge = json.dumps({**model.config.to_dict(), "nr_filters": 30000})  # 43 GB if it were built
    write_model_file(tmp_path / "m.safetensors", model, config=huge)
    with pytest.raises(CheckpointError, match=r"tensor \S+ has shape \(8, .*the config needs \(30000, "):
        fastpixel.load(tmp_path / "m.safetensors")
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("out.")}
    write_model_file(tmp_path / "m.safetensors", model, tensors)
    with pytest.raises(CheckpointError, match=r"tensor out\.\S+ of shape \(\d+.*is missing"):
        fastpixel.load(tmp_path / "m.safetensors")


def test_missing_config_fields_are_refused(tmp_path):
    model = tiny_model(dtype=torch.float32)
    partial = {k: v for k, v in model.config.to_dict().items() if k != "dropout"}
    write_model_file(tmp_path / "m.safetensors", model, config=json.dumps(partial))
    with pytest.raises(CheckpointError, match=r"fields \['dropout'\] are missing"):
        fastpixel.load(tmp_path / "m.safetensors")


class _RunsCode:
    """A pickle that, when unpickled, creates a file: the proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_running_pickles_renamed_as_model_or_state_files_never_run(tmp_path):
    marker = tmp_path / "marker"
    for name in ("model.safetensors", "state.pt"):
        (tmp_path / name).write_bytes(pickle.dumps(_RunsCode(marker)))
    buffer = io.BytesIO()
    torch.save({"model": _RunsCode(marker)}, buffer)
    (tmp_path / "zipped.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fastpixel.load(tmp_path)
    for name in ("state.pt", "zipped.pt"):
        with pytest.raises(Exception):  # noqa: B017  (which one torch raises is its business; running code is ours)
            load_sealed(tmp_path / name)
    assert not marker.exists()


# ------------------------------------------------------------------------------ training state files
def test_every_bit_flip_in_a_state_file_is_refused(tmp_path):
    model = tiny_model(dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 1, 8, 12)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3, "args": "{}"}
    good = sealed(state)
    path = tmp_path / "state.pt"
    path.write_bytes(good)
    assert load_sealed(path)["step"] == 3
    for offset, bit in seeded_offsets(random.Random(15), len(good), 2048, 100):
        path.write_bytes(flipped(good, offset, bit))
        with pytest.raises(IntegrityError, match="state.pt"):
            load_sealed(path)
    torch.save(state, path)  # a state file from before seals existed
    assert load_sealed(path)["step"] == 3


# ------------------------------------------------------------------------------ refusals before the long work
def refused(main, argv, message, capsys, cwd: Path) -> None:
    """main(argv) ends with one line naming `message`, exit code 2, and nothing new on disk."""
    before = sorted(cwd.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
    assert sorted(cwd.rglob("*")) == before


@pytest.mark.parametrize("extra, message", [
    (["-n", str(10**12)], "needs about"),
    (["-n", str(10**20)], "needs about"),
    (["-n", str(10**12), "--batch-size", str(10**12)], "GiB of memory"),
    (["--npy", ""], "--npy must not be empty"),
    (["--out", ""], "--out must not be empty"),
])
def test_sample_refuses_impossible_requests(checkpoint, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    refused(sample_module.main, ["--checkpoint", str(checkpoint), *extra], message, capsys, tmp_path)


def test_sample_draws_at_most_the_default_batch_at_once(monkeypatch):
    batches = []
    monkeypatch.setattr(fastpixel.sampling.sampler, "DEFAULT_BATCH", 2)
    monkeypatch.setattr(fastpixel.sampling.engines, "cached_rows", lambda model, x, *a, **k: iter([batches.append(len(x))]))
    fastpixel.sample(tiny_model(dtype=torch.float32), 5, fast=True, backend="torch")
    assert batches == [2, 2, 1]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "run.json", "is not a directory"),                # --save_dir is a file
    (lambda d: d / "run.json" / "sub", "run.json is not a directory"),  # under a file
])
def test_train_refuses_a_save_dir_it_cannot_write_before_reading_data(tmp_path, capsys, make, message):
    (tmp_path / "run.json").write_text("{}")
    args = ["--data_set", "mnist", "--data_dir", str(tmp_path / "no-data"), "--save_dir", str(make(tmp_path)), *TINY]
    refused(train_module.main, args, message, capsys, tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "--seed must lie in 0 .. 2**63 - 1"),
    (["--seed", str(2**63)], "--seed must lie in 0 .. 2**63 - 1"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--gamma", "nan"], "--gamma must be a finite number"),
    (["--resume", "--init_from", "mnist"], "pass one of them"),
])
def test_train_refuses_bad_arguments_before_anything_is_written(tmp_path, capsys, extra, message):
    args = ["--data_set", "mnist", "--data_dir", str(tmp_path / "no-data"), "--save_dir", str(tmp_path / "run"), *TINY]
    refused(train_module.main, args + extra, message, capsys, tmp_path)


def test_every_accepted_seed_seeds_the_data_order_and_the_steps():
    for seed in (0, 2**63 - 1):
        assert train_module.epoch_batches(10, 3, seed, 4).shape == (2, 4)
        assert len(train_module.init_indices(10, seed, 4)) == 4
        train_module.seed_step(seed, 1, 3, 5)
    # the order of the seeds that worked before is unchanged
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 * 1_000_003 + 3))[:8].view(2, 4)
    assert torch.equal(train_module.epoch_batches(10, 3, 7, 4), expected)


def test_offline_train_leaves_no_data_folder(tmp_path, monkeypatch, capsys):
    def offline(url, dest):
        raise data_module.urllib.error.URLError("no network in tests")

    monkeypatch.setattr(data_module, "_fetch", offline)
    args = ["--data_set", "mnist", "--data_dir", str(tmp_path / "data"), "--save_dir", str(tmp_path / "run"),
            *[a for a in TINY if a != "--no_download"]]
    refused(train_module.main, args, "this machine seems offline", capsys, tmp_path)


@pytest.mark.parametrize("json_path, message", [
    ("{tmp}", "is a directory"),
    ("{tmp}/file.txt/result.json", "file.txt is not a directory"),
    ("/proc/fastpixel-result.json", "cannot write /proc/fastpixel-result.json"),
    ("", "--json must not be empty"),
])
def test_eval_refuses_an_unwritable_json_before_evaluating(checkpoint, tmp_path, capsys, json_path, message):
    (tmp_path / "file.txt").write_text("")
    args = ["--checkpoint", str(checkpoint), "--data_set", "mnist", "--data_dir", str(tmp_path / "no-data"),
            "--no_download", "--json", json_path.format(tmp=tmp_path)]
    refused(eval_module.main, args, message, capsys, tmp_path)


def test_eval_with_a_missing_checkpoint_creates_no_folders(tmp_path, capsys):
    args = ["--checkpoint", str(tmp_path / "missing"), "--data_set", "mnist", "--data_dir", str(tmp_path),
            "--json", str(tmp_path / "a" / "b" / "result.json")]
    refused(eval_module.main, args, "no fastpixel model file", capsys, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files of mode 000")
def test_unreadable_model_file_is_reported_as_unreadable(tmp_path):
    path = fastpixel.save(tiny_model(dtype=torch.float32), tmp_path / "m.safetensors")
    path.chmod(0)
    with pytest.raises(CheckpointError, match="cannot read .*m.safetensors: Permission denied"):
        fastpixel.load(path)


def test_ctrl_c_while_importing_ends_quietly_with_130(tmp_path):
    # A shell's background job ignores SIGINT, and its children inherit that: restore the default.
    process = subprocess.Popen([sys.executable, "-m", "fastpixel.sample", "--help"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)  # torch takes seconds to import
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "stopped by SIGINT while starting" in err


# ------------------------------------------------------------------------------ data
@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="no real MNIST files here")
def test_mnist_files_are_not_taken_for_fashion_mnist():
    with pytest.raises(data_module.DataError, match="is MNIST's t10k-images-idx3-ubyte .*not Fashion-MNIST's"):
        data_module.load_dataset("fashion_mnist", SHARED_DATA / "mnist", "test", download=False)
    assert len(data_module.load_dataset("mnist", SHARED_DATA / "mnist", "test", download=False).images) == 10000


# ------------------------------------------------------------------------------ training runs
def train_args(data_dir, save_dir, *extra) -> list[str]:
    return ["--data_set", "mnist", "--data_dir", str(data_dir), "--save_dir", str(save_dir), *TINY,
            "--batch_size", "8", "--num_samples", "0", "--log_every", "1", *map(str, extra)]


def test_a_second_run_on_a_busy_save_dir_is_refused_with_the_holders_pid(mnist_dir, tmp_path, capsys):
    save_dir = tmp_path / "run"
    with train_module.exclusive(save_dir, main=True):
        assert train_module.main(train_args(mnist_dir, save_dir, "--max_steps", 1)) == 2
        assert f"is in use by another training run (PID {os.getpid()})" in capsys.readouterr().err
    with train_module.exclusive(save_dir, main=True):  # released
        pass


def test_resume_survives_a_torn_metrics_line_and_refuses_other_data_or_an_incomplete_state(mnist_dir, tmp_path,
                                                                                           capsys):
    save_dir = tmp_path / "run"
    assert train_module.main(train_args(mnist_dir, save_dir, "--max_steps", 3, "--log_every", 2)) == 0
    assert [r["step"] for r in metrics(save_dir) if "train_bpd" in r] == [2, 3]  # the last step is logged
    assert [r["step"] for r in metrics(save_dir) if "test_bpd" in r] == [3]  # a run inside an epoch reports too
    with open(save_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_b')
    (save_dir / ".state.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert train_module.main(train_args(mnist_dir, save_dir, "--max_steps", 4, "--resume")) == 0
    assert [(r["step"], "test_bpd" in r) for r in metrics(save_dir)] == [(2, False), (3, False), (3, True), (4, False), (4, True)]
    assert not list(save_dir.glob(".*.tmp"))
    capsys.readouterr()
    other = write_random_mnist(tmp_path / "other", 64, 20, seed=1)
    assert train_module.main(train_args(other, save_dir, "--max_steps", 5, "--resume")) == 2
    assert "are not those of the run" in capsys.readouterr().err
    state = load_sealed(save_dir / "state.pt")
    del state["optimizer"]
    (save_dir / "state.pt").write_bytes(sealed(state))
    assert train_module.main(train_args(mnist_dir, save_dir, "--max_steps", 5, "--resume")) == 2
    err = capsys.readouterr().err
    assert "is not a whole training state: it lacks optimizer" in err and err.count("\n") == 1


def test_a_step_that_makes_weights_non_finite_is_never_saved(mnist_dir, tmp_path, monkeypatch, capsys):
    real_step = torch.optim.Adam.step

    def poisoned(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    save_dir = tmp_path / "run"
    assert train_module.main(train_args(mnist_dir, save_dir, "--max_steps", 3)) == 1
    err = capsys.readouterr().err
    assert "step 1 made the weights non-finite" in err and "no checkpoint was written" in err
    assert not (save_dir / "model.safetensors").exists() and not (save_dir / "state.pt").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_evaluation_stops_within_a_batch_and_resumes_exactly(mnist_dir, tmp_path, monkeypatch,
                                                                              signum, code):
    one_epoch = ["--max_epochs", 1, "--batch_size", 32, "--max_test_images", 6, "--eval_batch_size", 2]
    real_nll_sum, batches = train_module.nll_sum, []

    def signalled(*args, **kwargs):
        batches.append(1)
        os.kill(os.getpid(), signum)
        return real_nll_sum(*args, **kwargs)

    monkeypatch.setattr(train_module, "nll_sum", signalled)
    save_dir = tmp_path / "run"
    assert train_module.main(train_args(mnist_dir, save_dir, *one_epoch)) == code
    assert len(batches) == 1  # of 3: not the whole test set
    if signum == signal.SIGINT:
        return  # the same path as SIGTERM's but for the exit code: the resume is checked once
    monkeypatch.setattr(train_module, "nll_sum", real_nll_sum)
    assert train_module.main(train_args(mnist_dir, save_dir, *one_epoch, "--resume")) == 0
    # The resumed epoch's line holds what an uninterrupted run writes: the mean train bits/dim
    # of all its steps, and the test bits/dim of its EMA model.
    *steps, epoch = metrics(save_dir)
    assert [r["step"] for r in steps] == [1, 2] and epoch["epoch"] == 0
    assert epoch["epoch_train_bpd"] == pytest.approx(sum(r["train_bpd"] for r in steps) / 2, rel=1e-12)
    assert "train_bpd" not in epoch  # one batch's number and the epoch's mean have different names
    test_images = data_module.load_dataset("mnist", mnist_dir, "test").images[:6]
    assert epoch["test_bpd"] == pytest.approx(fastpixel.bits_per_dim(fastpixel.load(save_dir), test_images), rel=1e-6)


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, usage.Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_inside_signals_held_stops_the_tool_when_the_block_ends(signum, raised):
    """Work that a C++ library may call back into Python (Triton's first import) must not see
    the stop's exception: the signal is kept, and raised as the block ends."""
    finished = []
    with pytest.raises(raised), usage.stops_raise():
        with usage.signals_held():
            with usage.signals_held():  # nested: only the outermost block's end raises
                os.kill(os.getpid(), signum)
                for _ in range(1000):  # Python runs the handler between these bytecodes
                    time.sleep(0)
                finished.append("inner")
            finished.append("outer")
    assert finished == ["inner", "outer"]
    with usage.stops_raise():  # nothing is left pending for the next block
        with usage.signals_held():
            pass


def test_sigterm_at_any_moment_before_training_ends_with_one_line_and_leaves_no_lock(mnist_dir, tmp_path):
    """While Python imports torch, reads the data or builds the model: the shell's code for
    SIGTERM, one line saying so, and a new save_dir removed again (or, once training has
    begun, a checkpoint to resume from beside the lock)."""
    for delay in (0.3, 1.5, 3.0):
        save_dir = tmp_path / f"run{delay}"
        process = subprocess.Popen([sys.executable, "-m", "fastpixel.train", *train_args(mnist_dir, save_dir)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        if process.returncode == 0:
            continue  # the run ended first
        assert process.returncode == 143 and "stopped by SIGTERM" in err and "Traceback" not in err, (delay, err)
        assert not save_dir.exists() or (save_dir / "state.pt").exists(), (delay, sorted(save_dir.iterdir()))


def test_sigterm_stops_sample_with_one_line_and_no_output(checkpoint, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "fastpixel.sample", "--checkpoint", str(checkpoint), "-n", "64",
                                "--naive", "--out", str(tmp_path / "grid.png")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "sampling" not in process.stderr.readline() and time.monotonic() < deadline:
        pass  # until the draw has begun
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "stopped by SIGTERM; nothing was written" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_a_signal_during_the_sample_grid_stops_the_run_at_once(mnist_dir, tmp_path, monkeypatch, capsys):
    """The grid at an epoch's end takes seconds: a signal abandons it, and the run stops at the
    next step's vote with its checkpoint, the message on a line of its own."""
    finished = []

    def slow_signalled_sample(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)  # a grid that would take a minute
        finished.append(1)

    monkeypatch.setattr(train_module, "sample", slow_signalled_sample)
    save_dir = tmp_path / "run"
    args = train_args(mnist_dir, save_dir, "--max_train_images", 16, "--max_epochs", 2, "--num_samples", 4)
    assert train_module.main(args) == 130
    assert not finished
    err = capsys.readouterr().err
    assert any(line.startswith("python -m fastpixel.train: stopped by SIGINT at step 3") for line in err.splitlines()), err
    assert load_sealed(save_dir / "state.pt")["step"] == 3


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint_whole(mnist_dir, tmp_path, monkeypatch, capsys):
    from fastpixel.io import checkpoint as checkpoint_module
    real_save_file, calls = checkpoint_module.save_file, []

    def disk_full_at_the_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full_at_the_second_save)
    save_dir = tmp_path / "run"
    args = train_args(mnist_dir, save_dir, "--max_steps", 3, "--save_every_steps", 1)
    assert train_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"python -m fastpixel.train: cannot go on: No space left on device; the "
                                            f"last checkpoint in {save_dir} (step 1) is intact")
    assert model_step(save_dir) == load_sealed(save_dir / "state.pt")["step"] == 1  # the pair, not half of the next
    assert not list(save_dir.glob(".*.tmp"))
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)
    assert train_module.main(args + ["--resume"]) == 0


def test_resume_refuses_another_precision(mnist_dir, tmp_path, capsys):
    save_dir = tmp_path / "run"
    assert train_module.main(train_args(mnist_dir, save_dir, "--max_steps", 1)) == 0
    assert train_module.main(train_args(mnist_dir, save_dir, "--max_steps", 2, "--resume", "--amp", "bf16")) == 2
    assert "--amp bf16 (the run has none)" in capsys.readouterr().err


def test_an_epochs_test_logged_just_before_a_kill_is_not_logged_twice(mnist_dir, tmp_path, monkeypatch):
    """A kill between an epoch's test record and its checkpoint: the resumed run evaluates the
    epoch again, and its record replaces the first instead of joining it."""
    real_save, calls = train_module.Trainer.save, []

    def killed_at_the_epochs_checkpoint(self, save_dir):
        calls.append(1)
        if len(calls) == 2:  # the step save at step 2, then the epoch's
            raise SystemExit("killed")
        real_save(self, save_dir)

    monkeypatch.setattr(train_module.Trainer, "save", killed_at_the_epochs_checkpoint)
    save_dir = tmp_path / "run"
    args = train_args(mnist_dir, save_dir, "--max_train_images", 16, "--max_epochs", 1, "--save_every_steps", 2)
    with pytest.raises(SystemExit):
        train_module.main(args)
    assert [r["epoch"] for r in metrics(save_dir) if "test_bpd" in r] == [0]
    monkeypatch.setattr(train_module.Trainer, "save", real_save)
    assert train_module.main(args + ["--resume"]) == 0
    assert [r["epoch"] for r in metrics(save_dir) if "test_bpd" in r] == [0]


def test_a_save_dir_name_too_long_for_the_file_system_is_one_line(mnist_dir, tmp_path, capsys):
    assert train_module.main(train_args(mnist_dir, tmp_path / ("b" * 300))) == 2
    assert "File name too long" in capsys.readouterr().err


# ------------------------------------------------------------------------------ kill -9 loop
KILLER = """
import os, signal, sys, threading
from fastpixel import train
kind, when = os.environ["KILL_AT"].split(":")
calls = []

def count():
    calls.append(1)
    if len(calls) == int(when):
        os.kill(os.getpid(), signal.SIGKILL)

real_replace, real_write = os.replace, train.write_atomically
if kind == "between":  # the model file renamed into place, the state not yet
    os.replace = lambda source, target: (real_replace(source, target),
                                         count() if str(target).endswith("model.safetensors") else None)
elif kind == "inside":  # while the state's temporary file is being written
    def write(path, writer):
        return real_write(path, (lambda tmp: (writer(tmp), count())) if path.name == "state.pt" else writer)
    train.write_atomically = write
else:  # "timer": at an arbitrary moment, this many seconds into training
    threading.Timer(float(when), os.kill, (os.getpid(), signal.SIGKILL)).start()
sys.exit(train.main(sys.argv[1:]))
"""


def model_step(save_dir: Path) -> int:
    with safe_open(str(save_dir / "model.safetensors"), framework="pt") as f:
        return int(f.metadata()["step"])


def test_kill_9_loop_leaves_a_loadable_current_model_and_resumes_exactly(mnist_dir, tmp_path):
    args = train_args(mnist_dir, "{save_dir}", "--max_steps", 4, "--save_every_steps", 1, "--dropout_p", 0.5)
    assert train_module.main([a.format(save_dir=tmp_path / "reference") for a in args]) == 0
    save_dir = tmp_path / "killed"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    for plan in ("between:1", "inside:2", "timer:1.5"):
        resume = ["--resume"] if (save_dir / "state.pt").exists() else []
        run = subprocess.run([sys.executable, str(killer), *[a.format(save_dir=save_dir) for a in args], *resume],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, KILL_AT=plan))
        if plan.startswith("timer") and run.returncode == 0:
            continue  # finished before the timer: nothing to check for this plan
        assert run.returncode == -signal.SIGKILL, (plan, run.stderr)
        if (save_dir / "state.pt").exists():
            state = load_sealed(save_dir / "state.pt")
            fastpixel.load(save_dir)  # never fails once a checkpoint exists
            assert model_step(save_dir) >= state["step"], plan  # and never lags the state
            if plan.startswith("between"):
                assert model_step(save_dir) > state["step"], plan
    assert train_module.main([a.format(save_dir=save_dir) for a in args] + ["--resume"]) == 0
    assert train_losses(save_dir) == train_losses(tmp_path / "reference")
    assert sorted(train_losses(save_dir)) == list(range(1, 5))
    final = [load_sealed(d / "state.pt")["model"] for d in (tmp_path / "reference", save_dir)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert not list(save_dir.glob(".*.tmp"))
