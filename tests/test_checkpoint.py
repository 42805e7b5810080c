import pytest
import torch
from safetensors.torch import save_file

import fastpixel
from fastpixel.io.checkpoint import CheckpointError
from tests.conftest import tiny_model


def test_save_load_round_trip(tmp_path):
    model = tiny_model(dtype=torch.float32, channels=3, num_classes=5, coordconv=True, nonlocal_block=True)
    path = fastpixel.save(model, tmp_path / "run" / "model.safetensors")
    loaded = fastpixel.load(path)
    assert loaded.config == model.config and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    labels = torch.tensor([4, 0])
    assert torch.equal(model(x, labels), loaded(x, labels))
    assert fastpixel.load(tmp_path / "run").config == model.config  # a directory holding model.safetensors
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model.safetensors"]  # no temporary left


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        fastpixel.load(tmp_path / "nothing.safetensors")


def test_truncated_file_is_named(tmp_path):
    path = fastpixel.save(tiny_model(dtype=torch.float32), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        fastpixel.load(path)


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(CheckpointError, match="not a fastpixel model"):
        fastpixel.load(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pt"):
        fastpixel.load(pickled)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    model = tiny_model(dtype=torch.float32)
    path = fastpixel.save(model, tmp_path / "m.safetensors")
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("out.")}
    save_file(tensors, str(path), metadata={"format": "fastpixel.PixelCNNpp/1", "config": model.config.to_json()})
    with pytest.raises(CheckpointError, match="do not match its config"):
        fastpixel.load(path)


def test_unknown_bundled_name_lists_the_bundled_models():
    from fastpixel.io.checkpoint import bundled_models

    with pytest.raises(FileNotFoundError) as err:
        fastpixel.load("nope")
    assert "bundled models:" in str(err.value)
    assert all(name in str(err.value) for name in bundled_models())


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = fastpixel.save(tiny_model(dtype=torch.float32), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_the_public_errors_are_exported_from_fastpixel():
    for name in ("CheckpointError", "DataError", "ConvertError", "CodecError", "BackendError", "BuildError"):
        assert name in fastpixel.__all__ and issubclass(getattr(fastpixel, name), Exception)
    assert fastpixel.CheckpointError is CheckpointError


def test_a_torch_save_file_is_named_and_pointed_to_the_converter(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=r"is a torch.save file, not a fastpixel model file: .*fastpixel.convert "
                                              r"--from pclucas14"):
        fastpixel.load(tmp_path / "weights.pth")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_loading_onto_cuda_without_cuda_says_so_in_a_sentence():
    with pytest.raises(ValueError, match="device 'cuda' was asked for, but this torch is a CPU build|no CUDA device"):
        fastpixel.load("mnist", device="cuda")
