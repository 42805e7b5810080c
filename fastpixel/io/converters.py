"""Converters: a PixelCNN++ trained with openai/pixel-cnn (or its enhanced fork) or with
pclucas14/pixel-cnn-pp as a fastpixel model (`from_openai`, `from_pclucas14`), so it samples
with fastpixel's cached sampler. `python -m fastpixel.convert` is their command line.

All three implement the same network, so conversion is a renaming plus three layout fixes:
- every weight-normalised layer is converted through its *effective* weight g * v / ||v||,
  computed in float64 with the source's own normalisation axes (pclucas14 normalises its
  transposed convolutions per input channel, openai and fastpixel per output channel), and
  stored as v = W, g = ||W|| per output, so fastpixel computes the same W;
- the output layer's rows go from the sources' [logits | per channel: means, log-scales,
  coefficients] to fastpixel's [logits | means | log-scales | coefficients];
- the enhanced fork's CoordConv input [image, column, row, ones] becomes [image, ones, row, column].
The configuration is read from tensor shapes; what the tensors cannot tell (the image
size: the network is fully convolutional) comes from the arguments or a stated default.
Anything that does not fit raises ConvertError naming the tensor and the expected shape,
before a file is written; so does a weight that is not floating point or not finite, which
would make a file that `fastpixel.load` refuses.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..models.pixelcnnpp.config import ModelConfig
from ..models.pixelcnnpp.layers import CHANNEL_FACTOR, ShiftedConvTranspose2d
from ..models.pixelcnnpp.mixture import num_params
from ..models.pixelcnnpp.model import LEVELS, PixelCNNpp
from .tf_bundle import BundleError, TensorBundle

SOURCES = ("openai", "pclucas14")
EMA_SUFFIX = "/ExponentialMovingAverage"  # tf.train.ExponentialMovingAverage's shadow names
DEFAULT_SIZE = {1: 28, 3: 32}  # MNIST and CIFAR-10, what the sources were trained on


class ConvertError(ValueError):
    """A source file that cannot become a fastpixel model: its message says which tensor and why."""


def _notice(message: str) -> None:
    print(f"fastpixel.convert: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- the shared walk
def _layers(model: PixelCNNpp) -> Iterator[tuple[str, str]]:
    """(fastpixel name, pclucas14 name) of every weighted layer and class bias, in the order
    the original's model_spec creates them: its variable names count up in this order."""
    nr = model.config.nr_resnet

    def block(fp: str, pc: str) -> Iterator[tuple[str, str]]:
        yield f"{fp}.conv_in", f"{pc}.conv_input.conv"
        if model.get_submodule(fp).skip is not None:
            yield f"{fp}.skip", f"{pc}.nin_skip.lin_a"
        yield f"{fp}.conv_out", f"{pc}.conv_out.conv"
        if model.config.num_classes is not None:
            yield f"{fp}.class_bias", ""  # pclucas14 has no class conditioning

    yield from (("u_init", "u_init.conv"), ("ul_init_above", "ul_init.0.conv"), ("ul_init_left", "ul_init.1.conv"))
    for level in range(LEVELS):
        for i in range(nr):
            yield from block(f"up_u.{level}.{i}", f"up_layers.{level}.u_stream.{i}")
            yield from block(f"up_ul.{level}.{i}", f"up_layers.{level}.ul_stream.{i}")
        if level < LEVELS - 1:
            yield f"downsample_u.{level}", f"downsize_u_stream.{level}.conv"
            yield f"downsample_ul.{level}", f"downsize_ul_stream.{level}.conv"
    for level in reversed(range(LEVELS)):
        source_level = LEVELS - 1 - level  # pclucas14 numbers its down pass from the coarsest level
        for i in range(len(model.down_u[level])):
            yield from block(f"down_u.{level}.{i}", f"down_layers.{source_level}.u_stream.{i}")
            yield from block(f"down_ul.{level}.{i}", f"down_layers.{source_level}.ul_stream.{i}")
        if level > 0:
            yield f"upsample_u.{level - 1}", f"upsize_u_stream.{source_level}.deconv"
            yield f"upsample_ul.{level - 1}", f"upsize_ul_stream.{source_level}.deconv"
    yield "out", "nin_out.lin_a"


