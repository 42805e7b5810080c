"""Converted models compute what their source computes.

Neither source project is installed, so each is transcribed here, in float64, from its own
code: pclucas14/pixel-cnn-pp's PyTorch modules (weight_norm with dim 0, so its transposed
convolutions are normalised per *input* channel) and openai/pixel-cnn's model_spec (NHWC,
TF weight layouts, variables named by per-kind counters in call order, convolutions
written out tap by tap). The transcriptions also create the source checkpoints: random
weights under the source's names, saved as the source saves them.
"""
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastpixel
from fastpixel import convert
from fastpixel.io.data import load_dataset
from fastpixel.io.tf_bundle import DTYPES, TensorBundle, crc32c, crc32c_reference, masked_crc32c

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURE = Path(__file__).parent / "fixtures" / "openai_tiny" / "params_tiny.ckpt"
FIXTURE_OPTIONS = dict(channels=3, nr_resnet=1, nr_filters=4, nr_logistic_mix=2, num_classes=3, seed=13)


def concat_elu(x, axis):
    return F.elu(torch.cat([x, -x], axis))


def unpack(l, channels):
    """The sources' parameter layout, (B, H, W, P) -> logits (B,H,W,K), means, log-scales
    and raw coefficients (B,H,W,C,K), as their loss functions slice it."""
    k = l.shape[-1] // (3 if channels == 1 else 10)
    rest = l[..., k:].reshape(*l.shape[:3], channels, -1)
    return l[..., :k], rest[..., :k], rest[..., k:2 * k], (rest[..., 2 * k:3 * k] if channels == 3 else None)


def unpack_fastpixel(params, channels):
    """fastpixel's documented layout [logits | means (C, K) | log-scales (C, K) | coeffs (3, K)]."""
    p = params.permute(0, 2, 3, 1)
    k = p.shape[-1] // (1 + 2 * channels + (3 if channels == 3 else 0))
    c = channels
    parts = (p[..., :k], p[..., k:k + c * k].unflatten(-1, (c, k)), p[..., k + c * k:k + 2 * c * k].unflatten(-1, (c, k)))
    return parts + ((p[..., k + 2 * c * k:].unflatten(-1, (3, k)),) if c == 3 else (None,))


def exact_log_mass(x, mean, log_scale):
    """log(sigmoid(a) - sigmoid(b)) for a bin of the 256-level grid, to 40 digits (mpmath)."""
    with mpmath.workdps(40):
        inv_scale, centered = mpmath.exp(-mpmath.mpf(log_scale)), mpmath.mpf(x) - mpmath.mpf(mean)
        sign = -1 if centered > 0 else 1  # mirrored right of the mean, where both would round to 1
        upper, lower = (1 / (1 + mpmath.exp(-sign * inv_scale * (centered + d / mpmath.mpf(255)))) for d in (sign, -sign))
        return float(mpmath.log(upper - lower))


def source_nll(l, x, tiny_bin_fallback=True):
    """Nats per image under the original's discretized_mix_logistic_loss (NHWC), with its
    fallback to the density at the bin centre when a bin's mass is below 1e-5; without it,
    every bin's exact mass."""
    logits, means, log_scales, coeffs = unpack(l, x.shape[-1])
    log_scales = log_scales.clamp(min=-7.0)
    x = x.unsqueeze(-1)
    if coeffs is not None:
        coeffs = torch.tanh(coeffs)
        means = torch.stack([means[..., 0, :], means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :],
                             means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]], -2)
    centered, inv_stdv = x - means, torch.exp(-log_scales)
    plus_in, min_in = inv_stdv * (centered + 1 / 255), inv_stdv * (centered - 1 / 255)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_stdv * centered
    if tiny_bin_fallback:
        log_pdf_mid = mid_in - log_scales - 2 * F.softplus(mid_in)
        middle = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - np.log(127.5))
    else:
        middle = torch.from_numpy(np.vectorize(exact_log_mass)(*(t.numpy() for t in torch.broadcast_tensors(x, means, log_scales))))
    log_probs = torch.where(x < -0.999, plus_in - F.softplus(plus_in), torch.where(x > 0.999, -F.softplus(min_in), middle))
    per_pixel = torch.logsumexp(log_probs.sum(-2) + torch.log_softmax(logits, -1), -1)
    return -per_pixel.sum((1, 2))


