"""The masked families (PixelCNN, Gated PixelCNN): masks, the causal invariant through
autograd, the categorical likelihood and sampler against exact references, the cached
sampler against the naive one, and files."""
import itertools
import os
import shutil

import pytest
import torch

import fastpixel
from fastpixel.models.masked import categorical
from fastpixel.io.checkpoint import CheckpointError
from fastpixel.models.masked.family import MaskedConv2d, groups
from fastpixel.sampling import image_noise
from fastpixel.sampling.engines import CACHES, cached_rows
from tests.conftest import torch_threads

FAMILIES = {"pixelcnn": (fastpixel.PixelCNNConfig, fastpixel.PixelCNN),
            "gated": (fastpixel.GatedConfig, fastpixel.GatedPixelCNN)}
OPTIONS = {  # every option the tests cover, on small shapes
    "grey-4": dict(channels=1, color_levels=4),
    "rgb-4-labels": dict(channels=3, color_levels=4, num_classes=3),
    "grey-256": dict(channels=1, color_levels=256),
    "rgb-2": dict(channels=3, color_levels=2),
    "codes-300-labels": dict(channels=1, color_levels=300, categorical_inputs=True, num_classes=2),
}


def tiny(family: str, dtype=torch.float64, **options):
    """A small model of `family` in eval mode with weights large enough that every path matters."""
    config_class, model_class = FAMILIES[family]
    sizes = dict(image_size=(5, 6), hidden_fmaps=6, out_hidden_fmaps=6, hidden_layers=2, causal_ksize=3, hidden_ksize=3)
    model = model_class(config_class(**{**sizes, **options})).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model


def canvas(model, n: int, generator=None) -> torch.Tensor:
    """Random inputs: grid values (n, C, H, W), or codes (n, H, W)."""
    cfg = model.config
    if cfg.categorical_inputs:
        return torch.randint(0, cfg.color_levels, (n, *cfg.shape), generator=generator)
    u8 = torch.randint(0, 256, (n, cfg.channels, *cfg.shape), generator=generator)
    return (u8 / 127.5 - 1).to(next(model.parameters()).dtype)


def labels_for(model, n: int):
    return None if model.config.num_classes is None else torch.arange(n) % model.config.num_classes


# ------------------------------------------------------------------------------------ masks
def full_kernel(conv: MaskedConv2d, out_channel: int, in_channel: int) -> torch.Tensor:
    """The mask of one input/output pair as a k x k picture centred on the output (rows
    below the centre, which the layer does not store, shown as zeros)."""
    kh, kw = conv.kernel
    picture = torch.zeros(kw, kw)
    picture[:kh] = conv.mask[out_channel, in_channel]
    return picture


def picture(rows: str) -> torch.Tensor:
    return torch.tensor([[float(ch) for ch in row] for row in rows.split()])


@pytest.mark.parametrize("kind, centre", [("A", "0"), ("B", "1")])
def test_masks_3x3_and_7x7_grey(kind, centre):
    three = MaskedConv2d(groups(1, 1), groups(1, 1), (2, 3), 1, kind)
    assert torch.equal(full_kernel(three, 0, 0), picture(f"111 1{centre}0 000"))
    seven = MaskedConv2d(groups(1, 1), groups(1, 1), (4, 7), 3, kind)
    expected = picture(f"1111111 1111111 1111111 111{centre}000 0000000 0000000 0000000")
    assert torch.equal(full_kernel(seven, 0, 0), expected)


RGB_PICTURES = {3: "111 1{}0 000", 7: "1111111 1111111 1111111 111{}000 0000000 0000000 0000000"}