def _output_rows(channels: int, nr_mix: int) -> torch.Tensor:
    """For each fastpixel output row, the source's row: the sources keep, after the K logits,
    one block per channel of [means, log-scales, coefficients (RGB only)], K each."""
    k, parts = nr_mix, 3 if channels == 3 else 2
    rows = list(range(k))
    for part in range(parts):  # means (C, K), log-scales (C, K), coefficients (3, K)
        rows += [k + c * parts * k + part * k + j for c in range(3 if part == 2 else channels) for j in range(k)]
    return torch.tensor(rows)


def _input_columns(config: ModelConfig) -> torch.Tensor:
    """For each fastpixel input channel [image, ones, (row, column)], the source's channel:
    [image, ones], or with the enhanced fork's CoordConv [image, column, row, ones]."""
    c = config.channels
    return torch.tensor([*range(c), c + 2, c + 1, c] if config.coordconv else [*range(c + 1)])


def _assemble(source: str, config: ModelConfig,
              effective: Callable[[str, object, str], tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> PixelCNNpp:
    """A fastpixel model whose every layer computes the effective weight and bias that
    `effective(fastpixel name, module, pclucas14 name)` returns in fastpixel's layout."""
    model = PixelCNNpp(config).double().eval()
    state = {}
    for name, pc_name in _layers(model):
        module = model.get_submodule(name)
        weight, bias = effective(name, module, pc_name)
        if name == "out":
            rows = _output_rows(config.channels, config.nr_logistic_mix)
            weight, bias = weight[rows], bias[rows]
        elif name in ("u_init", "ul_init_above", "ul_init_left"):
            weight = weight[:, _input_columns(config)]
        if isinstance(module, nn.Embedding):
            state[f"{name}.weight"] = weight
            continue
        out_dim = 1 if isinstance(module, ShiftedConvTranspose2d) else 0  # fastpixel normalises per output
        state[f"{name}.v"] = weight
        state[f"{name}.g"] = torch.linalg.vector_norm(weight, dim=[d for d in range(4) if d != out_dim])
        state[f"{name}.b"] = bias
    model.load_state_dict(state)
    model = model.to(dtype)
    for name, tensor in model.state_dict().items():  # finite sources can still overflow dtype, or divide by ||V|| = 0
        if not torch.isfinite(tensor).all():
            raise ConvertError(f"{source}: converted tensor {name} holds NaN or infinite values in {dtype} (a "
                               f"weight-normalised layer with an all-zero V, or weights beyond {dtype}'s range?)")
    return model


def _normalised(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """g * v / ||v||, the norm over every axis but `dim` (the axis g runs along)."""
    others = [d for d in range(v.dim()) if d != dim]
    shape = [-1 if d == dim else 1 for d in range(v.dim())]
    return g.reshape(shape) * v / torch.linalg.vector_norm(v, dim=others, keepdim=True)


class _Tensors:
    """Named source tensors with shape checks: a missing or misshapen one is a ConvertError."""

    def __init__(self, source: str, shapes: dict[str, tuple[int, ...]], read: Callable[[str], object], suffix: str = ""):
        self.source, self.shapes, self.read, self.suffix = source, shapes, read, suffix
        self.used: set[str] = set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        name, shape = name + self.suffix, tuple(shape)
        self.used.add(name)
        if name not in self.shapes:
            raise ConvertError(f"{self.source}: missing tensor {name} (expected shape {shape})")
        if tuple(self.shapes[name]) != shape:
            raise ConvertError(f"{self.source}: tensor {name} has shape {tuple(self.shapes[name])}, expected {shape} "
                               f"(does the configuration match the file?)")
        value = torch.as_tensor(self.read(name))
        if not value.is_floating_point():
            raise ConvertError(f"{self.source}: tensor {name} is {value.dtype}, expected floating point weights")
        if not torch.isfinite(value).all():
            raise ConvertError(f"{self.source}: tensor {name} holds NaN or infinite values; refusing a broken model")
        return value.to(torch.float64)

    def check_all_used(self, names) -> None:
        """A weight left over means the file holds a bigger model than the configuration."""
        left = sorted(set(names) - self.used)
        if left:
            raise ConvertError(f"{self.source}: tensor {left[0]}{f' (and {len(left) - 1} more)' if len(left) > 1 else ''} "
                               f"has no place in a model of this configuration (does the configuration match the file?)")


def _config(source: str, inferred: dict, given: dict) -> ModelConfig:
    """Given values override inferred ones (a mismatch then shows as a tensor of the wrong
    shape); the image size, which no tensor holds, defaults to the data set's, with a notice."""
    values = {**inferred, **{k: v for k, v in given.items() if v is not None}}
    if values.get("image_size") is None:
        values["image_size"] = DEFAULT_SIZE[values["channels"]]
        _notice(f"the image size cannot be read from the weights (the network is fully convolutional): "
                f"using {values['image_size']}x{values['image_size']}; pass image_size (--image_size) for another")
    try:
        return ModelConfig(**values)
    except ValueError as err:
        raise ConvertError(f"{source}: {err}") from None


def _channels_and_coords(source: str, inputs: int, outputs: int, given: dict, coords_possible: bool) -> dict:
    """The image channels (and CoordConv) that fit the first layer's input channels
    (C + 1, or C + 3 with CoordConv) and the output layer's rows (a multiple of 3 or 10)."""
    fits = [dict(channels=c, coordconv=cc, nr_logistic_mix=outputs // num_params(c, 1))
            for c in (1, 3) for cc in ((False, True) if coords_possible else (False,))
            if inputs == c + 1 + 2 * cc and outputs % num_params(c, 1) == 0
            and given.get("channels") in (None, c) and given.get("coordconv") in (None, cc)]
    if not fits:
        raise ConvertError(f"{source}: no image channel count fits {inputs} input channels and {outputs} output rows "
                           f"(expected C + 1{' or C + 3 with CoordConv' if coords_possible else ''} inputs and "
                           f"3 * mix (C = 1) or 10 * mix (C = 3) outputs)")
    if len(fits) > 1:
        raise ConvertError(f"{source}: {inputs} input channels and {outputs} output rows fit several models "
                           f"({'; '.join(map(str, fits))}): pass channels (--channels)")
    return fits[0]


# --------------------------------------------------------------------------- pclucas14/pixel-cnn-pp
_WN_SPELLINGS = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def from_pclucas14(path: str | os.PathLike, *, image_size=None, channels: int | None = None,
                   nr_resnet: int | None = None, nr_filters: int | None = None,
                   nr_logistic_mix: int | None = None, dtype: torch.dtype = torch.float32) -> PixelCNNpp:
    """A fastpixel model (eval mode) from a pclucas14/pixel-cnn-pp `state_dict` saved with
    torch.save (read with weights_only=True: no code is unpickled).

    nr_filters, nr_resnet, channels and nr_logistic_mix are read from the tensors; values
    given must agree with them. Its Dropout2d (whole channels) becomes fastpixel's
    element-wise dropout of the same rate, which matters only for further training.
    """
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f"no pclucas14 checkpoint at {path}") from None
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: not advice to echo
        raise ConvertError(f"{path} holds Python objects besides tensors (a whole model or a training state, not "
                           "a state_dict), and running their code is not safe: save the model's state_dict() "
                           "(torch.save(model.state_dict(), path)) and convert that") from None
    except Exception as err:  # torch raises many kinds for a file that is not a state_dict
        raise ConvertError(f"{path} is not a PyTorch state_dict file: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConvertError(f"{path} does not hold a state_dict (a dict of tensors)")
    state = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")  # saved from nn.DataParallel
        for spelling, name in _WN_SPELLINGS.items():  # torch's newer weight_norm parametrisation
            key = key.replace(spelling, name)
        state[key] = value
    source = f"pclucas14 checkpoint {path}"
    tensors = _Tensors(source, {k: v.shape for k, v in state.items()}, state.__getitem__)
    if "u_init.conv.weight_v" not in state or "nin_out.lin_a.weight_v" not in state:
        raise ConvertError(f"{source}: no tensors u_init.conv.weight_v and nin_out.lin_a.weight_v: "
                           f"not a pclucas14/pixel-cnn-pp PixelCNN state_dict")
    first, last = state["u_init.conv.weight_v"], state["nin_out.lin_a.weight_v"]
    given = dict(image_size=image_size, channels=channels, nr_resnet=nr_resnet, nr_filters=nr_filters,
                 nr_logistic_mix=nr_logistic_mix)
    blocks = {m.group(1) for k in state if (m := re.match(r"up_layers\.0\.u_stream\.(\d+)\.", k))}
    inferred = dict(nr_filters=first.shape[0], nr_resnet=len(blocks) or None, dropout=0.5,
                    **_channels_and_coords(source, first.shape[1], last.shape[0], given, coords_possible=False))
    inferred.pop("coordconv")
    config = _config(source, inferred, given)

    def effective(name, module, pc_name):
        out = module.b.shape[0]
        if isinstance(module, ShiftedConvTranspose2d):  # torch's weight_norm: dim 0, the *input* channels
            v = tensors(f"{pc_name}.weight_v", module.v.shape)
            weight = _normalised(v, tensors(f"{pc_name}.weight_g", (v.shape[0], 1, 1, 1)), 0)
        else:  # Conv2d (out, in, kh, kw) or Linear (out, in): dim 0 is the output
            shape = module.v.shape if module.v.shape[2:] != (1, 1) else module.v.shape[:2]
            v = tensors(f"{pc_name}.weight_v", shape)
            g = tensors(f"{pc_name}.weight_g", (out,) + (1,) * (v.dim() - 1))
            weight = _normalised(v, g, 0).reshape(module.v.shape)
        return weight, tensors(f"{pc_name}.bias", (out,))

    model = _assemble(source, config, effective, dtype)
    tensors.check_all_used(state)
    return model


# --------------------------------------------------------------------------- openai/pixel-cnn
def _bundle_prefix(path: Path) -> str:
    """A checkpoint's prefix from the prefix itself, its .index file, or a folder holding one."""
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            raise ConvertError(f"{path} holds {len(indexes)} checkpoint .index files; name one checkpoint (its prefix or .index)")
        path = indexes[0]
    return str(path)[:-len(".index")] if path.suffix == ".index" else str(path)


def from_openai(path: str | os.PathLike, *, image_size=None, channels: int | None = None,
                nr_resnet: int | None = None, nr_filters: int | None = None, nr_logistic_mix: int | None = None,
                resnet_nonlinearity: str | None = None, dtype: torch.dtype = torch.float32) -> PixelCNNpp:
    """A fastpixel model (eval mode) from a TensorFlow checkpoint written by openai/pixel-cnn's
    train.py or its enhanced fork (prefix, .index file, or the folder holding it).

    Takes the Polyak-averaged weights the original evaluates with, or the raw ones, with a
    notice, when the checkpoint has none. Read from the tensors: nr_filters, nr_resnet,
    nr_logistic_mix, channels, class conditioning and the fork's CoordConv; the nonlinearity
    too, except elu against relu (pass resnet_nonlinearity). The fork's non-local block is
    refused: it attends to every pixel of the input, so its output is not causal.
    """
    prefix = _bundle_prefix(Path(path))
    given = dict(image_size=image_size, channels=channels, nr_resnet=nr_resnet, nr_filters=nr_filters,
                 nr_logistic_mix=nr_logistic_mix)
    try:  # the reader's errors (a truncated, corrupt or foreign file) name the file, and the tensor
        return _from_bundle(TensorBundle(prefix), prefix, given, resnet_nonlinearity, dtype)
    except BundleError as err:
        raise ConvertError(str(err)) from None


def _from_bundle(bundle: TensorBundle, prefix: str, given: dict, resnet_nonlinearity: str | None,
                 dtype: torch.dtype) -> PixelCNNpp:
    """from_openai, once the checkpoint's index is read."""
    source = f"openai checkpoint {prefix}"
    names = bundle.shapes
    scope = next((m.group(1) for n in names if (m := re.fullmatch(f"(.*)conv2d_0/V({EMA_SUFFIX})?", n))), None)
    if scope is None:
        raise ConvertError(f"{source}: no variable model/conv2d_0/V: not a PixelCNN++ checkpoint of openai/pixel-cnn")
    if any(n.startswith(f"{scope}nonlocal") for n in names):
        raise ConvertError(f"{source}: has the enhanced fork's non-local block, which attends to every pixel of the "
                           f"input image, including those not yet generated; fastpixel's non-local block is causally "
                           f"masked (and sits elsewhere), so a converted model would compute something else")
    suffix = EMA_SUFFIX if f"{scope}conv2d_0/V{EMA_SUFFIX}" in names else ""
    if not suffix:
        _notice(f"{prefix} holds no Polyak-averaged (ExponentialMovingAverage) weights: converting the raw weights")

    def shape(variable: str) -> tuple[int, ...] | None:
        return names.get(f"{scope}{variable}{suffix}")

    convs = sum(1 for n in names if re.fullmatch(re.escape(scope) + r"conv2d_\d+/V" + re.escape(suffix), n))
    first, last = shape("conv2d_0/V"), shape(f"dense_{(convs - 15) // 24 * 9 + 4}/V")
    if (convs - 15) % 24 or convs < 39 or last is None:
        raise ConvertError(f"{source}: {convs} conv2d layers do not make a PixelCNN++ of the original's layout "
                           f"(24 * nr_resnet + 15, and dense_(9 * nr_resnet + 4) as the output layer)")
    factor = (shape("conv2d_3/V") or (0, 0, 0))[2] // first[3]
    hw = shape("conditional_weights_0/hw")
    inferred = dict(nr_filters=first[3], nr_resnet=(convs - 15) // 24, dropout=0.5,
                    num_classes=None if hw is None else hw[0],
                    resnet_nonlinearity=resnet_nonlinearity or ("concat_elu" if factor == 2 else None),
                    **_channels_and_coords(source, first[2], last[1], given, coords_possible=True))
    if inferred["resnet_nonlinearity"] is None:
        raise ConvertError(f"{source}: the gated blocks take {first[3]} channels: elu or relu, which the weights "
                           f"cannot tell apart; pass resnet_nonlinearity (--resnet_nonlinearity)")
    config = _config(source, inferred, given)
    if config.coordconv and config.shape[0] != config.shape[1]:
        raise ConvertError(f"{source}: CoordConv models convert only for square images: the enhanced fork divides "
                           f"column indices by height - 1 and row indices by width - 1")
    if CHANNEL_FACTOR[config.resnet_nonlinearity] != factor:
        raise ConvertError(f"{source}: tensor {scope}conv2d_3/V{suffix} has {factor * first[3]} input channels, "
                           f"expected {CHANNEL_FACTOR[config.resnet_nonlinearity] * first[3]} for {config.resnet_nonlinearity}")
    tensors = _Tensors(source, names, lambda n: bundle.get(n).copy(), suffix)
    counters: dict[str, int] = {}

    def variable(kind: str, name: str, shape) -> torch.Tensor:
        return tensors(f"{scope}{kind}_{counters[kind]}/{name}", shape)

    def effective(name, module, _):
        kind = ("conditional_weights" if name.endswith("class_bias") else "dense" if name.endswith(".skip") or name == "out"
                else "deconv2d" if isinstance(module, ShiftedConvTranspose2d) else "conv2d")
        counters[kind] = counters.get(kind, -1) + 1
        if kind == "conditional_weights":  # h is one-hot, so h @ hw is a row of hw: an embedding
            return variable(kind, "hw", module.weight.shape), None
        # TF layouts: conv [kh, kw, in, out], deconv [kh, kw, out, in], dense [in, out];
        # all normalised per output channel, like fastpixel's
        v = module.v.permute(2, 3, 1, 0) if module.v.shape[2:] != (1, 1) else module.v[:, :, 0, 0].T
        out_axis = {"conv2d": 3, "deconv2d": 2, "dense": 1}[kind]
        weight = _normalised(variable(kind, "V", v.shape), variable(kind, "g", (v.shape[out_axis],)), out_axis)
        weight = weight.permute(3, 2, 0, 1) if kind != "dense" else weight.T[:, :, None, None]
        return weight, variable(kind, "b", (v.shape[out_axis],))

    model = _assemble(source, config, effective, dtype)
    layer_variable = re.escape(scope) + r"(conv2d|deconv2d|dense|conditional_weights)_\d+/(V|g|b|hw)" + re.escape(suffix)
    tensors.check_all_used(n for n in names if re.fullmatch(layer_variable, n))
    return model