# --------------------------------------------------------------------------- pclucas14, transcribed
def pclucas14_state_dict(channels, nr_resnet, nr_filters, nr_mix, scale=1.0):
    """Random weights under pclucas14's names: weight_norm(dim=0) g and v, and a bias."""
    nf, state = nr_filters, {}

    def layer(name, v_shape, bias):
        state[f"{name}.weight_v"] = torch.randn(v_shape, dtype=torch.float64) * 0.05
        state[f"{name}.weight_g"] = torch.rand((v_shape[0],) + (1,) * (len(v_shape) - 1), dtype=torch.float64) + 0.5
        state[f"{name}.bias"] = torch.randn(bias, dtype=torch.float64) * 0.1

    def gated(name, k, skip):
        layer(f"{name}.conv_input.conv", (nf, 2 * nf, *k), nf)
        if skip:
            layer(f"{name}.nin_skip.lin_a", (nf, 2 * skip * nf), nf)
        layer(f"{name}.conv_out.conv", (2 * nf, 2 * nf, *k), 2 * nf)

    layer("u_init.conv", (nf, channels + 1, 2, 3), nf)
    layer("ul_init.0.conv", (nf, channels + 1, 1, 3), nf)
    layer("ul_init.1.conv", (nf, channels + 1, 2, 1), nf)
    for i in range(3):
        for j in range(nr_resnet):
            gated(f"up_layers.{i}.u_stream.{j}", (2, 3), 0)
            gated(f"up_layers.{i}.ul_stream.{j}", (2, 2), 1)
        for j in range(nr_resnet + (i > 0)):
            gated(f"down_layers.{i}.u_stream.{j}", (2, 3), 1)
            gated(f"down_layers.{i}.ul_stream.{j}", (2, 2), 2)
    for i in range(2):
        layer(f"downsize_u_stream.{i}.conv", (nf, nf, 2, 3), nf)
        layer(f"downsize_ul_stream.{i}.conv", (nf, nf, 2, 2), nf)
        layer(f"upsize_u_stream.{i}.deconv", (nf, nf, 2, 3), nf)  # ConvTranspose2d: (in, out, kh, kw)
        layer(f"upsize_ul_stream.{i}.deconv", (nf, nf, 2, 2), nf)
    layer("nin_out.lin_a", ((3 if channels == 1 else 10) * nr_mix, nf), (3 if channels == 1 else 10) * nr_mix)
    state["nin_out.lin_a.weight_g"] *= scale
    return state


