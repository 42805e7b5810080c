"""The lossless codec (`fastpixel.encode` / `fastpixel.decode`, `python -m fastpixel.compress`):
exact round trips for every family and engine, sizes at the model's likelihood, and data
that cannot be decoded here (another model, damage, other arithmetic) refused, never
decoded into wrong pixels."""
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastpixel
import fastpixel.io.data
from fastpixel.sampling.codec import CodecError, read_header
from tests.conftest import tiny_model
from tests.test_masked_families import HAS_COMPILER, OPTIONS, labels_for, tiny

ENGINES = ["torch", pytest.param("cext", marks=pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler"))]


def models():
    yield "pixelcnnpp", tiny_model(dtype=torch.float32, num_classes=3)
    yield "pixelcnnpp-rgb", tiny_model(channels=3, image_size=(4, 8))
    yield "pixelcnn-grey-4", tiny("pixelcnn", dtype=torch.float32, **OPTIONS["grey-4"])
    yield "gated-rgb-4-labels", tiny("gated", **OPTIONS["rgb-4-labels"])
    yield "gated-codes", tiny("gated", dtype=torch.float32, **OPTIONS["codes-300-labels"])


MODELS = list(models())


def images_of(model, n, seed=0):
    """Images the model finds likely (its own samples), as encode takes them."""
    return fastpixel.sample(model, n, fast=True, seed=seed, labels=labels_for(model, n))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name, model", MODELS, ids=[m[0] for m in MODELS])
def test_round_trip_is_exact_and_costs_the_models_bits(name, model, engine):
    n = 5
    images, labels = images_of(model, n), labels_for(model, n)
    data = fastpixel.encode(model, images, labels, batch_size=2, backend=engine)
    assert torch.equal(fastpixel.decode(model, data), images)
    assert read_header(data)["engine"] == engine
    bits = -float(fastpixel.log_prob(model, images, labels).sum()) / math.log(2)
    header = 9 + len(data[9:]) - 4 * sum(read_header(data)["streams"])
    coded = 8 * (len(data) - header)
    assert bits - 1 < coded <= bits * 1.01 + 3 * 64  # within 1%, plus each of 3 streams' flush


def test_a_batch_decodes_alone():
    model = tiny("pixelcnn", **OPTIONS["grey-4"])
    images = images_of(model, 5)
    data = fastpixel.encode(model, images, batch_size=2)
    assert torch.equal(fastpixel.decode(model, data, batches=[2, 0]), torch.cat([images[4:], images[:2]]))


def test_images_off_a_models_levels_come_back_at_them():
    """A 4-level PixelCNN codes uint8 images at its levels: what comes back is the image at them."""
    model = tiny("pixelcnn", **OPTIONS["grey-4"])
    images = torch.randint(0, 256, (3, 1, 5, 6), dtype=torch.uint8)
    back = fastpixel.decode(model, fastpixel.encode(model, images))
    snapped = model.canvas_values(model.levels(images.double() / 127.5 - 1), torch.float64)
    assert torch.equal(back, torch.round((snapped + 1) * 127.5).to(torch.uint8))


def test_another_model_or_dtype_is_refused():
    model = tiny_model(dtype=torch.float32)
    data = fastpixel.encode(model, images_of(model, 2))
    other = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        next(other.parameters()).add_(1e-6)
    with pytest.raises(CodecError, match="encoded by another model"):
        fastpixel.decode(other, data)
    with pytest.raises(CodecError, match="encoded with a float32 model; this one is float64"):
        fastpixel.decode(model.double(), data)
    with pytest.raises(CodecError, match="pixelcnnpp model of images"):
        fastpixel.decode(tiny("gated", **OPTIONS["grey-4"]), data)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_another_engine_decodes_exactly_or_is_refused():
    model = tiny_model(dtype=torch.float32, num_classes=3)
    images = images_of(model, 4)
    data = fastpixel.encode(model, images, labels_for(model, 4), backend="cext")
    try:
        assert torch.equal(fastpixel.decode(model, data, backend="torch"), images)
    except CodecError as err:
        assert "computes other probabilities" in str(err) or "digest differs" in str(err)


def test_damaged_data_is_refused_never_decoded_wrong():
    model = tiny("pixelcnn", dtype=torch.float32, **OPTIONS["grey-4"])
    images = images_of(model, 4)
    data = fastpixel.encode(model, images, batch_size=2)
    rng = random.Random(0)
    damaged = [data[:n] for n in (0, 3, 9, 40, len(data) - 4, len(data) - 1)] + [bytes(rng.randrange(256) for _ in range(len(data)))]
    for _ in range(40):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        damaged.append(bytes(flipped))
    refused = 0
    for item in damaged:
        try:
            back = fastpixel.decode(model, item)
        except CodecError:
            refused += 1
            continue
        assert torch.equal(back, images)  # a flip the format does not read (e.g. JSON spacing) changes nothing
    assert refused >= len(damaged) - 5
    with pytest.raises(CodecError, match="must be bytes"):
        fastpixel.decode(model, "not bytes")


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=torch.zeros(2, 1, 8, 12)), "images must be uint8 of shape \\(N, 1, 8, 12\\)"),
    (dict(images=torch.zeros(2, 8, 12, dtype=torch.uint8)), "images must be uint8"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(labels=[0, 1]), "labels were given, but this model is not class-conditional"),
])
def test_bad_encode_requests_are_clear_errors(kwargs, message):
    model = tiny_model()
    args = dict(images=torch.zeros(2, 1, 8, 12, dtype=torch.uint8)) | kwargs
    with pytest.raises(ValueError, match=message):
        fastpixel.encode(model, args.pop("images"), **args)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastpixel.compress", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_round_trip_and_refusals(checkpoint, tmp_path, mnist_dir):
    model = fastpixel.load(checkpoint)
    images = fastpixel.sample(model, 3, fast=True, seed=1, labels=[0, 1, 2])
    np.save(tmp_path / "in.npy", images.numpy())
    refused = run_cli("encode", "in.npy", "x.fpx", "--checkpoint", checkpoint, cwd=tmp_path)  # labels needed
    assert refused.returncode == 2 and "class-conditional" in refused.stderr and not (tmp_path / "x.fpx").exists()

    plain = tmp_path / "plain.safetensors"
    fastpixel.save(tiny_model(dtype=torch.float32), plain)
    out = run_cli("encode", "in.npy", "x.fpx", "--checkpoint", plain, "--batch_size", 2, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote x.fpx: 3 images in" in out.stdout and "bits per sub-pixel" in out.stdout
    out = run_cli("decode", "x.fpx", "back.npy", "--checkpoint", plain, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert np.array_equal(np.load(tmp_path / "back.npy"), images.numpy())
    info = run_cli("info", "x.fpx", cwd=tmp_path)
    assert info.returncode == 0 and '"count": 3' in info.stdout

    before = set(tmp_path.iterdir())
    for args, message in ((["decode", "x.fpx", "b.npy", "--checkpoint", checkpoint], "encoded by another model"),
                          (["decode", "missing.fpx", "b.npy"], "cannot read missing.fpx"),
                          (["decode", "in.npy", "b.npy"], "not fastpixel codec data"),
                          (["encode", "in.npy", "y.fpx", "--checkpoint", "mnist"], "images must be uint8 of shape (N, 1, 28, 28)")):
        out = run_cli(*args, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert set(tmp_path.iterdir()) == before

    out = run_cli("encode", "mnist:test:0-2", "m.fpx", "--checkpoint", "mnist-cond", "--data_dir", mnist_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert read_header((tmp_path / "m.fpx").read_bytes())["labels"] == \
        fastpixel.io.data.load_dataset("mnist", mnist_dir, "test", download=False).labels[:3].tolist()


def test_round_trip_on_the_triton_engine_interpreted():
    model = tiny_model(image_size=(4, 8), num_classes=3)
    images, labels = images_of(model, 2), labels_for(model, 2)
    data = fastpixel.encode(model, images, labels, backend="triton")
    assert read_header(data)["engine"] == "triton"
    assert torch.equal(fastpixel.decode(model, data), images)
