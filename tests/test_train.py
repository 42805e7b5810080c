"""python -m fastpixel.train and python -m fastpixel.eval on tiny models and small data files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastpixel
from fastpixel.io import data as data_module
from fastpixel import train as train_module
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix", "2", "--init_batch_size", "16",
        "--eval_batch_size", "50", "--num_samples", "4", "--no_download"]


def run_train(*args, cwd=ROOT, launcher=(sys.executable, "-m", "fastpixel.train"), **kwargs):
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600, **kwargs)


def metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(save_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_bpd"] for r in metrics(save_dir) if "train_bpd" in r}


def test_training_writes_checkpoints_metrics_samples_and_curves(mnist_dir, tmp_path):
    save_dir = tmp_path / "run"
    out = run_train("--data_set", "mnist", "--data_dir", mnist_dir, "--save_dir", save_dir, *TINY,
                    "--batch_size", "16", "--max_epochs", "2", "--log_every", "1", "-ac", "-nl", "-fl", "--class_conditional")
    assert out.returncode == 0, out.stderr
    records = metrics(save_dir)
    assert {"step", "epoch", "train_bpd"} <= set(records[0])
    evaluated = [r for r in records if "test_bpd" in r]
    assert [r["epoch"] for r in evaluated] == [0, 1] and all(np.isfinite(r["test_bpd"]) for r in evaluated)
    assert max(r["step"] for r in records) == 8  # 2 epochs of 64 // 16 steps
    state = torch.load(save_dir / "state.pt", weights_only=True)
    assert state["step"] == 8 and state["epoch"] == 2
    model = fastpixel.load(save_dir)
    assert model.config.num_classes == 10 and model.config.coordconv and model.config.nonlocal_block
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["ema"][name])
    assert (save_dir / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in save_dir.glob("samples_epoch*.png")) == ["samples_epoch0000.png", "samples_epoch0001.png"]
    # fastpixel.eval reproduces the last test bits/dim of the EMA weights
    result = subprocess.run([sys.executable, "-m", "fastpixel.eval", "--checkpoint", save_dir, "--data_set", "mnist",
                             "--data_dir", mnist_dir, "--no_download", "--json", tmp_path / "eval.json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["bits_per_dim"] == pytest.approx(evaluated[-1]["test_bpd"], rel=1e-6)
    assert "test bits/dim:" in result.stdout


@pytest.mark.parametrize("family", [[], ["--model", "gated", "--hidden-fmaps", "6", "--out-hidden-fmaps", "6",
                                     "--hidden-layers", "2", "--causal-ksize", "3", "--hidden-ksize", "3"]],
                         ids=["pixelcnnpp", "gated"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(mnist_dir, tmp_path, family):
    """(DDP also refuses a model with parameters that no loss reaches: the gated family has none.)"""
    common = ["--data_set", "mnist", "--data_dir", mnist_dir, *TINY, *family, "--max_steps", "4", "--log_every", "1",
              "--num_samples", "0", "--dropout_p", "0", "--max_epochs", "1"]
    single = run_train(*common, "--batch_size", "16", "--save_dir", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    # A worker that trains through fastpixel.train, then checks that every rank holds the same parameters.
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from fastpixel import train\n"
        "args = train.parse_args(sys.argv[1:])\n"
        "procs = train.start_processes()\n"
        "trainer = train.train(args, procs)\n"
        "flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])\n"
        "gathered = [torch.zeros_like(flat) for _ in range(procs.world)]\n"
        "dist.all_gather(gathered, flat)\n"
        "if procs.main:\n"
        "    print('ranks identical:', all(torch.equal(gathered[0], g) for g in gathered))\n"
        "from fastpixel.usage import leave_process_group\n"
        "leave_process_group(0)\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = run_train(*common, "--batch_size", "8", "--save_dir", tmp_path / "ddp", launcher=(*torchrun, str(worker)),
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert double.returncode == 0, double.stderr
    assert "ranks identical: True" in double.stdout
    one, two = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    a, b = (fastpixel.load(tmp_path / name) for name in ("single", "ddp"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_torchrun_cli_runs_with_gloo_on_the_cpu(mnist_dir, tmp_path):
    out = run_train("--nproc_per_node", "2", "-m", "fastpixel.train", "--data_set", "mnist", "--data_dir", mnist_dir,
                    "--save_dir", tmp_path / "run", *TINY, "--batch_size", "8", "--max_steps", "2", "--num_samples", "0",
                    launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone"),
                    env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert fastpixel.load(tmp_path / "run").config.nr_filters == 8


def test_two_process_training_exits_cleanly_every_time_with_the_cores_busy(mnist_dir, tmp_path):
    """Rank processes used to abort at exit now and then ("terminate called without an active
    exception"): a gloo thread, kept alive by DDP, took the GIL during interpreter finalisation.
    Runs of the CLI beside a busy loop on each core (up to 8; stopped at the end) must all exit 0."""
    busy = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 300\nwhile time.time() < end: pass"])
            for _ in range(min(os.cpu_count() or 2, 8))]
    try:
        for run in range(3):
            out = run_train("--nproc_per_node", "2", "-m", "fastpixel.train", "--data_set", "mnist", "--data_dir",
                            mnist_dir, "--save_dir", tmp_path / f"run{run}", *TINY, "--batch_size", "8", "--max_steps", "4",
                            "--num_samples", "0", launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone"),
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
            assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-3000:]
    finally:
        for process in busy:
            process.kill()
            process.wait()


def test_non_finite_losses_never_reach_the_weights(mnist_dir, tmp_path, monkeypatch, capsys):
    save_dir = tmp_path / "run"
    args = ["--data_set", "mnist", "--data_dir", str(mnist_dir), "--save_dir", str(save_dir), *TINY,
            "--batch_size", "8", "--num_samples", "0", "--log_every", "1", "--save_every_steps", "2"]
    assert train_module.main(args + ["--max_steps", "2"]) == 0
    before = torch.load(save_dir / "state.pt", weights_only=True)
    real_nll = fastpixel.mixture.nll
    monkeypatch.setattr(fastpixel.mixture, "nll", lambda params, x: real_nll(params, x) * float("nan"))
    assert train_module.main(args + ["--max_steps", "20", "--resume"]) == 1
    assert "non-finite losses in a row" in capsys.readouterr().err
    after = torch.load(save_dir / "state.pt", weights_only=True)
    assert after["step"] == 2
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert sum(r.get("event", "").startswith("non-finite") for r in metrics(save_dir)) == 5


def test_init_from_warm_starts_from_saved_weights(mnist_dir, tmp_path):
    common = ["--data_set", "mnist", "--data_dir", str(mnist_dir), *TINY, "--batch_size", "16", "--num_samples", "0"]
    assert train_module.main(common + ["--save_dir", str(tmp_path / "first"), "--max_steps", "2"]) == 0
    trainer = train_module.train(train_module.parse_args(
        common + ["--save_dir", str(tmp_path / "second"), "--max_steps", "1", "--init_from", str(tmp_path / "first")]),
        train_module.Processes(0, 1, torch.device("cpu")))
    first = fastpixel.load(tmp_path / "first")
    assert trainer.step == 1
    # one Adam step from the saved weights moves each by at most about lr
    for (name, a), (_, b) in zip(first.state_dict().items(), trainer.model.state_dict().items()):
        assert (a - b).abs().max() <= 1.1e-3, name
    wrong = common + ["--save_dir", str(tmp_path / "third"), "--init_from", str(tmp_path / "first"), "--nr_filters", "4"]
    assert train_module.main(wrong) == 2


def test_init_from_an_unconditional_model_starts_a_class_conditional_run(mnist_dir, tmp_path, capsys):
    common = ["--data_set", "mnist", "--data_dir", str(mnist_dir), *TINY, "--batch_size", "16", "--num_samples", "0",
              "--max_steps", "1"]
    assert train_module.main(common + ["--save_dir", str(tmp_path / "plain")]) == 0
    conditional = common + ["--class_conditional", "--init_from", str(tmp_path / "plain")]
    trainer = train_module.train(train_module.parse_args(conditional + ["--save_dir", str(tmp_path / "labels")]),
                                 train_module.Processes(0, 1, torch.device("cpu")))
    plain, labelled = fastpixel.load(tmp_path / "plain").state_dict(), trainer.model.state_dict()
    assert trainer.model.config.num_classes == 10
    added = set(labelled) - set(plain)
    assert added and all("class_bias" in name for name in added)
    for name, weight in plain.items():  # one Adam step from the saved weights
        assert (weight - labelled[name]).abs().max() <= 1.1e-3, name
    # the other way round would drop what the labels learned: refused
    back = common + ["--save_dir", str(tmp_path / "back"), "--init_from", str(tmp_path / "labels")]
    assert train_module.main(back) == 2
    assert "or the same without num_classes" in capsys.readouterr().err


def test_label_cross_entropy_is_the_loss_of_the_classifier_argmax_p_x_given_y():
    """The batch the trainer scores under the other labels, with one forward pass, gives the
    cross-entropy of softmax over y of log p(x | y), computed here label by label."""
    model = tiny_model(num_classes=4)
    with torch.no_grad():
        for block in model.modules():
            if getattr(block, "class_bias", None) is not None:
                block.class_bias.weight.normal_(0, 0.5)
    x = torch.rand(5, 1, 8, 12, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 3, 1, 2, 3])
    scored = 3
    x_all, labels_all = train_module.with_other_labels(x, labels, scored, 4)
    nll = model.nll(model(x_all, labels_all), x_all)
    ce = train_module.label_cross_entropy(nll[:scored], nll[len(x):].view(scored, 3))
    by_label = torch.stack([model.nll(model(x[:scored], torch.full((scored,), y)), x[:scored]) for y in range(4)], dim=1)
    reference = -torch.log_softmax(-by_label, dim=1)[torch.arange(scored), labels[:scored]].mean()
    torch.testing.assert_close(ce, reference)
    assert reference > 0.01  # the labels move the likelihood: the check compares something


def test_label_ce_training_logs_the_cross_entropy_and_refuses_what_it_cannot_do(mnist_dir, tmp_path, capsys):
    common = ["--data_set", "mnist", "--data_dir", str(mnist_dir), *TINY, "--batch_size", "8", "--num_samples", "0",
              "--log_every", "1", "--label_ce", "2", "--label_ce_images", "3"]
    assert train_module.main(common + ["--save_dir", str(tmp_path / "plain")]) == 2
    assert "add --class_conditional" in capsys.readouterr().err
    assert train_module.main(common + ["--class_conditional", "--batch_size", "2", "--save_dir", str(tmp_path / "x")]) == 2
    assert "--label_ce_images 3 exceeds --batch_size 2" in capsys.readouterr().err
    assert train_module.main(common + ["--class_conditional", "--max_steps", "2", "--save_dir", str(tmp_path / "run")]) == 0
    records = [r for r in metrics(tmp_path / "run") if "train_bpd" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["label_ce"] > 0 and r["train_bpd"] > 1 for r in records)  # ten random labels: about ln 10


def test_ema_follows_polyak_averaging_after_a_warm_up(mnist_dir, tmp_path):
    args = train_module.parse_args(["--data_set", "mnist", "--data_dir", str(mnist_dir), *TINY, "--polyak_decay", "0.9"])
    procs = train_module.Processes(0, 1, torch.device("cpu"))
    config = fastpixel.ModelConfig(image_size=28, channels=1, nr_resnet=1, nr_filters=8, nr_logistic_mix=2)
    trainer = train_module.Trainer(args, config, procs)
    trainer.initialise(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), None)
    for step, decay in [(0, 0.1), (5, 6 / 15), (10**6, 0.9)]:  # min(polyak_decay, (1 + step) / (10 + step))
        trainer.step = step
        old = [p.detach().clone() for p in trainer.ema.parameters()]
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)
        trainer.update_ema()
        for e, o, p in zip(trainer.ema.parameters(), old, trainer.model.parameters()):
            torch.testing.assert_close(e, decay * o + (1 - decay) * p)


@pytest.mark.parametrize("extra, message", [
    (["--data_set", "imagenet32"], "imagenet"),
    (["--data_set", "mnist", "--batch_size", "0"], "--batch_size must be positive"),
    (["--data_set", "mnist", "--lr", "-1"], "--lr and --grad_clip must be positive"),
    (["--data_set", "mnist", "--grad_clip", "0"], "--lr and --grad_clip must be positive"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_train("--data_dir", empty, "--save_dir", tmp_path / "run", *TINY, *extra)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr


def test_resume_refuses_what_would_make_it_inexact(mnist_dir, tmp_path):
    common = ["--data_set", "mnist", "--data_dir", str(mnist_dir), "--save_dir", str(tmp_path / "run"), *TINY,
              "--num_samples", "0", "--batch_size", "8"]
    out = run_train(*common, "--resume")
    assert out.returncode == 2 and "no training state" in out.stderr
    assert run_train(*common, "--max_steps", "1").returncode == 0
    for change, named in [(["--seed", "2"], "--seed 2 (the run has 1)"), (["--lr", "0.01"], "--lr 0.01 (the run has 0.001)"),
                          (["--batch_size", "16"], "--batch_size 16 times 1 processes (the run has 8 times 1)"),
                          (["--nr_filters", "16"], "--nr_filters 16 (the run has 8)")]:
        out = run_train(*common, "--resume", "--max_steps", "2", *change)
        assert out.returncode == 2 and named in out.stderr and "would not continue the run" in out.stderr, change
    (tmp_path / "run" / "state.pt").write_bytes(b"garbage")
    out = run_train(*common, "--resume", "--max_steps", "2")
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_resume_takes_the_architecture_and_settings_from_the_run(mnist_dir, tmp_path):
    """`--resume --save_dir X` alone continues the run as it was started (-r and --load_params,
    the original's spellings, too); an option that does not make the resume inexact applies."""
    save_dir, whole = tmp_path / "run", tmp_path / "whole"
    base = ["--data_set", "mnist", "--data_dir", mnist_dir, "--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix",
            "2", "--init_batch_size", "16", "--batch_size", "8", "--lr", "0.002", "--dropout_p", "0", "--no_download",
            "--num_samples", "0", "--eval_batch_size", "50", "--log_every", "1"]
    assert run_train(*base, "--save_dir", save_dir, "--max_steps", "2").returncode == 0
    out = run_train("--resume", "--save_dir", save_dir, "--max_steps", "3")
    assert out.returncode == 0, out.stderr
    assert run_train("-r", "--save_dir", save_dir, "--max_steps", "4", "--nr_filters", "8").returncode == 0
    assert run_train("--load_params", "--save_dir", save_dir, "--max_steps", "5").returncode == 0
    state = torch.load(save_dir / "state.pt", weights_only=True)
    saved = json.loads(state["args"])
    assert state["step"] == 5 and saved["lr"] == 0.002 and saved["nr_filters"] == 8 and saved["max_steps"] == 5
    assert run_train(*base, "--save_dir", whole, "--max_steps", "5").returncode == 0  # the same losses uninterrupted
    assert train_losses(save_dir) == train_losses(whole)


def test_a_short_run_reports_like_an_epoch_and_its_bar_ends_where_it_stops(mnist_dir, tmp_path):
    save_dir = tmp_path / "run"
    out = run_train("--data_set", "mnist", "--data_dir", mnist_dir, "--save_dir", save_dir, *TINY, "--batch_size", "8",
                    "--max_steps", "3", "--max_test_images", "20")
    assert out.returncode == 0, out.stderr
    assert "3/3" in out.stderr and "/8 " not in out.stderr  # an epoch of 64 images is 8 batches
    tested = [r for r in metrics(save_dir) if "test_bpd" in r]
    assert len(tested) == 1 and tested[0]["step"] == 3 and tested[0]["partial_epoch"] and np.isfinite(tested[0]["test_bpd"])
    assert f"test bits/dim {tested[0]['test_bpd']:.4f} on 20 images" in out.stdout
    assert (save_dir / "curves.png").stat().st_size > 0 and (save_dir / "samples_step0000003.png").stat().st_size > 0


def test_max_train_images_trains_on_part_of_the_training_set(mnist_dir, tmp_path):
    save_dir = tmp_path / "run"
    out = run_train("--data_set", "mnist", "--data_dir", mnist_dir, "--save_dir", save_dir, *TINY, "--batch_size", "8",
                    "--max_train_images", "24", "--max_epochs", "2", "--num_samples", "0")
    assert out.returncode == 0, out.stderr
    state = torch.load(save_dir / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["epoch"] == 2 and state["data"].startswith("24 images")  # 2 epochs of 24 // 8


def test_missing_mnist_files_are_named_without_downloading(tmp_path):
    out = run_train("--data_set", "mnist", "--data_dir", tmp_path, "--save_dir", tmp_path / "run", *TINY)
    assert out.returncode == 2
    assert "train-images-idx3-ubyte" in out.stderr and "Traceback" not in out.stderr


def test_data_the_model_cannot_take_is_refused(mnist_dir, tmp_path, monkeypatch, capsys):
    base = ["--data_set", "mnist", "--data_dir", str(mnist_dir), "--save_dir", str(tmp_path / "run"), *TINY]
    odd = data_module.ImageSet(torch.zeros(40, 1, 30, 30, dtype=torch.uint8), torch.zeros(40, dtype=torch.long), 10)
    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: odd)
    assert train_module.main(base) == 2
    assert "cannot take mnist images (30x30x1)" in capsys.readouterr().err
    unlabelled = data_module.ImageSet(torch.zeros(40, 1, 28, 28, dtype=torch.uint8), None, None)
    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: unlabelled)
    assert train_module.main(base + ["--class_conditional"]) == 2
    assert "needs labels" in capsys.readouterr().err


def test_existing_run_is_not_overwritten_without_resume(mnist_dir, tmp_path):
    args = ["--data_set", "mnist", "--data_dir", mnist_dir, "--save_dir", tmp_path / "run", *TINY,
            "--batch_size", "16", "--max_steps", "1", "--num_samples", "0"]
    assert run_train(*args).returncode == 0
    again = run_train(*args)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    shutil.rmtree(tmp_path / "run")


def test_bf16_autocast_trains_on_the_cpu_close_to_float32(mnist_dir, tmp_path):
    common = ["--data_set", "mnist", "--data_dir", str(mnist_dir), *TINY, "--batch_size", "16", "--num_samples", "0",
              "--max_steps", "2", "--log_every", "1"]
    losses = {}
    for amp in ("none", "bf16"):
        assert train_module.main(common + ["--save_dir", str(tmp_path / amp), "--amp", amp]) == 0
        losses[amp] = train_losses(tmp_path / amp)
    assert sorted(losses["bf16"]) == [1, 2]
    for step, bits in losses["none"].items():
        assert losses["bf16"][step] != bits and losses["bf16"][step] == pytest.approx(bits, abs=0.05), step


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script_method, inside inductor
def test_compiled_training_gives_the_losses_of_eager_training(mnist_dir, tmp_path):
    common = ["--data_set", "mnist", "--data_dir", str(mnist_dir), *TINY, "--batch_size", "16", "--num_samples", "0",
              "--max_steps", "2", "--log_every", "1", "--dropout_p", "0"]  # compiled dropout draws other masks
    losses = {}
    for mode in ("eager", "compiled"):
        assert train_module.main(common + ["--save_dir", str(tmp_path / mode)] + (["--compile"] if mode == "compiled" else [])) == 0
        losses[mode] = train_losses(tmp_path / mode)
    assert sorted(losses["compiled"]) == [1, 2]
    for step, bits in losses["eager"].items():
        assert losses["compiled"][step] == pytest.approx(bits, rel=1e-4), step


def test_the_memory_estimate_matches_a_measured_peak_and_refuses_what_cannot_fit(mnist_dir, tmp_path):
    """The estimate that refuses a run up front, against the peak a real step reaches (the
    process's peak resident memory, reset before training, above what it held then)."""
    script = tmp_path / "peak.py"
    script.write_text(
        "import sys\n"
        "from fastpixel import train\n"
        "def status(field):  # kB in /proc/self/status\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) restarts from what is resident now\n"
        "before = status('VmRSS:')\n"
        "assert train.main(sys.argv[1:]) == 0\n"
        "print(status('VmHWM:') - before)\n")
    args = ["--data_set", "mnist", "--data_dir", str(mnist_dir), "--no_download", "--save_dir", str(tmp_path / "run"),
            "--nr_resnet", "2", "--nr_filters", "48", "--nr_logistic_mix", "5", "--dropout_p", "0", "--batch_size", "32",
            "--init_batch_size", "32", "--max_steps", "1", "--num_samples", "0", "--max_test_images", "1",
            "--eval_batch_size", "1"]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    config = fastpixel.ModelConfig(image_size=28, channels=1, nr_resnet=2, nr_filters=48, nr_logistic_mix=5, dropout=0.0)
    estimate = train_module.memory_estimate(train_module.parse_args(args), config)
    # Measured: 1.06 of the estimate (the peak also holds the data set, which the estimate leaves
    # out). Measured instead from ru_maxrss, whose baseline is the process's peak so far (an
    # import's transient), the growth was 0.79, and once 0.22 inside the whole suite.
    assert 0.5 * estimate <= peak <= 1.6 * estimate, (peak, estimate)
    refused = run_train("--data_set", "mnist", "--data_dir", mnist_dir, "--no_download", "--save_dir", tmp_path / "huge",
                        "--nr_logistic_mix", "1000000")
    assert refused.returncode == 2 and "this run needs about" in refused.stderr and "GiB" in refused.stderr
    assert not (tmp_path / "huge").exists()
