"""Completion from a prefix (`fastpixel.sample(..., prefix=, keep=)`) and likelihoods per image
and per sub-pixel (`fastpixel.log_prob`), for every family and engine.

Completion is sampling with the known pixels taken instead of drawn (teacher forcing through
the same steps), so: a drawn image completed from its own prefix with its own seed comes
back exactly; every engine and the naive sampler give the same completions; and the
completions follow the model's exact conditional distribution, computed here by enumeration."""
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastpixel
import fastpixel.io.data
from fastpixel.models.masked import categorical
from tests.conftest import tiny_model
from tests.test_masked_families import OPTIONS, labels_for, tiny

MASKED = [(family, option) for family in ("pixelcnn", "gated") for option in ("grey-4", "rgb-4-labels", "codes-300-labels")]


def models():
    """(id, float64 model, engines that run it) for every family, with options that matter."""
    yield "pixelcnnpp", tiny_model(num_classes=3, nonlocal_block=True), ["torch", "cext"]
    yield "pixelcnnpp-rgb", tiny_model(channels=3, coordconv=True), ["torch", "cext"]
    for family, option in MASKED:
        yield f"{family}-{option}", tiny(family, **OPTIONS[option]), ["torch", "cext"]


MODELS = list(models())


def drawn(model, n, seed, **kwargs):
    return fastpixel.sample(model, n, seed=seed, labels=labels_for(model, n), **kwargs)


