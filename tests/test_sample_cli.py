"""`python -m fastpixel.sample`, run as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastpixel
from tests.conftest import tiny_model


def run_cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "fastpixel.sample", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def environment(**changes):
    """This process's environment without a forced backend or Triton's CPU interpreter, plus `changes`."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPIXEL_BACKEND", "TRITON_INTERPRET")}
    return dict(env, **changes)


def test_cached_sampling_is_the_default_and_equals_naive(checkpoint, tmp_path):
    fast = run_cli("--checkpoint", checkpoint, "-n", 5, "--seed", 3, "--npy", "fast.npy", "--backend", "torch",
                   cwd=tmp_path)
    assert fast.returncode == 0, fast.stderr
    assert "wrote samples.png: 5 images in" in fast.stdout and "images/s" in fast.stdout
    assert "cached sampling, torch backend, on cpu" in fast.stdout
    assert fast.stderr.count("fastpixel: cached sampling, torch backend, on cpu\n") == 1
    assert "row" in fast.stderr  # the progress bar
    naive = run_cli("--naive", "--checkpoint", checkpoint, "--num_samples", 5, "--seed", 3, "--out", "naive.png",
                    "--npy", "naive.npy", "--batch-size", 2, cwd=tmp_path)
    assert naive.returncode == 0, naive.stderr
    assert "naive sampling" in naive.stdout
    images = np.load(tmp_path / "fast.npy")
    assert images.shape == (5, 1, 8, 12) and images.dtype == np.uint8
    assert np.array_equal(images, np.load(tmp_path / "naive.npy"))
    library = fastpixel.sample(fastpixel.load(checkpoint), 5, seed=3)
    assert np.array_equal(images, library.numpy())
    assert Image.open(tmp_path / "samples.png").size == (3 * 14 + 2, 2 * 10 + 2)