@pytest.mark.parametrize("kind", ["A", "B"])
@pytest.mark.parametrize("ksize", [3, 7])
def test_rgb_masks_order_the_colours_at_the_centre_only(kind, ksize):
    """Features split in three groups (R, G, B): at the centre, output group g reads groups
    before g (A) or up to g (B); everywhere before the centre it reads them all."""
    conv = MaskedConv2d(groups(6, 3), groups(9, 3), (ksize // 2 + 1, ksize), ksize // 2, kind)  # 2 per colour in, 3 out
    reads = {"A": ["000", "100", "110"], "B": ["100", "110", "111"]}[kind]
    for out_channel, in_channel in itertools.product(range(9), range(6)):
        g_out, g_in = out_channel // 3, in_channel // 2
        centre = reads[g_out][g_in]
        assert torch.equal(full_kernel(conv, out_channel, in_channel), picture(RGB_PICTURES[ksize].format(centre)))


def test_image_channels_are_one_group_each():
    """The first layer of an RGB model reads the image's R, G, B as groups 0, 1, 2 (mask A)."""
    conv = MaskedConv2d(groups(3, 3), groups(6, 3), (2, 3), 1, "A")
    centre = conv.mask[:, :, 1, 1]
    assert torch.equal(centre, torch.tensor([[0, 0, 0]] * 2 + [[1, 0, 0]] * 2 + [[1, 1, 0]] * 2).float())


# ------------------------------------------------------------------------------------ causality
def input_gradient(model, x, labels, r, c, channel) -> torch.Tensor:
    """d(sum of the logits of sub-pixel (r, c, channel)) / d(first layer's input), (Cin, H, W)."""
    features = {}

    def leaf(module, inputs, output):
        features["x"] = output.detach().requires_grad_()
        return features["x"]

    handle = model.inputs.register_forward_hook(leaf)
    try:
        model(x, labels)[0, channel, :, r, c].sum().backward()
    finally:
        handle.remove()
    return features["x"].grad[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("option", ["grey-4", "rgb-4-labels", "codes-300-labels"])
def test_causal_invariant_through_autograd(family, option):
    """The logits of sub-pixel (p, c) have zero gradient with respect to every later
    sub-pixel, and to colours >= c of p itself (for codes, each pixel is one sub-pixel)."""
    model = tiny(family, **OPTIONS[option])
    cfg = model.config
    x, labels = canvas(model, 1), labels_for(model, 1)
    feature_colour = groups(cfg.input_channels, cfg.channels)
    height, width = cfg.shape
    for r, c, channel in itertools.product(range(height), range(width), range(cfg.channels)):
        grad = input_gradient(model, x, labels, r, c, channel).abs()
        for rr, cc in itertools.product(range(height), range(width)):
            allowed_colours = cfg.channels if (rr, cc) < (r, c) else (channel if (rr, cc) == (r, c) else 0)
            assert (grad[feature_colour >= allowed_colours, rr, cc] == 0).all(), (r, c, channel, rr, cc)


def test_gated_pixelcnn_has_no_blind_spot_and_pixelcnn_has_one():
    """The gated family sees the pixel above and to the right (through the vertical stack);
    plain masked convolutions leave that pixel out of a pixel's view two rows further down."""
    gated, masked = tiny("gated", **OPTIONS["grey-4"]), tiny("pixelcnn", **OPTIONS["grey-4"])
    x = canvas(gated, 1)
    reach = lambda model: input_gradient(model, x, None, 2, 1, 0)[0].abs()  # noqa: E731
    # Every pixel of the rows above within the filters' reach (three columns either side), and the left.
    assert (reach(gated)[:2, :5] > 0).all() and (reach(gated)[2, :1] > 0).all()
    assert reach(masked)[0, 4] == 0  # two rows up, three columns right: the blind spot


# ------------------------------------------------------------------------------------ likelihood
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("option", ["rgb-4-labels", "grey-256"])
def test_likelihood_of_one_pixel_sums_to_one(family, option):
    """With the other pixels fixed, exp(-nll) summed over all N^C values of one pixel is 1."""
    model = tiny(family, **OPTIONS[option])
    cfg = model.config
    x = canvas(model, 1)
    r, c = 2, 3
    values = torch.tensor(list(itertools.product(range(cfg.color_levels), repeat=cfg.channels)))  # (N^C, C)
    batch = x.repeat(len(values), 1, 1, 1)
    batch[:, :, r, c] = categorical.grid_values(values, cfg.color_levels, batch.dtype)
    labels = None if cfg.num_classes is None else torch.zeros(len(values), dtype=torch.long)
    with torch.no_grad():
        log_probs = -torch.nn.functional.cross_entropy(model(batch, labels).transpose(1, 2), model.levels(batch),
                                                       reduction="none")  # (N^C, C, H, W)
    total = log_probs[:, :, r, c].sum(1).exp().sum()
    assert abs(float(total) - 1) < 1e-10


def test_levels_round_trip_the_grid():
    u8 = torch.arange(256)
    for n in (2, 4, 256):
        level = categorical.levels(u8 / 127.5 - 1, n)
        assert level.min() == 0 and level.max() == n - 1 and (level.diff() >= 0).all()
        back = torch.round((categorical.grid_values(level, n, torch.float64) + 1) * 127.5)
        assert torch.equal(categorical.levels(back / 127.5 - 1, n), level)  # a drawn level reads back as itself
    assert torch.equal(categorical.levels(u8 / 127.5 - 1, 256), u8)


def test_draw_follows_the_exact_pmf():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, -3.0]], dtype=torch.float64)
    n = 200_000
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64)
    levels = categorical.draw(logits.expand(n, -1), uniforms)
    counts = torch.bincount(levels, minlength=5).double()
    p = torch.softmax(logits[0], 0)
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() < 5 * sigma).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_pixels_follow_the_models_joint_pmf(family):
    """A 1x1 RGB image of 2 levels has 8 values; their frequencies over many cached draws
    match the model's exact joint probabilities."""
    model = tiny(family, image_size=1, channels=3, color_levels=2)
    values = torch.tensor(list(itertools.product(range(2), repeat=3)))
    x = categorical.grid_values(values, 2, torch.float64)[:, :, None, None]
    with torch.no_grad():
        log_probs = -model.nll(model(x), x)
    pmf = log_probs.exp()
    assert abs(float(pmf.sum()) - 1) < 1e-12
    n = 6000
    images = fastpixel.sample(model, n, fast=True, seed=3)
    index = (images[:, :, 0, 0] // 255).long() @ torch.tensor([4, 2, 1])
    counts = torch.bincount(index, minlength=8).double()
    sigma = (n * pmf * (1 - pmf)).sqrt()
    assert ((counts - n * pmf).abs() < 5 * sigma + 1).all()


# ------------------------------------------------------------------------------------ cached = naive
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
BACKENDS = ["torch", pytest.param("cext", marks=pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler"))]


def run_cached(model, n, seed, backend):
    """Images from the cached sampler run by `backend`, and the largest difference between
    its logits at every sub-step and a forward pass (causal: a sub-pixel's logits depend only
    on the final values before it, so one pass over the final images gives them all)."""
    cfg = model.config
    labels = labels_for(model, n)
    noise = torch.stack([image_noise(cfg, seed, i) for i in range(n)])
    dtype = torch.int64 if cfg.categorical_inputs else next(model.parameters()).dtype
    x = torch.zeros(n, cfg.channels, *cfg.shape, dtype=dtype)
    seen = torch.zeros(n, cfg.channels, cfg.color_levels, *cfg.shape, dtype=next(model.parameters()).dtype)

    def keep(i, j, logits):
        seen[..., i, j] = logits

    for _ in cached_rows(model, x, noise, labels, engine=backend, on_step=keep):
        pass
    with torch.no_grad():
        full = model(x[:, 0] if cfg.categorical_inputs else x, labels)
    return x, float((seen - full).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("option", OPTIONS)
def test_cached_steps_equal_a_forward_pass_and_images_equal_naive_float64(family, option, backend):
    model = tiny(family, **OPTIONS[option])
    x, difference = run_cached(model, 3, 5, backend)
    assert difference <= 1e-10
    labels = labels_for(model, 3)
    naive = fastpixel.sample(model, 3, fast=False, seed=5, labels=labels)
    fast = fastpixel.sample(model, 3, fast=True, seed=5, labels=labels, backend=backend)
    assert torch.equal(fast, naive)
    drawn = x[:, 0] if model.config.categorical_inputs else fastpixel.sampling.to_uint8(x)
    assert torch.equal(fast, drawn)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("family", FAMILIES)
def test_cext_shares_a_batch_among_threads_with_one_threads_images(family):
    """Nine images on two threads, wide enough layers that every pixel is shared: each thread
    runs a pixel's products and draws on its own images (csrc/step.cpp `run`); the images
    equal one thread's, and so does the logits' largest difference from a forward pass."""
    model = tiny(family, **OPTIONS["rgb-4-labels"], hidden_fmaps=120, out_hidden_fmaps=120)
    with torch_threads(1):
        x_one, difference_one = run_cached(model, 9, 6, "cext")
    with torch_threads(2):
        x_two, difference_two = run_cached(model, 9, 6, "cext")
    assert torch.equal(x_two, x_one) and difference_two == difference_one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("option", ["rgb-4-labels", "grey-256", "codes-300-labels"])
def test_cached_sampling_float32(family, option, backend):
    """float32: every step within 1e-4 of a forward pass; images equal the naive sampler's,
    except where a uniform lies within rounding of a CDF edge."""
    model = tiny(family, dtype=torch.float32, **OPTIONS[option])
    _, difference = run_cached(model, 2, 1, backend)
    assert difference <= 1e-4
    labels = labels_for(model, 4)
    fast = fastpixel.sample(model, 4, fast=True, seed=2, labels=labels, backend=backend)
    naive = fastpixel.sample(model, 4, fast=False, seed=2, labels=labels)
    for i in (fast != naive).flatten(1).any(1).nonzero().flatten().tolist():
        _assert_first_difference_on_an_edge(model, 2, i, fast[i], naive[i], labels)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
@pytest.mark.parametrize("family", FAMILIES)
def test_cext_is_the_default_on_the_cpu_and_runs_no_pytorch_operator_per_pixel(family):
    """The automatic choice is the engine, and a draw's PyTorch operators (per sampler and
    per row) do not grow with the row's width: no pixel runs one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    def operators(width):
        model = tiny(family, image_size=(3, width), **OPTIONS["rgb-4-labels"])
        noise = torch.rand(2, 3, 3, width, dtype=torch.float64)
        labels = labels_for(model, 2)
        Count.calls = 0
        with Count():
            for _ in cached_rows(model, torch.zeros(2, 3, 3, width, dtype=torch.float64), noise, labels, engine="cext"):
                pass
        return Count.calls

    for dtype in (torch.float32, torch.float64):
        assert fastpixel.sampling.resolve_backend("cpu", True, None, dtype, family) == "cext"
    assert fastpixel.sampling.resolve_backend("cpu", True, "torch", torch.float64, family) == "torch"
    assert fastpixel.sampling.resolve_backend("cpu", True, None, torch.bfloat16, family) == "torch"
    assert operators(4) == operators(12)


def _assert_first_difference_on_an_edge(model, seed, i, image, reference, labels):
    cfg = model.config
    image, reference = image.reshape(cfg.channels, *cfg.shape), reference.reshape(cfg.channels, *cfg.shape)
    first = (image != reference).permute(1, 2, 0).flatten().nonzero()[0].item()
    (r, c), channel = divmod(first // cfg.channels, cfg.shape[1]), first % cfg.channels
    x = reference[None].clone() if cfg.categorical_inputs else (reference[None].double() / 127.5 - 1).float()
    with torch.no_grad():
        logits = model(x[:, 0] if cfg.categorical_inputs else x, None if labels is None else labels[i:i + 1])
    cdf = torch.softmax(logits[0, channel, :, r, c].double(), 0).cumsum(0)
    u = image_noise(cfg, seed, i)[channel, r, c]
    assert float((cdf - u).abs().min()) < 1e-5


def state_size(value, seen=None) -> int:
    """Elements of every tensor a cached sampler holds, however deep."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(value, torch.nn.Module):
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(state_size(v, seen) for v in value)
    return sum(state_size(v, seen) for v in vars(value).values()) if hasattr(value, "__dict__") else 0


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_grows_with_the_width_not_the_area(family):
    size = lambda shape: state_size(CACHES[family](tiny(family, image_size=shape), 2, None))  # noqa: E731
    assert size((5, 6)) == size((40, 6)) < size((5, 12))


# ------------------------------------------------------------------------------------ configs and files
@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_json_and_refuses_bad_values(family):
    config_class, _ = FAMILIES[family]
    config = config_class(image_size=(7, 9), channels=3, color_levels=16, num_classes=4, hidden_fmaps=12,
                          out_hidden_fmaps=9)
    assert config_class.from_json(config.to_json()) == config
    for bad, message in [(dict(channels=3, hidden_fmaps=10), "divisible by 3"), (dict(color_levels=257), "color_levels"),
                         (dict(color_levels=1), "color_levels"), (dict(causal_ksize=4), "odd"),
                         (dict(categorical_inputs=True, channels=3, hidden_fmaps=12, out_hidden_fmaps=9), "channels must be 1"),
                         (dict(categorical_inputs=True, color_levels=5000), "4096"), (dict(hidden_layers=0), "positive")]:
        with pytest.raises(ValueError, match=message):
            config_class(**bad)
    assert config_class(categorical_inputs=True, color_levels=4096).color_levels == 4096


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_and_family_refusals(family, tmp_path):
    model = tiny(family, dtype=torch.float32, **OPTIONS["rgb-4-labels"])
    path = fastpixel.save(model, tmp_path / "m.safetensors")
    loaded = fastpixel.load(path, family=family)
    assert type(loaded) is type(model) and loaded.config == model.config
    x = canvas(model, 2)
    assert torch.equal(loaded(x, labels_for(model, 2)), model(x, labels_for(model, 2)))
    other = "gated" if family == "pixelcnn" else "pixelcnn"
    with pytest.raises(CheckpointError, match="model is required here"):
        fastpixel.load(path, family=other)
    with pytest.raises(CheckpointError, match="PixelCNN\\+\\+ model is required"):
        fastpixel.load(path, family="pixelcnnpp")
    with pytest.raises(CheckpointError, match="holds a PixelCNN\\+\\+ model"):
        fastpixel.load("mnist", family=family)


def test_bad_inputs_are_clear_errors():
    model = tiny("gated", **OPTIONS["codes-300-labels"])
    with pytest.raises(ValueError, match="integer codes"):
        model(torch.zeros(1, 5, 6), torch.tensor([0]))
    with pytest.raises(ValueError, match="codes from"):
        model(torch.full((1, 5, 6), 300), torch.tensor([0]))
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.zeros(1, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="serves PixelCNN\\+\\+ models only"):
        fastpixel.sample(model, 1, fast=True, backend="triton")
    rgb = tiny("pixelcnn", **OPTIONS["rgb-2"])
    with pytest.raises(ValueError, match="floating-point"):
        rgb(torch.zeros(1, 1, 5, 6))


def test_codes_are_sampled_and_scored_as_codes():
    model = tiny("gated", **OPTIONS["codes-300-labels"])
    codes = fastpixel.sample(model, 3, fast=True, seed=0)
    assert codes.shape == (3, 5, 6) and codes.dtype == torch.int64 and int(codes.max()) < 300
    bpd = fastpixel.bits_per_dim(model, codes, labels=labels_for(model, 3))
    with torch.no_grad():
        expected = float(model.nll(model(codes, labels_for(model, 3)), codes).sum()) / (codes.numel() * 0.6931471805599453)
    assert abs(bpd - expected) < 1e-9


@pytest.mark.parametrize("family", [fastpixel.GatedPixelCNN, fastpixel.PixelCNN])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_defaults_hold_for_every_channel_count(family, channels):
    """An RGB Gated PixelCNN with its defaults used to fail (10 output features, not divisible by 3)."""
    config = family.config_class(image_size=4, channels=channels)
    assert config.out_hidden_fmaps % channels == 0 and family.config_class.from_json(config.to_json()) == config
    assert fastpixel.sample(family(config), 1, seed=0).shape == (1, channels, 4, 4)
