"""The trained models shipped in fastpixel/weights: they load, match their model cards,
score what the card says, and the no-argument sampler uses the MNIST one."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastpixel
from fastpixel.io.checkpoint import BUNDLED, bundled_models
from fastpixel.io.data import load_dataset
from fastpixel.models.families import FAMILIES
from fastpixel.sampling import to_model_input

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CARD = (BUNDLED / "README.md").read_text() if (BUNDLED / "README.md").exists() else ""


def card_section(name: str) -> str:
    match = re.search(rf"^## `{re.escape(name)}`\n(.*?)(?=^## |\Z)", CARD, re.S | re.M)
    assert match, f"fastpixel/weights/README.md has no section for {name}"
    return match.group(1)


def test_mnist_is_bundled():
    assert "mnist" in bundled_models()


@pytest.mark.parametrize("name", bundled_models())
def test_bundled_model_matches_its_card(name):
    section = card_section(name)
    family = FAMILIES[re.search(r"family: `(\w+)`", section).group(1)]
    config = json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))
    model = fastpixel.load(name, family=family.name)
    assert model.config == family.config.from_dict(config)
    parameters = int(re.search(r"([0-9,]+) parameters", section).group(1).replace(",", ""))
    assert sum(p.numel() for p in model.parameters()) == parameters
    megabytes = float(re.search(r"float32,\s+([0-9.]+) MB", section).group(1))
    assert (BUNDLED / f"{name}.safetensors").stat().st_size / 1e6 == pytest.approx(megabytes, abs=0.05)


@pytest.mark.parametrize("name", bundled_models())
def test_bundled_model_scores_the_cards_bits_per_dim_on_500_test_images(name):
    data_set = re.search(r"data set: `(\w+)`", card_section(name)).group(1)
    claimed = float(re.search(r"first 500 test images: ([0-9.]+) bits/dim", card_section(name)).group(1))
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the real {data_set} test set is not here ({SHARED_DATA} is absent)")
    test = load_dataset(data_set, SHARED_DATA, "test", download=False)
    model = fastpixel.load(name)
    labels = None if model.config.num_classes is None else test.labels[:500]
    assert fastpixel.bits_per_dim(model, test.images[:500], labels) == pytest.approx(claimed, abs=5e-4)


CLASS_CONDITIONAL = [name for name in bundled_models() if fastpixel.load(name).config.num_classes is not None]


@pytest.mark.parametrize("name", CLASS_CONDITIONAL)
def test_bundled_class_conditional_model_names_the_class_of_real_test_images(name):
    """Read as a classifier, argmax over y of p(image | y), the model labels held-out images
    correctly: its labels steer what it models (`mnist-cond`: 96% of these 100, 93% of the first
    1,000; a model that ignored them would score about 10%)."""
    data_set = re.search(r"data set: `(\w+)`", card_section(name)).group(1)
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the real {data_set} test set is not here ({SHARED_DATA} is absent)")
    test = load_dataset(data_set, SHARED_DATA, "test", download=False)
    model = fastpixel.load(name).eval()
    x = to_model_input(test.images[:100])
    with torch.no_grad():
        nll = torch.stack([model.nll(model(x, torch.full((len(x),), y)), x)
                           for y in range(model.config.num_classes)], dim=1)
    accuracy = float((nll.argmin(dim=1) == test.labels[:100]).float().mean())
    assert accuracy >= 0.9


@pytest.mark.parametrize("name", CLASS_CONDITIONAL)
def test_bundled_class_conditional_sampler_draws_the_classes_asked_for(name, tmp_path):
    """Read by a reader independent of the model, the nearest neighbour among the real training
    images (96% right on the first 1,000 MNIST test digits), the sampler's default grid cycles
    through the classes and `--label 7` draws sevens (`mnist-cond`, seed 0: 90% and 88%; a
    model that ignored its labels would score about 10%)."""
    data_set = re.search(r"data set: `(\w+)`", card_section(name)).group(1)
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the real {data_set} training set is not here ({SHARED_DATA} is absent)")
    train = load_dataset(data_set, SHARED_DATA, "train", download=False)
    references = train.images.flatten(1).float()
    classes = fastpixel.load(name).config.num_classes

    def read_samples(*flags):
        npy = tmp_path / "samples.npy"
        out = subprocess.run([sys.executable, "-m", "fastpixel.sample", "--fast", "--checkpoint", name,
                              "-n", str(5 * classes), "--seed", "0", *flags, "--npy", npy],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr
        images = torch.from_numpy(np.load(npy)).flatten(1).float()
        return train.labels[torch.cdist(images, references).argmin(dim=1)]

    cycled = read_samples()
    assert float((cycled == torch.arange(5 * classes) % classes).float().mean()) >= 0.84
    sevens = read_samples("--label", "7")
    assert float((sevens == 7).float().mean()) >= 0.84


def test_sampler_without_arguments_draws_from_the_bundled_mnist_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastpixel.sample", "--fast", "-n", "2"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "samples.png").size == (2 * 30 + 2, 30 + 2)
