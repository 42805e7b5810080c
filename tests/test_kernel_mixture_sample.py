"""kernels/mixture_sample.py against `fastpixel.mixture.sample`, on random inputs with the edge
cases that matter (Triton's interpreter on the CPU; the real device where there is one)."""
import math

import pytest
import torch

from fastpixel.mixture import num_params, snap_to_grid
from tests.conftest import DEVICE

mixture_sample = pytest.importorskip("fastpixel.kernels.mixture_sample")

EDGE_UNIFORMS = [0.0, 5e-324, 1e-300, 1e-30, 0.5, 1 - 1e-12, 1 - 2 ** -53, 1.0]


def random_inputs(batch: int, nr_mix: int, channels: int, dtype: torch.dtype, seed: int = 0):
    """params (B, P) in `dtype` and noise (B, K + C) float64, with extreme logits, log-scales
    below the clamp at -7, exact ties between components, and uniforms at or near 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    k, ck = nr_mix, channels * nr_mix
    params = torch.randn(batch, num_params(channels, nr_mix), generator=g, dtype=torch.float64)
    params[:, :k] *= 3
    params[:, k + ck:k + 2 * ck] = torch.rand(batch, ck, generator=g, dtype=torch.float64) * 8 - 9  # a quarter clamped
    params[:, k + 2 * ck:] *= 2  # coupling coefficients, before tanh
    noise = torch.rand(batch, k + channels, generator=g, dtype=torch.float64)
    edges = torch.rand(noise.shape, generator=g) < 0.05
    picks = torch.randint(len(EDGE_UNIFORMS), noise.shape, generator=g)
    noise[edges] = torch.tensor(EDGE_UNIFORMS, dtype=torch.float64)[picks[edges]]
    rows = torch.randperm(batch, generator=g)
    if batch >= 3:
        params[rows[0], :k] = torch.linspace(-1e4, 1e4, k, dtype=torch.float64)  # one dominant logit
        params[rows[1], :k] = 0.5  # exact ties: argmax takes the first
        noise[rows[1], :k] = 0.25
        params[rows[2], k + ck:k + 2 * ck] = -30.0  # far below the clamp
    return params.to(dtype).to(DEVICE), noise.to(DEVICE)


def expected_and_got(batch, nr_mix, channels, dtype, seed=0):
    params, noise = random_inputs(batch, nr_mix, channels, dtype, seed)
    return params, noise, mixture_sample.reference(params, noise, channels), mixture_sample.sample(params, noise, channels)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch, nr_mix", [(1, 1), (3, 2), (5, 5), (37, 10)])
def test_sample_equals_mixture_sample_exactly_in_float64(batch, nr_mix, channels):
    _, _, expected, got = expected_and_got(batch, nr_mix, channels, torch.float64, seed=batch)
    assert got.dtype == torch.float64 and got.shape == (batch, channels)
    assert torch.equal(got, expected)


def test_sample_equals_mixture_sample_exactly_in_float64_on_many_rows():
    for channels in (1, 3):
        _, _, expected, got = expected_and_got(1000, 10, channels, torch.float64, seed=channels)
        assert torch.equal(got, expected)


def _unexplained(params, noise, channels, got, expected):
    """Rows of a float32 mismatch that are not a draw within a few float32 ulps of a bin edge
    (or of a tie between components), judged from the pre-snap values in float64."""
    eps = 16 * 2.0 ** -24  # a few float32 ulps, relative
    p, u = params.double().cpu(), noise.cpu().clamp(min=torch.finfo(torch.float64).tiny, max=1 - 2 ** -53)
    expected, got = expected.double().cpu(), got.double().cpu()
    k = u.shape[1] - channels
    v = p[:, :k] + -torch.log(-torch.log(u[:, :k]))
    top2 = v.topk(min(2, k), dim=1).values
    near_tie = (top2[:, 0] - top2[:, -1] <= eps * top2.abs().max(dim=1).values) if k > 1 else torch.zeros(len(v), dtype=torch.bool)
    comp = v.argmax(dim=1, keepdim=True)
    pick = lambda block: block.unflatten(1, (-1, k)).gather(2, comp[:, None].expand(-1, block.shape[1] // k, 1))[..., 0]
    means = pick(p[:, k:k + channels * k])
    scales = pick(p[:, k + channels * k:k + 2 * channels * k]).clamp(min=-7).exp()
    coeffs = torch.tanh(pick(p[:, k + 2 * channels * k:])) if channels == 3 else None
    logistic = torch.log(u[:, k:]) - torch.log1p(-u[:, k:])
    bad = []
    for row in torch.nonzero((got != expected).any(dim=1)).flatten().tolist():
        c = int(torch.nonzero(got[row] != expected[row])[0])  # channels before c agree
        x = expected[row]
        terms = [means[row, c], scales[row, c] * logistic[row, c]]
        if c >= 1:
            terms.append(coeffs[row, c - 1 if c == 1 else 1] * x[0])
        if c == 2:
            terms.append(coeffs[row, 2] * x[1])
        y = (sum(terms) + 1) * 127.5  # in grid units: bin edges are at k + 1/2
        tolerance = eps * 127.5 * (1 + sum(abs(t) for t in terms))
        if not (near_tie[row] or abs(y - math.floor(y) - 0.5) <= tolerance):
            bad.append((row, c, float(y)))
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels, nr_mix", [(1, 5), (3, 10)])
def test_float32_draws_differ_only_rarely_and_at_bin_edges(channels, nr_mix, dtype):
    params, noise, expected, got = expected_and_got(2000, nr_mix, channels, dtype, seed=7)
    assert got.dtype == expected.dtype == torch.float32
    assert _unexplained(params, noise, channels, got, expected) == []
    assert (got != expected).any(dim=1).double().mean() <= 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draws_exactly_half_way_between_levels_round_to_even(dtype):
    # Means whose (mean + 1) * 127.5 is exactly m + 1/2 in `dtype`, drawn with logistic 0 (u = 1/2).
    m = torch.arange(-1, 255, dtype=torch.float64)  # not 255.5: it rounds to 256, clamped to the odd 255
    candidates = ((m + 0.5) / 127.5 - 1).to(dtype)
    candidates = torch.cat([candidates, torch.nextafter(candidates, candidates + 1), torch.nextafter(candidates, candidates - 1)])
    z = (candidates + 1) * 127.5
    means = candidates[z - z.floor() == 0.5]
    assert len(means) > 100
    params = torch.stack([torch.zeros_like(means), means, torch.full_like(means, -20.0)], dim=1).to(DEVICE)
    noise = torch.tensor([[0.3, 0.5]], dtype=torch.float64, device=DEVICE).expand(len(means), 2).contiguous()
    got = mixture_sample.sample(params, noise, 1)
    assert torch.equal(got, mixture_sample.reference(params, noise, 1))
    assert torch.equal(torch.round((got + 1) * 127.5) % 2, torch.zeros_like(got))  # the even level, every time


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blue_mean_is_summed_in_the_reference_order(dtype):
    # Blue draws next to a half level, where (mean + beta * x0) + gamma * x1 and
    # mean + (beta * x0 + gamma * x1) round to different levels. Every other value is exact
    # on any backend: logistic draws 0 (u = 1/2), alpha = tanh(0) = 0, beta and gamma = tanh(+-30) = +-1.
    g = torch.Generator().manual_seed(0)
    level = lambda: snap_to_grid(torch.rand(1000, generator=g, dtype=torch.float64).to(dtype) * 2 - 1).repeat(3)
    x0, x1, half_level = level(), level(), level() + 1 / 255
    raw = (torch.randint(0, 2, (2, 1000), generator=g) * 60 - 30).to(dtype).repeat(1, 3)
    beta, gamma = torch.tanh(raw)
    mean = (half_level - (beta * x0 + gamma * x1)).unflatten(0, (3, -1))
    mean = torch.cat([mean[0], torch.nextafter(mean[1], mean[1] + 1), torch.nextafter(mean[2], mean[2] - 1)])
    differ = snap_to_grid((mean + beta * x0) + gamma * x1) != snap_to_grid(mean + (beta * x0 + gamma * x1))
    rows = int(differ.sum())
    assert rows >= 10
    zeros, low = torch.zeros(rows, dtype=dtype), torch.full((rows,), -7.0, dtype=dtype)
    params = torch.stack([zeros, x0[differ], x1[differ], mean[differ], low, low, low, zeros, *raw[:, differ]], dim=1)
    noise = torch.full((rows, 4), 0.5, dtype=torch.float64)
    params, noise = params.to(DEVICE), noise.to(DEVICE)
    assert torch.equal(mixture_sample.sample(params, noise, 3), mixture_sample.reference(params, noise, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_logit_is_chosen_as_torch_argmax_chooses_it(dtype):
    params, noise = random_inputs(4, 3, 3, dtype)
    params[:, 1] = float("nan")
    params[0, 2] = float("nan")
    assert torch.equal(mixture_sample.sample(params, noise, 3), mixture_sample.reference(params, noise, 3))


@pytest.mark.parametrize("position_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("params_dtype, out_dtype, image_dtype",
                         [(torch.float64, torch.float64, torch.float32), (torch.bfloat16, torch.float32, torch.bfloat16)])
def test_sample_pixel_reads_noise_at_position_and_writes_image_there_only(position_dtype, params_dtype, out_dtype,
                                                                          image_dtype):
    batch, nr_mix, channels, height, width, p = 5, 2, 3, 3, 4, 7
    params, _ = random_inputs(batch, nr_mix, channels, params_dtype)
    noise = torch.rand(batch, nr_mix + channels, height, width, dtype=torch.float64, device=DEVICE).flatten(2)
    image = torch.randn(batch, channels, height * width, device=DEVICE).to(image_dtype)
    before = image.clone()
    out = torch.full((batch, channels), 7.0, dtype=out_dtype, device=DEVICE)
    position = torch.tensor([p], dtype=position_dtype, device=DEVICE)
    mixture_sample.sample_pixel(params, noise, position, channels, out, image)
    expected = mixture_sample.reference(params, noise[:, :, p], channels)
    assert torch.equal(out, expected.to(out_dtype))
    assert torch.equal(image[:, :, p], expected.to(image_dtype))
    before[:, :, p] = image[:, :, p]
    assert torch.equal(image, before)
    mixture_sample.sample_pixel(params, noise, position.fill_(0), channels, out)  # no image: out alone
    assert torch.equal(out, mixture_sample.reference(params, noise[:, :, 0], channels).to(out_dtype))


def test_launcher_says_what_it_expected():
    batch, nr_mix, channels, pixels = 3, 2, 3, 6
    params, _ = random_inputs(batch, nr_mix, channels, torch.float32)
    noise = torch.rand(batch, nr_mix + channels, pixels, dtype=torch.float64, device=DEVICE)
    position = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    out = torch.empty(batch, channels, device=DEVICE)
    image = torch.empty(batch, channels, pixels, device=DEVICE)
    good = dict(params=params, noise=noise, position=position, channels=channels, out=out, image=image)
    mixture_sample.sample_pixel(**good)
    wrong = [
        ("channels", 2, "channels must be 1 or 3"),
        ("params", params[:, :-1].contiguous(), "multiple of 10"),
        ("params", params.t().contiguous().t(), "params must be a contiguous"),
        ("params", params.long(), "params must be a contiguous floating-point"),
        ("noise", noise[:, 1:], r"noise must be contiguous float64 \(batch=3, K \+ C=5"),
        ("noise", noise.float(), "noise must be contiguous float64"),
        ("noise", noise[:, :, ::2], "noise must be contiguous float64"),
        ("noise", noise[0], "noise must be contiguous float64"),
        ("position", position.double(), "position must be an int32 or int64 tensor of shape"),
        ("position", position.short(), "position must be an int32 or int64"),
        ("position", position.repeat(2), r"position must be .* shape \(1,\)"),
        ("position", position[0], r"position must be .* shape \(1,\)"),
        ("position", position.to("meta"), "must be on one device"),
        ("out", out[:, :2], r"out must be a contiguous floating-point \(3, 3\)"),
        ("image", image[:, :, :-1], r"image must be a contiguous floating-point \(3, 3, 6\)"),
    ]
    for name, value, message in wrong:
        with pytest.raises(ValueError, match=message):
            mixture_sample.sample_pixel(**(good | {name: value}))
    with pytest.raises(ValueError, match=r"noise must have shape \(batch, K \+ C\)"):
        mixture_sample.sample(params, noise, channels)
