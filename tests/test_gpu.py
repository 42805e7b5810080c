"""What only a CUDA device can check; skipped, with the reason, where there is none."""
import pytest
import torch

import fastpixel
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("channels", [1, 3])
def test_cached_matches_naive_on_cuda_float64(channels):
    model = tiny_model(channels=channels, nonlocal_block=True, coordconv=True, num_classes=3).cuda()
    assert torch.equal(fastpixel.sample(model, 3, fast=True, seed=2), fastpixel.sample(model, 3, seed=2))
    assert torch.equal(fastpixel.sample(model, 3, fast=True, seed=2), fastpixel.sample(model.cpu(), 3, fast=True, seed=2))


def test_bf16_sampling_gives_grid_images_and_bits_per_dim_close_to_float32():
    model = tiny_model(dtype=torch.float32, channels=3).cuda()
    images = fastpixel.sample(model.to(torch.bfloat16), 4, fast=True, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 12)
    full = fastpixel.bits_per_dim(model.float(), images)
    assert fastpixel.bits_per_dim(model.to(torch.bfloat16), images) == pytest.approx(full, rel=0.05)


def test_training_with_bf16_autocast_resumes_on_cuda(tmp_path):
    import numpy as np

    from fastpixel import train
    from tests.test_train import write_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("t10k", 8)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)
    args = ["--data_set", "mnist", "--data_dir", str(tmp_path), "--save_dir", str(tmp_path / "run"), "--nr_resnet", "1",
            "--nr_filters", "8", "--nr_logistic_mix", "2", "--batch_size", "8", "--num_samples", "2", "--amp", "bf16",
            "--no_download", "--save_every_steps", "1"]
    assert train.main(args + ["--max_steps", "2"]) == 0
    assert train.main(args + ["--max_steps", "4", "--resume"]) == 0
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 4