def pclucas14_forward(state, x, nr_resnet):
    """pclucas14's PixelCNN.forward in eval mode (NCHW), returned as NHWC parameters."""
    def weight(name):  # torch.nn.utils.weight_norm, dim=0
        v, g = state[f"{name}.weight_v"], state[f"{name}.weight_g"]
        return g * v / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))

    def conv(name, t, k, stride=1, right=False):
        pad = (k[1] - 1, 0, k[0] - 1, 0) if right else ((k[1] - 1) // 2, (k[1] - 1) // 2, k[0] - 1, 0)
        return F.conv2d(F.pad(t, pad), weight(name), state[f"{name}.bias"], stride)

    def deconv(name, t, k, right):
        y = F.conv_transpose2d(t, weight(name), state[f"{name}.bias"], stride=2, output_padding=1)
        rows, cols = y.shape[2] - k[0] + 1, y.shape[3]
        return y[:, :, :rows, :cols - k[1] + 1] if right else y[:, :, :rows, (k[1] - 1) // 2:cols - (k[1] - 1) // 2]

    def nin(name, t):
        return torch.einsum("bchw,oc->bohw", t, weight(name)) + state[f"{name}.bias"].view(1, -1, 1, 1)

    def gated(name, og, right, a=None):
        k = (2, 2) if right else (2, 3)
        h = conv(f"{name}.conv_input.conv", concat_elu(og, 1), k, right=right)
        if a is not None:
            h = h + nin(f"{name}.nin_skip.lin_a", concat_elu(a, 1))
        h = conv(f"{name}.conv_out.conv", concat_elu(h, 1), k, right=right)  # Dropout2d: off in eval
        a, b = h.chunk(2, 1)
        return og + a * torch.sigmoid(b)

    def down_shift(t):
        return F.pad(t[:, :, :-1], (0, 0, 1, 0))

    def right_shift(t):
        return F.pad(t[:, :, :, :-1], (1, 0, 0, 0))

    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    u_list = [down_shift(conv("u_init.conv", x, (2, 3)))]
    ul_list = [down_shift(conv("ul_init.0.conv", x, (1, 3))) + right_shift(conv("ul_init.1.conv", x, (2, 1), right=True))]
    for i in range(3):
        for j in range(nr_resnet):
            u_list.append(gated(f"up_layers.{i}.u_stream.{j}", u_list[-1], False))
            ul_list.append(gated(f"up_layers.{i}.ul_stream.{j}", ul_list[-1], True, u_list[-1]))
        if i != 2:
            u_list.append(conv(f"downsize_u_stream.{i}.conv", u_list[-1], (2, 3), 2))
            ul_list.append(conv(f"downsize_ul_stream.{i}.conv", ul_list[-1], (2, 2), 2, right=True))
    u, ul = u_list.pop(), ul_list.pop()
    for i in range(3):
        for j in range(nr_resnet + (i > 0)):
            u = gated(f"down_layers.{i}.u_stream.{j}", u, False, u_list.pop())
            ul = gated(f"down_layers.{i}.ul_stream.{j}", ul, True, torch.cat([u, ul_list.pop()], 1))
        if i != 2:
            u = deconv(f"upsize_u_stream.{i}.deconv", u, (2, 3), False)
            ul = deconv(f"upsize_ul_stream.{i}.deconv", ul, (2, 2), True)
    return nin("nin_out.lin_a", F.elu(ul)).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- openai, transcribed
class OpenAIModel:
    """openai/pixel-cnn's model_spec (with the enhanced fork's 1-channel output and CoordConv)
    in NHWC. Variables missing from `variables` are created, like tf.get_variable, from `rng`."""

    def __init__(self, variables=None, rng=None, ema=False):
        self.variables = {} if variables is None else variables
        self.rng, self.ema = rng, ema

    def var(self, name, shape, init):
        key = f"model/{name}" + ("/ExponentialMovingAverage" if self.ema else "")
        if key not in self.variables:
            self.variables[key] = init(self.rng, shape).astype(np.float32)
        value = self.variables[key]
        assert value.shape == tuple(shape), key
        return torch.from_numpy(np.asarray(value, np.float64))

    def layer(self, kind, v_shape, out):
        name = f"{kind}_{self.counters.get(kind, 0)}"
        self.counters[kind] = self.counters.get(kind, 0) + 1
        return (self.var(f"{name}/V", v_shape, lambda r, s: r.normal(0, 0.05, s)),
                self.var(f"{name}/g", (out,), lambda r, s: r.uniform(0.5, 1.5, s)),
                self.var(f"{name}/b", (out,), lambda r, s: r.normal(0, 0.1, s)))

    def conv2d(self, x, num_filters, filter_size, stride=1):  # VALID; tf.nn.l2_normalize over [0, 1, 2]
        V, g, b = self.layer("conv2d", (*filter_size, x.shape[-1], num_filters), num_filters)
        W = g * V / torch.sqrt(torch.clamp((V ** 2).sum((0, 1, 2)), min=1e-12))
        kh, kw = filter_size
        rows, cols = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
        return b + sum(x[:, a:a + stride * (rows - 1) + 1:stride, c:c + stride * (cols - 1) + 1:stride] @ W[a, c]
                       for a in range(kh) for c in range(kw))

    def deconv2d(self, x, num_filters, filter_size):  # stride 2, VALID: output (2H + kh - 1, 2W + kw - 1)
        V, g, b = self.layer("deconv2d", (*filter_size, num_filters, x.shape[-1]), num_filters)
        W = g.view(1, 1, -1, 1) * V / torch.sqrt(torch.clamp((V ** 2).sum((0, 1, 3), keepdim=True), min=1e-12))
        kh, kw = filter_size
        batch, height, width, _ = x.shape
        y = torch.zeros(batch, 2 * height + kh - 1, 2 * width + kw - 1, num_filters, dtype=x.dtype)
        for a in range(kh):
            for c in range(kw):
                y[:, a:a + 2 * height:2, c:c + 2 * width:2] += x @ W[a, c].T
        return y + b

    def nin(self, x, num_units):
        V, g, b = self.layer("dense", (x.shape[-1], num_units), num_units)
        return (x @ V) * (g / torch.sqrt((V ** 2).sum(0))) + b

    def down_shifted_conv2d(self, x, nf, filter_size=(2, 3), stride=1):
        return self.conv2d(F.pad(x, (0, 0, (filter_size[1] - 1) // 2, (filter_size[1] - 1) // 2, filter_size[0] - 1, 0)),
                           nf, filter_size, stride)

    def down_right_shifted_conv2d(self, x, nf, filter_size=(2, 2), stride=1):
        return self.conv2d(F.pad(x, (0, 0, filter_size[1] - 1, 0, filter_size[0] - 1, 0)), nf, filter_size, stride)

    def down_shifted_deconv2d(self, x, nf):
        y = self.deconv2d(x, nf, (2, 3))
        return y[:, :y.shape[1] - 1, 1:y.shape[2] - 1]

    def down_right_shifted_deconv2d(self, x, nf):
        y = self.deconv2d(x, nf, (2, 2))
        return y[:, :y.shape[1] - 1, :y.shape[2] - 1]

    def gated_resnet(self, x, conv, a=None):
        nf = x.shape[-1]
        c1 = conv(concat_elu(x, 3), nf)
        if a is not None:
            c1 = c1 + self.nin(concat_elu(a, 3), nf)
        c2 = conv(concat_elu(c1, 3), 2 * nf)
        if self.h is not None:
            name = f"conditional_weights_{self.counters.get('cond', 0)}/hw"
            self.counters["cond"] = self.counters.get("cond", 0) + 1
            c2 = c2 + (self.h @ self.var(name, (self.h.shape[1], 2 * nf), lambda r, s: r.normal(0, 0.05, s)))[:, None, None]
        a, b = c2.chunk(2, -1)
        return x + a * torch.sigmoid(b)

    def __call__(self, x, h=None, nr_resnet=1, nr_filters=8, nr_logistic_mix=2, add_coords=False):
        self.counters, self.h, nf = {}, h, nr_filters
        batch, height, width, channels = x.shape
        if add_coords:  # the fork's AddCoords(x_dim=height, y_dim=width): column / (height-1), row / (width-1)
            cols = torch.arange(width, dtype=x.dtype).view(1, 1, -1, 1).expand(batch, height, width, 1) / (height - 1)
            rows = torch.arange(height, dtype=x.dtype).view(1, -1, 1, 1).expand(batch, height, width, 1) / (width - 1)
            x = torch.cat([x, cols * 2 - 1, rows * 2 - 1], 3)
        x_pad = torch.cat([x, torch.ones(batch, height, width, 1, dtype=x.dtype)], 3)
        down_shift = lambda t: F.pad(t, (0, 0, 0, 0, 1, 0))[:, :-1]  # noqa: E731
        right_shift = lambda t: F.pad(t, (0, 0, 1, 0))[:, :, :-1]  # noqa: E731
        u_list = [down_shift(self.down_shifted_conv2d(x_pad, nf, (2, 3)))]
        ul_list = [down_shift(self.down_shifted_conv2d(x_pad, nf, (1, 3)))
                   + right_shift(self.down_right_shifted_conv2d(x_pad, nf, (2, 1)))]
        for level in range(3):
            for _ in range(nr_resnet):
                u_list.append(self.gated_resnet(u_list[-1], self.down_shifted_conv2d))
                ul_list.append(self.gated_resnet(ul_list[-1], self.down_right_shifted_conv2d, u_list[-1]))
            if level < 2:
                u_list.append(self.down_shifted_conv2d(u_list[-1], nf, stride=2))
                ul_list.append(self.down_right_shifted_conv2d(ul_list[-1], nf, stride=2))
        u, ul = u_list.pop(), ul_list.pop()
        for level in range(3):
            for _ in range(nr_resnet + (level > 0)):
                u = self.gated_resnet(u, self.down_shifted_conv2d, u_list.pop())
                ul = self.gated_resnet(ul, self.down_right_shifted_conv2d, torch.cat([u, ul_list.pop()], 3))
            if level < 2:
                u = self.down_shifted_deconv2d(u, nf)
                ul = self.down_right_shifted_deconv2d(ul, nf)
        return self.nin(F.elu(ul), (3 if channels == 1 else 10) * nr_logistic_mix)


def openai_variables(channels, nr_resnet, nr_filters, nr_logistic_mix, num_classes=None, add_coords=False, seed=0):
    """The variables the original's train.py saves: raw and Polyak-averaged (shadow) weights,
    plus an Adam slot and a step counter that conversion must ignore."""
    raw = OpenAIModel(rng=np.random.RandomState(seed))
    ema = OpenAIModel(rng=np.random.RandomState(seed + 1), ema=True)
    options = dict(nr_resnet=nr_resnet, nr_filters=nr_filters, nr_logistic_mix=nr_logistic_mix, add_coords=add_coords)
    x = torch.zeros(1, 8, 8, channels, dtype=torch.float64)
    h = None if num_classes is None else torch.eye(num_classes, dtype=torch.float64)[:1]
    raw(x, h, **options)
    ema(x, h, **options)
    return {**raw.variables, **ema.variables, "Variable": np.float32(1.0).reshape(()),
            "Variable_1": np.ones(3, np.float32)}


def write_bundle(prefix, tensors):
    """A TensorFlow V2 checkpoint, written as tf.raw_ops.SaveV2 would (one data block, no
    compression, every block and tensor with its masked CRC-32C)."""
    def varint(n):
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    def field(number, wire, payload):
        return varint(number << 3 | wire) + (varint(len(payload)) + payload if wire == 2 else payload)

    def block(records):  # uncompressed (type 0), one restart point at 0, then the trailer
        body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in records) + struct.pack("<II", 0, 1)
        return body, b"\0" + struct.pack("<I", masked_crc32c(body + b"\0"))

    tf_dtype = {np.dtype(v): k for k, v in DTYPES.items()}
    data, records = b"", [(b"", field(1, 0, varint(1)))]  # header: one shard, little-endian
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        shape = b"".join(field(2, 2, field(1, 0, varint(d))) for d in array.shape)
        entry = (field(1, 0, varint(tf_dtype[array.dtype])) + field(2, 2, shape) + field(4, 0, varint(len(data)))
                 + field(5, 0, varint(array.nbytes)) + field(6, 5, struct.pack("<I", masked_crc32c(array.tobytes()))))
        records.append((name.encode(), entry))
        data += array.tobytes()
    blocks, handles = b"", []
    for body, trailer in (block(records), block([])):  # data block, metaindex block
        handles.append(varint(len(blocks)) + varint(len(body)))
        blocks += body + trailer
    index, trailer = block([(records[-1][0], handles[0])])
    footer = (handles[1] + varint(len(blocks)) + varint(len(index))).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(blocks + index + trailer + footer)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)


def compare(params, reference, channels, tolerance):
    for ours, theirs in zip(unpack_fastpixel(params, channels), unpack(reference, channels)):
        if theirs is not None:
            assert (ours.double() - theirs).abs().max() <= tolerance


# --------------------------------------------------------------------------- tests
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("channels", [1, 3])
def test_pclucas14_conversion_matches_its_forward_pass(tmp_path, channels):
    state = {k: v.float() for k, v in pclucas14_state_dict(channels, nr_resnet=1, nr_filters=8, nr_mix=2).items()}
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "m.pth")  # as saved from nn.DataParallel
    x = torch.randint(0, 256, (2, channels, 8, 12)) / 127.5 - 1
    reference = pclucas14_forward({k: v.double() for k, v in state.items()}, x.double(), nr_resnet=1)
    for dtype, tolerance in TOLERANCES.items():
        model = convert.from_pclucas14(tmp_path / "m.pth", image_size=(8, 12), dtype=dtype)
        assert (model.config.channels, model.config.nr_filters, model.config.nr_logistic_mix) == (channels, 8, 2)
        compare(model(x.to(dtype)), reference, channels, tolerance)


def test_pclucas14_reads_the_parametrizations_spelling_of_weight_norm(tmp_path):
    state = pclucas14_state_dict(1, nr_resnet=1, nr_filters=8, nr_mix=2)
    renamed = {k.replace("weight_g", "parametrizations.weight.original0").replace("weight_v", "parametrizations.weight.original1"): v
               for k, v in state.items()}
    torch.save(renamed, tmp_path / "m.pth")
    model = convert.from_pclucas14(tmp_path / "m.pth", image_size=8, dtype=torch.float64)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1
    compare(model(x), pclucas14_forward(state, x, 1), 1, 1e-10)


def mnist_test_images(n):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the real MNIST test set is not here ({SHARED_DATA} is absent)")
    test = load_dataset("mnist", SHARED_DATA, "test", download=False)
    return test.images[:n], test.labels[:n]


@pytest.mark.parametrize("source, scale", [("pclucas14", 1.0), ("openai", 1.0), ("pclucas14", 8.0)])
def test_bits_per_dim_on_mnist_match_the_source_likelihood(tmp_path, source, scale):
    """Equal to 1e-4 bits/dim (1e-9 here) where the original's tiny-bin fallback is rarely
    used; with the output scales pushed up (scale 8) many bins are tiny, and the only
    difference left is that fallback: fastpixel's exact masses match exact masses."""
    images, labels = mnist_test_images(4)
    x = images.double() / 127.5 - 1
    if source == "pclucas14":
        state = pclucas14_state_dict(1, nr_resnet=1, nr_filters=8, nr_mix=2, scale=scale)
        torch.save(state, tmp_path / "m.pth")
        model, labels = convert.from_pclucas14(tmp_path / "m.pth", dtype=torch.float64), None
        reference = pclucas14_forward(state, x, 1)
    else:
        variables = openai_variables(1, 1, 8, 2, num_classes=10)
        write_bundle(tmp_path / "ckpt", variables)
        model = convert.from_openai(tmp_path / "ckpt", dtype=torch.float64)
        h = torch.eye(10, dtype=torch.float64)[labels]
        reference = OpenAIModel(variables, ema=True)(x.permute(0, 2, 3, 1), h, nr_filters=8)
    ours = fastpixel.bits_per_dim(model, images, labels)
    theirs, exact = (float(source_nll(reference, x.permute(0, 2, 3, 1), fallback).sum()) / (images.numel() * np.log(2))
                     for fallback in (True, False))
    assert ours == pytest.approx(exact, abs=1e-9)
    if scale == 1.0:
        assert ours == pytest.approx(theirs, abs=1e-4)
    else:
        assert ours != pytest.approx(theirs, abs=1e-4)  # the fallback is in play, so the test can see it


@pytest.mark.parametrize("channels, num_classes, coords", [(1, None, False), (3, 4, False), (1, 10, True), (3, None, True)])
def test_openai_conversion_matches_its_forward_pass(tmp_path, channels, num_classes, coords):
    variables = openai_variables(channels, 1, 8, 2, num_classes=num_classes, add_coords=coords)
    write_bundle(tmp_path / "params.ckpt", variables)
    x = torch.randint(0, 256, (2, channels, 8, 8)) / 127.5 - 1
    labels = None if num_classes is None else torch.tensor([1, num_classes - 1])
    h = None if labels is None else torch.eye(num_classes, dtype=torch.float64)[labels]
    reference = OpenAIModel(variables, ema=True)(x.double().permute(0, 2, 3, 1), h, nr_filters=8, add_coords=coords)
    for dtype, tolerance in TOLERANCES.items():
        model = convert.from_openai(tmp_path / "params.ckpt.index", image_size=8, dtype=dtype)
        assert (model.config.channels, model.config.num_classes, model.config.coordconv) == (channels, num_classes, coords)
        compare(model(x.to(dtype), labels), reference, channels, tolerance)


@pytest.mark.parametrize("averages", [False, True])
def test_openai_checkpoint_of_only_raw_or_only_averaged_weights_converts(tmp_path, capsys, averages):
    """Without Polyak averages the raw weights are converted, with a notice."""
    variables = {k: v for k, v in openai_variables(1, 1, 8, 2).items() if ("Exponential" in k) == averages}
    write_bundle(tmp_path / "ckpt", variables)
    model = convert.from_openai(tmp_path, image_size=8, dtype=torch.float64)
    assert ("no Polyak-averaged" in capsys.readouterr().err) != averages
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1
    compare(model(x), OpenAIModel(variables, ema=averages)(x.permute(0, 2, 3, 1)), 1, 1e-10)


def test_committed_tensorflow_checkpoint_converts_to_its_recipe():
    """The fixture was written by TensorFlow itself (tests/fixtures/make_openai_checkpoint.py):
    the reader must return exactly the recipe's arrays, and the model must compute from them."""
    expected = openai_variables(**FIXTURE_OPTIONS)
    bundle = TensorBundle(FIXTURE)
    assert set(bundle.shapes) == set(expected)
    assert all(np.array_equal(bundle.get(name), value) for name, value in expected.items())
    model = convert.from_openai(FIXTURE, image_size=8, dtype=torch.float64)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 2])
    reference = OpenAIModel(expected, ema=True)(x.permute(0, 2, 3, 1), torch.eye(3, dtype=torch.float64)[labels], nr_filters=4)
    compare(model(x, labels), reference, 3, 1e-10)