def test_label_draws_that_class(checkpoint, tmp_path):
    out = run_cli("--fast", "--checkpoint", checkpoint, "-n", 2, "--label", 2, "--npy", "a.npy", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    expected = fastpixel.sample(fastpixel.load(checkpoint), 2, seed=0, labels=[2, 2])
    assert np.array_equal(np.load(tmp_path / "a.npy"), expected.numpy())


def test_default_labels_put_one_class_per_grid_column(checkpoint, tmp_path):
    """The fixture has 3 classes: 4 images cycle 0, 1, 2, 0 in 3 columns; with --label they tile 2 x 2."""
    cycled = run_cli("--fast", "--checkpoint", checkpoint, "-n", 4, "--out", "cycled.png", cwd=tmp_path)
    one_label = run_cli("--fast", "--checkpoint", checkpoint, "-n", 4, "--label", 1, "--out", "one.png", cwd=tmp_path)
    assert cycled.returncode == 0 and one_label.returncode == 0, cycled.stderr + one_label.stderr
    assert Image.open(tmp_path / "cycled.png").size == (3 * 14 + 2, 2 * 10 + 2)
    assert Image.open(tmp_path / "one.png").size == (2 * 14 + 2, 2 * 10 + 2)


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "missing.safetensors"], "no fastpixel model file at missing.safetensors"),
    (["--checkpoint", "corrupt.safetensors"], "not a readable safetensors file"),
    (["--checkpoint", "{ckpt}", "--label", "3"], "--label must lie in 0..2"),
    (["--checkpoint", "{ckpt}", "-n", "0"], "must be positive"),
    (["--checkpoint", "{ckpt}", "--out", "no/such/dir/x.png"], "does not exist"),
    (["--checkpoint", "{ckpt}", "--npy", "no/such/dir/x.npy"], "does not exist"),
    (["--checkpoint", "{ckpt}", "--out", "."], "is a directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(checkpoint, tmp_path, args, message):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 50)
    assert_refused([a.format(ckpt=checkpoint) for a in args], message, tmp_path)


@pytest.mark.parametrize("args, env, message", [
    (["--fast", "--backend", "cext"], {"CXX": "no-such-compiler"}, "backend 'cext' cannot run here: no C++ compiler"),
    (["--fast"], {"FASTPIXEL_BACKEND": "cext", "CXX": "no-such-compiler"}, "FASTPIXEL_BACKEND=cext cannot run here"),
    (["--fast"], {"FASTPIXEL_BACKEND": "bogus"}, "FASTPIXEL_BACKEND=bogus: unknown backend"),
    pytest.param(["--fast", "--backend", "triton"], {}, "Triton kernels need CUDA tensors",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs here")),
    (["--naive", "--backend", "triton"], {"TRITON_INTERPRET": "1"}, "applies to the cached sampler only"),
])
def test_backend_that_cannot_run_is_one_line_exit_2_before_sampling(checkpoint, tmp_path, args, env, message):
    assert_refused(["--checkpoint", checkpoint, *args], message, tmp_path, env=environment(**env))


def test_a_gated_model_samples_on_the_engine_and_refuses_triton(tmp_path):
    from tests.test_masked_families import tiny
    path = fastpixel.save(tiny("gated", dtype=torch.float32, image_size=(3, 4)), tmp_path / "gated.safetensors")
    out = run_cli("--fast", "--checkpoint", path, "-n", 2, "--npy", "a.npy", cwd=tmp_path, env=environment())
    assert out.returncode == 0, out.stderr
    assert "cached sampling, cext backend, on cpu" in out.stdout
    assert np.array_equal(np.load(tmp_path / "a.npy"), fastpixel.sample(fastpixel.load(path), 2, seed=0).numpy())
    assert_refused(["--fast", "--checkpoint", path, "--backend", "triton"], "serves PixelCNN++ models only", tmp_path,
                   env=environment())


def assert_refused(args, message, cwd, env=None):
    """The CLI ends with one line naming `message`, exit code 2, and no file written."""
    before = set(cwd.iterdir())
    out = run_cli(*args, cwd=cwd, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr
    assert "Traceback" not in out.stderr
    assert set(cwd.iterdir()) == before


def test_importing_the_cli_module_keeps_fastpixel_sample_the_function():
    import fastpixel.sample  # noqa: F401  (would bind the name fastpixel.sample to the module)
    from fastpixel.sample import main

    assert fastpixel.sample is fastpixel.sampling.sample and callable(main)
    assert "Draw n images" in fastpixel.sample.__doc__  # what help(fastpixel.sample) shows
    images = fastpixel.sample(tiny_model(dtype=torch.float32), 1, seed=0)
    assert images.shape == (1, 1, 8, 12)


def test_outputs_write_through_links_and_into_special_files_without_replacing_them(checkpoint, tmp_path):
    """Renaming over the output path (the atomic write) must not turn /dev/null, a FIFO or a
    symlink into a regular file: a link is written through, a special file into."""
    (tmp_path / "link.png").symlink_to("target.png")
    out = run_cli("--checkpoint", checkpoint, "-n", 2, "--out", "link.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "link.png").is_symlink() and Image.open(tmp_path / "target.png").size == (2 * 14 + 2, 10 + 2)
    fifo = tmp_path / "grid.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    out = run_cli("--checkpoint", checkpoint, "-n", 2, "--out", fifo, cwd=tmp_path)
    grid = reader.communicate(timeout=60)[0]
    assert out.returncode == 0 and grid == (tmp_path / "target.png").read_bytes()
    assert fifo.is_fifo()
    assert run_cli("--checkpoint", checkpoint, "-n", 1, "--out", os.devnull, cwd=tmp_path).returncode == 0
    assert Path(os.devnull).is_char_device()


@pytest.mark.parametrize("args, message", [
    (["--out", "grid.txt"], "--out grid.txt: a PNG grid is written there; give it a .png name"),
    (["--out", "same.png", "--npy", "same.png"], "--out and --npy both name same.png"),
    pytest.param(["--npy", "/dev/full"], "cannot write samples.png and /dev/full: No space left on device; nothing "
                 "was written", marks=pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")),
    (["--out", "a" * 300 + ".png"], "File name too long"),
])
def test_outputs_that_would_clobber_or_mislead_are_one_line_errors(checkpoint, tmp_path, args, message):
    out = run_cli("--checkpoint", checkpoint, "-n", 1, *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr and out.stderr.strip().splitlines()[-1].count("error") == 1
    assert "Traceback" not in out.stderr
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".png", ".txt")]  # the grid is not left without its array
