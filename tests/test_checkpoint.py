import itertools
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastpixel
from fastpixel.io.checkpoint import BUNDLED, CheckpointError, bundled_models
from fastpixel.io.integrity import tensors_digest
from fastpixel.models.families import FAMILIES
from tests.conftest import tiny_model
from tests.test_masked_families import tiny


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


def forged(path, model, format=None, digest=True, **config):
    """`model` saved to `path`, then its config changed and, as a forger would, its digest recomputed."""
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    metadata = {"format": format or f"fastpixel.{type(model).__name__}/2",
                "config": json.dumps({**model.config.to_dict(), **config})}
    if digest:
        metadata["sha256"] = tensors_digest(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


CONFIGS = {  # every option that changes which tensors a model holds, and both of each
    "pixelcnnpp": [dict(nr_resnet=nr, num_classes=classes, nonlocal_block=extras, coordconv=extras, channels=channels,
                        resnet_nonlinearity=nonlinearity)
                   for nr, classes, extras, (channels, nonlinearity)
                   in itertools.product((1, 3), (None, 4), (False, True), ((1, "concat_elu"), (3, "relu")))],
    **{family: [dict(hidden_layers=layers, num_classes=classes, channels=channels, categorical_inputs=codes,
                     causal_ksize=2 * layers + 1, hidden_ksize=2 * layers - 1, hidden_fmaps=6, out_hidden_fmaps=9)
                for layers, classes, (channels, codes)
                in itertools.product((1, 3), (None, 3), ((1, False), (3, False), (1, True)))]
       for family in ("pixelcnn", "gated")},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_outline_agrees_with_the_model_it_builds(family):
    family = FAMILIES[family]
    for options in CONFIGS[family.name]:
        config = family.config(image_size=8, **options)
        with torch.device("meta"):
            built = {name: tuple(t.shape) for name, t in family.model(config).state_dict().items()}
        count, shapes = family.model.outline(config)
        assert count == len(built), options
        assert shapes.items() <= built.items(), options


FORGERIES = [  # family, the forged config fields, what the refusal says
    ("pixelcnnpp", dict(nr_resnet=1_000_000), r"the config needs 99000072 tensors, the file holds 171$"),
    ("pixelcnnpp", dict(nr_filters=10**9), r"tensor u_init.v has shape \(8, .*, the config needs \(1000000000, "),
    ("pixelcnnpp", dict(nr_filters=1e9), r"nr_filters must be a positive int, got 1000000000.0"),  # a float
    ("pixelcnnpp", dict(nr_logistic_mix=10**12), r"tensor out.v has shape \(6, .*, the config needs \(3000000000000, "),
    ("pixelcnnpp", dict(num_classes=10**15), r"tensor up_u.0.0.class_bias.weight of shape \(1000000000000000, 16\) is missing"),
    ("pixelcnnpp", dict(image_size=4 * 10**6), r"image_size 4000000 has 16000000000000 pixels, more than the 2147483647"),
    ("pixelcnnpp", dict(channels=True), r"channels must be 1 or 3, got True"),
    ("pixelcnn", dict(hidden_layers=1_000_000), r"the config needs 6000006 tensors, the file holds 18$"),
    ("pixelcnn", dict(hidden_fmaps=3 * 10**8), r"tensor causal.weight has shape \(12, .*, the config needs \(600000000, "),
    ("pixelcnn", dict(causal_ksize=10**9 + 1), r"tensor causal.weight has .*, the config needs \(12, 1, 500000001, "),
    ("pixelcnn", dict(hidden_ksize=10**9 + 1), r"tensor blocks.0.conv.weight has .*, the config needs \(6, 6, 500000001, "),
    ("pixelcnn", dict(out_hidden_fmaps=10**9), r"tensor out_hidden.weight has .*, the config needs \(1000000000, "),
    ("gated", dict(hidden_layers=1_000_000), r"the config needs 10000008 tensors, the file holds 28$"),
    ("gated", dict(num_classes=10**9), r"tensor blocks.0.label_bias.weight of shape \(1000000000, 12\) is missing"),
    ("gated", dict(image_size=(1, 10**10)), r"has 10000000000 pixels"),
]


@pytest.mark.parametrize("family, config, message", FORGERIES)
def test_forged_configs_are_refused_from_the_header_before_any_model_is_built(tmp_path, monkeypatch, family, config,
                                                                               message):
    model = tiny_model(dtype=torch.float32) if family == "pixelcnnpp" else tiny(family, torch.float32)
    path = forged(tmp_path / "m.safetensors", model, **config)

    def built(*args, **kwargs):
        pytest.fail("a model was built for a forged config")
    monkeypatch.setattr(FAMILIES[family].model, "__init__", built)
    with pytest.raises(CheckpointError, match=message):
        fastpixel.load(path)


def test_a_file_from_before_digests_loads_with_a_warning_that_a_resave_silences(tmp_path):
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        model.out.b.add_(1)  # a changed weight: nothing in a /1 file can tell
    path = forged(tmp_path / "old.safetensors", model, format="fastpixel.PixelCNNpp/1", digest=False)
    with pytest.warns(UserWarning, match=r"old.safetensors is a fastpixel.PixelCNNpp/1 file, written before model "
                                         r"files carried a digest: .*fastpixel.save\(fastpixel.load\(path\), path\)"):
        loaded = fastpixel.load(path)
    assert torch.equal(loaded.out.b, model.out.b)
    fastpixel.save(loaded, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fastpixel.load(path).out.b, model.out.b)


@pytest.mark.parametrize("name", bundled_models())
def test_bundled_models_carry_a_digest_and_load_without_warnings(name):
    with safe_open(str(BUNDLED / f"{name}.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"].endswith("/2") and "sha256" in metadata
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpixel.load(name)