def test_tensorflow_written_checkpoint_converts_like_ours(tmp_path):
    tf = pytest.importorskip("tensorflow")
    variables = openai_variables(3, 1, 8, 2, num_classes=3)
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "tf"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[variables[n] for n in names])
    write_bundle(tmp_path / "ours", variables)
    a, b = (convert.from_openai(tmp_path / p, image_size=8).state_dict() for p in ("tf", "ours"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("source", ["pclucas14", "openai"])
def test_cli_converts_and_the_model_samples(tmp_path, source):
    path = FIXTURE
    if source == "pclucas14":
        path = tmp_path / "m.pth"
        torch.save(pclucas14_state_dict(3, nr_resnet=1, nr_filters=4, nr_mix=2), path)
    out = subprocess.run([sys.executable, "-m", "fastpixel.convert", "--from", source, str(path),
                          str(tmp_path / "m.safetensors"), "--image_size", "8x12"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout
    model = fastpixel.load(tmp_path / "m.safetensors")
    assert model.config.shape == (8, 12) and model.config.nr_filters == 4 and model.config.channels == 3
    labels = None if model.config.num_classes is None else [2]
    assert fastpixel.sample(model, 1, fast=True, seed=0, labels=labels, backend="torch").shape == (1, 3, 8, 12)


@pytest.mark.parametrize("case, message", [
    ("not_torch", "not a PyTorch state_dict"),
    ("whole_model", "holds Python objects besides tensors"),
    ("foreign", "not a pclucas14/pixel-cnn-pp"),
    ("missing", "missing tensor up_layers.0.ul_stream.0.nin_skip.lin_a.weight_g (expected shape (8, 1))"),
    ("wrong_config", "tensor u_init.conv.weight_v has shape (8, 2, 2, 3), expected (16, 2, 2, 3)"),
    ("bigger_model", "tensor down_layers.0.u_stream.1.conv_input.conv.bias (and 98 more) has no place in a model"),
])
def test_pclucas14_errors_name_the_tensor_and_write_nothing(tmp_path, capsys, case, message):
    state = pclucas14_state_dict(1, nr_resnet=2 if case == "bigger_model" else 1, nr_filters=8, nr_mix=2)
    path = tmp_path / "m.pth"
    if case == "not_torch":
        path.write_text("hello")
    elif case == "whole_model":  # torch's own message would advise weights_only=False
        torch.save(torch.nn.Linear(2, 2), path)
    elif case == "foreign":
        torch.save({"fc.weight": torch.zeros(3)}, path)
    else:
        if case == "missing":
            del state["up_layers.0.ul_stream.0.nin_skip.lin_a.weight_g"]
        torch.save(state, path)
    extra = {"wrong_config": ["--nr_filters", "16"], "bigger_model": ["--nr_resnet", "1"]}.get(case, [])
    code = convert.main(["--from", "pclucas14", str(path), str(tmp_path / "out.safetensors"), "--image_size", "8", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "weights_only" not in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("case, message", [
    ("not_a_checkpoint", "no table magic"),
    ("no_pixelcnn", "not a PixelCNN++ checkpoint"),
    ("nonlocal", "fastpixel's non-local block is causally masked"),
    ("missing", "missing tensor model/dense_4/V/ExponentialMovingAverage (expected shape (32, 8))"),
    ("wrong_config", "expected (2, 3, 2, 16)"),
    ("bigger_model", "tensor model/deconv2d_4/V/ExponentialMovingAverage has no place in a model"),
])
def test_openai_errors_name_the_tensor(tmp_path, case, message):
    variables = openai_variables(1, 1, 8, 2)
    if case == "not_a_checkpoint":
        (tmp_path / "ckpt.index").write_bytes(b"\0" * 100)
    else:
        if case == "no_pixelcnn":
            variables = {"dense/kernel": np.zeros((2, 2), np.float32)}
        elif case == "nonlocal":
            variables["model/nonlocal/embA/weights"] = np.zeros((1, 1, 1, 64), np.float32)
        elif case == "missing":
            del variables["model/dense_4/V/ExponentialMovingAverage"]
        elif case == "bigger_model":
            variables["model/deconv2d_4/V/ExponentialMovingAverage"] = np.zeros((2, 2, 8, 8), np.float32)
        write_bundle(tmp_path / "ckpt", variables)
    with pytest.raises(convert.ConvertError, match=re.escape(message)):
        convert.from_openai(tmp_path / "ckpt", image_size=8, nr_filters=16 if case == "wrong_config" else None)


def test_readme_conversion_commands_are_valid():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use a model you already trained", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^python -m fastpixel\.convert (.*)$", section, re.M)
    assert len(commands) == 2
    for command in commands:
        convert.parse_args(shlex.split(command))


def test_converting_onto_the_source_file_is_refused_before_reading_it(tmp_path, capsys):
    path = tmp_path / "m.pth"
    torch.save(pclucas14_state_dict(1, nr_resnet=1, nr_filters=4, nr_mix=2), path)
    before = path.read_bytes()
    assert convert.main(["--from", "pclucas14", str(path), str(path)]) == 2
    assert "is the checkpoint being converted" in capsys.readouterr().err and path.read_bytes() == before


def test_crc32c_matches_its_bitwise_reference_and_the_standard_check_value():
    assert crc32c(b"123456789") == crc32c_reference(b"123456789") == 0xE3069283  # CRC-32C's published check value
    rng = np.random.default_rng()
    for size in [*range(12), 63, 64, 65, 1000, 4099, 20001]:  # lanes that do and do not divide the words
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_reference(data), size


def flip_bit(path, offset, bit=0):
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 1 << bit
    Path(path).write_bytes(bytes(data))


def copied_fixture(folder):
    """The TensorFlow-written checkpoint, copied where a test may damage it: its checksums are
    TensorFlow's own, so the reader is checked against the real format, not against itself."""
    for suffix in (".index", ".data-00000-of-00001"):
        Path(f"{folder / FIXTURE.name}{suffix}").write_bytes(Path(f"{FIXTURE}{suffix}").read_bytes())
    return folder / FIXTURE.name


def test_a_flipped_bit_in_a_tensor_is_refused_naming_it(tmp_path, capsys):
    prefix = copied_fixture(tmp_path)
    name = "model/conv2d_2/V/ExponentialMovingAverage"
    entry = TensorBundle(prefix).entries[name]
    flip_bit(f"{prefix}.data-00000-of-00001", entry.offset + entry.size - 2)  # float32 exponent's low bit: x2 or /2
    code = convert.main(["--from", "openai", str(prefix), str(tmp_path / "out.safetensors"), "--image_size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "out.safetensors").exists()
    assert f"tensor {name} do not match their CRC-32C checksum" in err and "data-00000-of-00001" in err


def test_a_flipped_bit_in_the_index_is_refused(tmp_path):
    prefix = copied_fixture(tmp_path)
    key = b"model/conditional_weights_0/hw"  # the first key of its block, written whole: it becomes .../hv
    flip_bit(f"{prefix}.index", Path(f"{prefix}.index").read_bytes().index(key) + len(key) - 1)
    with pytest.raises(convert.ConvertError, match=r"\.index is corrupt: a block of its table does not match its CRC-32C"):
        convert.from_openai(prefix, image_size=8)


@pytest.mark.parametrize("source", ["openai", "pclucas14"])
@pytest.mark.parametrize("damage, message", [(np.nan, "holds NaN or infinite values"), (np.inf, "holds NaN or infinite values"),
                                             ("int32", "is torch.int32, expected floating point")])
def test_nonfinite_or_integer_weights_are_refused_naming_the_tensor(tmp_path, capsys, source, damage, message):
    """Not written into a file that fastpixel.load would then refuse."""
    if source == "openai":
        tensors, name, path = openai_variables(1, 1, 8, 2), "model/conv2d_2/V/ExponentialMovingAverage", tmp_path / "ckpt"
    else:
        tensors, name, path = pclucas14_state_dict(1, 1, 8, 2), "up_layers.0.u_stream.0.conv_out.conv.weight_v", tmp_path / "m.pth"
    tensor = tensors[name]
    if damage == "int32":
        tensors[name] = tensor.astype(np.int32) if source == "openai" else tensor.to(torch.int32)
    else:
        tensor[(0,) * tensor.ndim] = damage
    write_bundle(path, tensors) if source == "openai" else torch.save(tensors, path)
    code = convert.main(["--from", source, str(path), str(tmp_path / "out.safetensors"), "--image_size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and f"tensor {name} {message}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("damage", ["zero_v", "beyond_float32"])
def test_weights_that_convert_to_nonfinite_values_are_refused(tmp_path, damage):
    """Finite source weights can still convert to NaN (an all-zero V of a weight-normalised
    output channel) or overflow float32: refused, naming the fastpixel tensor."""
    state = pclucas14_state_dict(1, nr_resnet=1, nr_filters=8, nr_mix=2)
    if damage == "zero_v":
        state["u_init.conv.weight_v"][3] = 0
    else:
        state["u_init.conv.weight_g"][3] = 1e39
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(convert.ConvertError, match=r"converted tensor u_init\.v holds NaN or infinite values in torch\.float32"):
        convert.from_pclucas14(tmp_path / "m.pth", image_size=8)


@pytest.mark.parametrize("damage, message", [
    ("empty_data", "is truncated: tensor model/conv2d_0/V/ExponentialMovingAverage needs bytes"),
    ("truncated_data", "is truncated: tensor"),
    ("empty_index", "no table magic"),
    ("truncated_index", "no table magic"),
])
def test_truncated_or_empty_checkpoint_files_are_one_line_errors(tmp_path, capsys, damage, message):
    prefix = tmp_path / "ckpt"
    write_bundle(prefix, openai_variables(1, 1, 8, 2))
    path = Path(f"{prefix}.{'index' if damage.endswith('index') else 'data-00000-of-00001'}")
    path.write_bytes(b"" if damage.startswith("empty") else path.read_bytes()[:path.stat().st_size // 2])
    code = convert.main(["--from", "openai", str(prefix), str(tmp_path / "out.safetensors"), "--image_size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_an_image_size_no_sampler_can_draw_is_refused(tmp_path, capsys):
    torch.save(pclucas14_state_dict(1, nr_resnet=1, nr_filters=4, nr_mix=2), tmp_path / "m.pth")
    code = convert.main(["--from", "pclucas14", str(tmp_path / "m.pth"), str(tmp_path / "out.safetensors"),
                         "--image_size", "1000000000"])
    err = capsys.readouterr().err
    assert code == 2 and "image_size 1000000000" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()
