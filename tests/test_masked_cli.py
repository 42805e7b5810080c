"""The masked families through the command lines: train on a few steps of real MNIST (and on
a map of codes), then sample and evaluate what was trained."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastpixel

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--hidden-fmaps", "6", "--out-hidden-fmaps", "6", "--hidden-layers", "1", "--causal-ksize", "3",
        "--hidden-ksize", "3", "--batch_size", "8", "--max_steps", "3", "--eval_batch_size", "50", "--no_download"]


def run(module: str, *args):
    return subprocess.run([sys.executable, "-m", f"fastpixel.{module}", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data folder at {SHARED_DATA}")
@pytest.mark.parametrize("family", ["pixelcnn", "gated"])
def test_train_sample_and_eval_each_family_on_real_mnist(family, tmp_path):
    save_dir = tmp_path / "run"
    out = run("train", "--model", family, "--data_set", "mnist", "--data_dir", SHARED_DATA, "--save_dir", save_dir,
              *TINY, "--max_test_images", "50", "--class_conditional", "--log_every", "1")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_bpd"] for r in records if "train_bpd" in r]
    assert "test_bpd" in records[-1] and len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 1  # 256-way softmax: ~8 bits at the start
    model = fastpixel.load(save_dir, family=family)
    assert model.config.num_classes == 10 and model.config.color_levels == 256 and model.config.hidden_fmaps == 6

    out = run("sample", "--fast", "--checkpoint", save_dir, "-n", "2", "--label", "7", "--out", tmp_path / "s.png",
              "--npy", tmp_path / "s.npy")
    assert out.returncode == 0, out.stderr
    assert "cext backend" in out.stdout and np.load(tmp_path / "s.npy").shape == (2, 1, 28, 28)

    out = run("eval", "--checkpoint", save_dir, "--data_set", "mnist", "--data_dir", SHARED_DATA, "--max_images", "20",
              "--no_download", "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["family"] == family and 0 < result["bits_per_dim"] < 9


def test_a_gated_prior_over_codes_trains_samples_and_scores(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 8)):
        np.savez(tmp_path / f"{split}.npz", codes=rng.integers(0, 40, (n, 5, 6)), labels=rng.integers(0, 3, n),
                 num_classes=3)
    save_dir = tmp_path / "run"
    common = ["--model", "gated", "--data_set", "codes", "--data_dir", tmp_path, "--save_dir", save_dir, *TINY]
    out = run("train", *common)
    assert out.returncode == 2 and "--color_levels K" in out.stderr
    out = run("train", *common, "--color_levels", "40", "--class_conditional")
    assert out.returncode == 0, out.stderr
    model = fastpixel.load(save_dir)
    assert model.config.categorical_inputs and model.config.color_levels == 40

    out = run("sample", "--fast", "--checkpoint", save_dir, "-n", "3")
    assert out.returncode == 2 and "--npy" in out.stderr
    out = run("sample", "--fast", "--checkpoint", save_dir, "-n", "3", "--npy", tmp_path / "codes.npy")
    assert out.returncode == 0, out.stderr
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (3, 5, 6) and codes.dtype == np.int64 and codes.max() < 40

    out = run("eval", "--checkpoint", save_dir, "--data_set", "codes", "--data_dir", tmp_path)
    assert out.returncode == 0, out.stderr and "bits/dim" in out.stdout


def test_family_mismatches_are_clear_errors(tmp_path):
    out = run("train", "--data_set", "mnist", "--data_dir", tmp_path, "--hidden-layers", "2", "--save_dir", tmp_path / "r")
    assert out.returncode == 2 and "--model pixelcnn or --model gated" in out.stderr
    out = run("train", "--model", "gated", "--data_set", "mnist", "--data_dir", tmp_path, "-fl", "--save_dir", tmp_path / "r")
    assert out.returncode == 2 and "PixelCNN++ options" in out.stderr
    model = fastpixel.PixelCNN(fastpixel.PixelCNNConfig(image_size=4, hidden_fmaps=3, out_hidden_fmaps=3, hidden_layers=1))
    fastpixel.save(model, tmp_path / "p.safetensors")
    out = run("sample", "--fast", "--checkpoint", tmp_path / "p.safetensors", "-n", "1", "--backend", "triton",
              "--out", tmp_path / "s.png")
    assert out.returncode == 2 and "PixelCNN++ models only" in out.stderr


def test_resume_refuses_an_optimiser_state_that_does_not_fit(tmp_path):
    """Adam's state maps onto parameters by position: a state whose moments do not fit the
    model's parameters is refused up front, not met as a shape error inside a step."""
    from fastpixel.io.integrity import load_sealed, sealed
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        np.savez(tmp_path / f"{split}.npz", codes=rng.integers(0, 10, (n, 4, 5)))
    args = ["--model", "gated", "--data_set", "codes", "--data_dir", tmp_path, "--save_dir", tmp_path / "run",
            "--color_levels", "10", *TINY[:10], "--batch_size", "8", "--num_samples", "0"]
    out = run("train", *args, "--max_steps", "2")
    assert out.returncode == 0, out.stderr
    state_path = tmp_path / "run" / "state.pt"
    state = load_sealed(state_path)
    moments = state["optimizer"]["state"]
    moments[0], moments[2] = moments[2], moments[0]  # two parameters of different shapes
    state_path.write_bytes(sealed(state))
    out = run("train", *args, "--max_steps", "4", "--resume")
    assert out.returncode == 2 and "optimiser state holds" in out.stderr