@pytest.mark.parametrize("name, model, engines", MODELS, ids=[m[0] for m in MODELS])
def test_completing_a_sample_from_its_own_prefix_gives_it_back(name, model, engines):
    height, width = model.config.shape
    keep = [0, width + 3, height * width // 2, height * width - 1]  # one per image: nothing to all but one
    sample = drawn(model, len(keep), seed=5, fast=True, backend="torch")
    for engine in engines:
        completed = drawn(model, len(keep), seed=5, fast=True, backend=engine, prefix=sample, keep=keep)
        assert torch.equal(completed, sample), engine
    assert torch.equal(drawn(model, len(keep), seed=5, fast=False, prefix=sample, keep=keep), sample)


@pytest.mark.parametrize("name, model, engines", MODELS, ids=[m[0] for m in MODELS])
def test_completions_keep_the_prefix_and_agree_across_engines_and_the_naive_sampler(name, model, engines):
    height, width = model.config.shape
    keep = [width, 2 * width + 1, 0]
    source = drawn(model, 3, seed=1, fast=True)
    reference = drawn(model, 3, seed=2, fast=False, prefix=source, keep=keep)
    for i, k in enumerate(keep):
        flat = reference[i].reshape(-1, height * width) if reference.dim() == 4 else reference[i].reshape(1, -1)
        origin = source[i].reshape(flat.shape)
        assert torch.equal(flat[:, :k], origin[:, :k])
    assert not torch.equal(reference, source)  # the rest was drawn anew (seed 2)
    for engine in engines:
        assert torch.equal(drawn(model, 3, seed=2, fast=True, backend=engine, prefix=source, keep=keep), reference)


def test_completion_runs_on_the_triton_engine_interpreted():
    model = tiny_model(image_size=(4, 8))
    sample = fastpixel.sample(model, 2, fast=True, seed=4, backend="torch")
    assert torch.equal(fastpixel.sample(model, 2, fast=True, seed=4, backend="triton", prefix=sample, keep=[9, 20]),
                       sample)


def test_completions_follow_the_exact_conditional_distribution():
    """A 2x2 grey image of 3 levels with its first row known: the last two pixels' 9 values,
    drawn many times, against their exact conditional p(x3, x4 | x1, x2) by enumeration of
    the model's joint log-probabilities."""
    model = tiny("pixelcnn", image_size=2, channels=1, color_levels=3, hidden_ksize=1)
    prefix_levels = torch.tensor([2, 0])
    rest = torch.tensor(list(itertools.product(range(3), repeat=2)))
    levels = torch.cat([prefix_levels.expand(len(rest), 2), rest], 1).view(-1, 1, 2, 2)
    images = torch.round((levels * 127.5)).to(torch.uint8)  # levels 0, 1, 2 of 3 -> 0, 128, 255 (grid values -1, 0, 1)
    joint = fastpixel.log_prob(model, images).exp()
    conditional = joint / joint.sum()
    marginal = torch.stack([fastpixel.log_prob(model, torch.round(torch.cat([torch.tensor(p).expand(len(rest), 2), rest], 1)
                                                                     .view(-1, 1, 2, 2) * 127.5).to(torch.uint8)).exp()
                            for p in itertools.product(range(3), repeat=2)]).sum(0)
    n = 6000
    sigma = (n * conditional * (1 - conditional)).sqrt()
    # the prefix matters: a completer drawing from the marginal instead would fail the test below
    assert ((n * marginal - n * conditional).abs() > 5 * sigma + 1).any()

    completions = fastpixel.sample(model, n, fast=True, seed=0, prefix=images[:1].expand(n, -1, -1, -1), keep=2)
    assert (completions[:, 0, 0] == images[0, 0, 0]).all()
    index = (categorical.levels(completions[:, 0, 1] / 127.5 - 1, 3) * torch.tensor([3, 1])).sum(1)
    counts = torch.bincount(index, minlength=9).double()
    assert ((counts - n * conditional).abs() < 5 * sigma + 1).all()


@pytest.mark.parametrize("name, model, engines", MODELS[:2] + MODELS[2::2], ids=[m[0] for m in MODELS[:2] + MODELS[2::2]])
def test_per_pixel_log_probs_sum_to_per_image_and_average_to_bits_per_dim(name, model, engines):
    images = drawn(model, 3, seed=0, fast=True)
    labels = labels_for(model, 3)
    maps = fastpixel.log_prob(model, images, labels, per_pixel=True, batch_size=2)
    assert maps.shape == images.shape and (maps <= 0).all()
    per_image = fastpixel.log_prob(model, images, labels)
    assert torch.allclose(maps.flatten(1).sum(1), per_image, rtol=0, atol=1e-9)
    bpd = fastpixel.bits_per_dim(model, images, labels)
    assert abs(-float(maps.mean()) / math.log(2) - bpd) < 1e-9


def test_per_pixel_log_probs_are_each_pixels_conditional():
    """Changing the last pixel changes only the last entry of the map (each entry conditions
    on the pixels before it, never after)."""
    model = tiny_model()
    images = fastpixel.sample(model, 1, fast=True, seed=0)
    other = images.clone()
    other[0, 0, -1, -1] ^= 0x55
    a, b = (fastpixel.log_prob(model, x, per_pixel=True)[0, 0] for x in (images, other))
    changed = (a != b).nonzero().tolist()
    assert changed == [[images.shape[2] - 1, images.shape[3] - 1]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep=3), "needs both prefix"),
    (dict(prefix="P", keep=None), "needs both prefix"),
    (dict(prefix=torch.zeros(2, 1, 8, 12), keep=3), "uint8 images of shape \\(2, 1, 8, 12\\)"),
    (dict(prefix=torch.zeros(2, 3, 8, 12, dtype=torch.uint8), keep=3), "uint8 images of shape"),
    (dict(prefix="P", keep=97), "keep must lie in 0..96"),
    (dict(prefix="P", keep=[1, 2, 3]), "keep must be an int or 2 ints"),
    (dict(prefix="P", keep=1.5), "keep must be an int"),
])
def test_bad_completion_requests_are_one_clear_error(kwargs, message):
    model = tiny_model()
    if isinstance(kwargs.get("prefix"), str):
        kwargs["prefix"] = torch.zeros(2, 1, 8, 12, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        fastpixel.sample(model, 2, fast=True, **kwargs)


def test_bad_codes_prefix_is_one_clear_error():
    model = tiny("pixelcnn", **OPTIONS["codes-300-labels"])
    with pytest.raises(ValueError, match="codes \\(1, 5, 6\\) in 0..299, got codes from 300 to 300"):
        fastpixel.sample(model, 1, fast=True, labels=[0], prefix=torch.full((1, 5, 6), 300), keep=2)


# ------------------------------------------------------------------------------------ command lines
def run_cli(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_sample_complete_keeps_the_rows_and_lays_out_original_occluded_completions(checkpoint, tmp_path):
    model = fastpixel.load(checkpoint)
    source = fastpixel.sample(model, 2, fast=True, seed=7, labels=[0, 1])
    np.save(tmp_path / "source.npy", source.numpy())
    out = run_cli("fastpixel.sample", "--fast", "--checkpoint", checkpoint, "--complete", "source.npy", "--keep_rows", 3,
                  "-n", 2, "--npy", "done.npy", "--out", "grid.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote grid.png: 2 completions of each of 2 images (first 3 rows kept)" in out.stdout
    done = torch.from_numpy(np.load(tmp_path / "done.npy"))
    assert done.shape == (4, 1, 8, 12)
    assert torch.equal(done[:, :, :3], source.repeat_interleave(2, 0)[:, :, :3])
    # completion j of source image s is image s * 2 + j of the seed's sequence, labels cycling by that index
    assert torch.equal(done, fastpixel.sample(model, 4, fast=True, seed=0, prefix=source.repeat_interleave(2, 0),
                                              keep=3 * 12))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 10 + 2, 4 * 14 + 2)  # per source: original, occluded, 2 completions
    occluded = grid[2:10, 16:28]
    assert (occluded[3:] == 128).all() and np.array_equal(occluded[:3], source[0, 0, :3].numpy())


def test_sample_complete_reads_a_data_set_and_its_labels(mnist_dir, tmp_path):
    out = run_cli("fastpixel.sample", "--fast", "--checkpoint", "mnist-cond", "--complete", "mnist:test:3-4",
                  "--data_dir", mnist_dir, "--keep_rows", 28, "-n", 1, "--npy", "done.npy", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    test = fastpixel.io.data.load_dataset("mnist", mnist_dir, "test", download=False)
    assert np.array_equal(np.load(tmp_path / "done.npy"), test.images[3:5].numpy())  # every row kept


@pytest.mark.parametrize("args, message", [
    (["--complete", "source.npy"], "--complete needs --keep_rows in 0..8"),
    (["--complete", "source.npy", "--keep_rows", "9"], "--complete needs --keep_rows in 0..8"),
    (["--keep_rows", "2"], "--keep_rows applies to --complete SOURCE"),
    (["--complete", "wide.npy", "--keep_rows", "2"], "its images have shape (1, 8, 13), and this model's have (1, 8, 12)"),
    (["--complete", "missing.npy", "--keep_rows", "2"], "no such file or folder"),
    (["--complete", "mnist:test:0-3", "--keep_rows", "2"], "MNIST test files are missing"),
])
def test_bad_completion_is_one_line_exit_2_and_writes_nothing(checkpoint, tmp_path, args, message):
    np.save(tmp_path / "source.npy", np.zeros((2, 1, 8, 12), np.uint8))
    np.save(tmp_path / "wide.npy", np.zeros((2, 1, 8, 13), np.uint8))
    before = set(tmp_path.iterdir())
    out = run_cli("fastpixel.sample", "--fast", "--checkpoint", checkpoint, "--data_dir", tmp_path, *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert set(tmp_path.iterdir()) == before


def test_eval_writes_per_image_scores_and_a_heat_map(mnist_dir, tmp_path):
    out = run_cli("fastpixel.eval", "--checkpoint", "mnist", "--data_set", "mnist", "--data_dir", mnist_dir,
                  "--max_images", 5, "--per_image", "scores.npy", "--heatmap", "heat.png", "--heatmap_images", 3,
                  "--json", "r.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    test = fastpixel.io.data.load_dataset("mnist", mnist_dir, "test", download=False)
    scores = np.load(tmp_path / "scores.npy")
    model = fastpixel.load("mnist")
    expected = -fastpixel.log_prob(model, test.images[:5]).numpy() / (28 * 28 * math.log(2))
    assert scores.shape == (5,) and scores.dtype == np.float64 and np.allclose(scores, expected, rtol=0, atol=1e-9)
    reported = json.loads((tmp_path / "r.json").read_text())["bits_per_dim"]
    assert abs(reported - scores.mean()) < 1e-9
    assert abs(reported - fastpixel.bits_per_dim(model, test.images[:5])) < 1e-6  # float32 sums, in another order
    assert Image.open(tmp_path / "heat.png").size[0] > 200
