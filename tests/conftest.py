import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It is chosen when
# a kernel module is first imported, so it is set here, before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpixel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(dtype=torch.float64, **overrides) -> fastpixel.PixelCNNpp:
    """A small model in eval mode whose every path is active: weights are random, and every
    weight-norm scale and bias perturbed so that no layer starts as an exact identity."""
    options = dict(image_size=(8, 12), channels=1, nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0)
    options.update(overrides)
    model = fastpixel.PixelCNNpp(fastpixel.ModelConfig(**options)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".g"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".b"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A saved tiny class-conditional model (3 classes, float32), for the CLI tests."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    fastpixel.save(tiny_model(dtype=torch.float32, num_classes=3), path)
    return path


def random_images(model: fastpixel.PixelCNNpp, n: int) -> torch.Tensor:
    cfg = model.config
    return torch.randint(0, 256, (n, cfg.channels, *cfg.shape), dtype=torch.uint8)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where kernel tests put their tensors
