import pytest
import torch

from fastpixel import mixture

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1


def random_params(batch, channels, k, height=1, width=1, dtype=torch.float64, spread=1.0, min_log_scale=-7.0):
    """Parameters with means across [-1.2, 1.2] and log-scales from min_log_scale to 0."""
    p = torch.randn(batch, mixture.num_params(channels, k), height, width, dtype=dtype)
    means = slice(k, k + channels * k)
    log_scales = slice(k + channels * k, k + 2 * channels * k)
    p[:, means] = (torch.rand_like(p[:, means]) * 2.4 - 1.2) * spread
    p[:, log_scales] = torch.rand_like(p[:, log_scales]) * min_log_scale
    return p


def reference_bin_mass(x, mean, log_scale):
    """Probability of x's bin by plain sigmoid differences (float64), edge bins open-ended.
    Above the mean it uses the mirrored difference, so neither tail rounds to 1 - 1."""
    s = torch.exp(log_scale.clamp(min=-7))
    upper = torch.where(x > 0.999, torch.full_like(x, torch.inf), (x - mean + 1 / 255) / s)
    lower = torch.where(x < -0.999, torch.full_like(x, -torch.inf), (x - mean - 1 / 255) / s)
    return torch.where(x < mean, torch.sigmoid(upper) - torch.sigmoid(lower), torch.sigmoid(-lower) - torch.sigmoid(-upper))


def reference_pmf(params, x):
    """P(pixel = x) for params (P,) and one pixel x (C,) in [-1, 1], written from the paper.
    x[c] may also be a tensor of values with a trailing axis of size 1 (broadcast against components)."""
    channels = len(x)
    k = params.shape[0] // (3 if channels == 1 else 10)
    weights = torch.softmax(params[:k], 0)
    means = params[k:k + channels * k].view(channels, k)
    log_scales = params[k + channels * k:k + 2 * channels * k].view(channels, k)
    prob = weights.clone()
    if channels == 1:
        return (prob * reference_bin_mass(x[0], means[0], log_scales[0])).sum(-1)
    alpha, beta, gamma = torch.tanh(params[k + 6 * k:].view(3, k))
    prob = prob * reference_bin_mass(x[0], means[0], log_scales[0])
    prob = prob * reference_bin_mass(x[1], means[1] + alpha * x[0], log_scales[1])
    prob = prob * reference_bin_mass(x[2], means[2] + beta * x[0] + gamma * x[1], log_scales[2])
    return prob.sum(-1)


def grey_pmf(params):
    """The pmf over the 256 values of one grey pixel, computed with mixture.nll."""
    x = GRID.view(256, 1, 1, 1)
    return torch.exp(-mixture.nll(params.expand(256, -1, 1, 1), x))


def rgb_pmf(params):
    """The pmf over all 256^3 values of one RGB pixel, (256, 256, 256), with mixture.nll."""
    g, b = torch.meshgrid(GRID, GRID, indexing="ij")
    rows = []
    for r in GRID:
        x = torch.stack([torch.full_like(g, r), g, b]).flatten(1).T.reshape(-1, 3, 1, 1)
        rows.append(torch.exp(-mixture.nll(params.expand(len(x), -1, 1, 1), x)).view(256, 256))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def rgb_case():
    torch.manual_seed(3)
    params = random_params(1, 3, 3, spread=0.6)
    params[:, 3 + 9:3 + 18] = torch.tensor([-1.5, -2.5, -3.0]).repeat(3).view(1, 9, 1, 1)  # visible spread
    return params, rgb_pmf(params)


@pytest.mark.parametrize("seed", range(5))
def test_grey_pmf_sums_to_one(seed):
    torch.manual_seed(seed)
    params = random_params(1, 1, 4)
    assert abs(float(grey_pmf(params).sum()) - 1) < 1e-10


def test_rgb_pmf_sums_to_one(rgb_case):
    _, pmf = rgb_case
    assert abs(float(pmf.sum()) - 1) < 1e-9


def test_nll_matches_reference_float64():
    for channels in (1, 3):
        params = random_params(6, channels, 3, 4, 5, min_log_scale=-4.0)  # no bin below 1e-60
        x = GRID[torch.randint(0, 256, (6, channels, 4, 5))]
        x[0, :, 0, 0] = -1.0  # the open-ended edge bins
        x[1, :, 0, 0] = 1.0
        expected = torch.zeros(6, dtype=torch.float64)
        for b in range(6):
            for i in range(4):
                for j in range(5):
                    expected[b] -= torch.log(reference_pmf(params[b, :, i, j], x[b, :, i, j]))
        torch.testing.assert_close(mixture.nll(params, x), expected, rtol=1e-10, atol=1e-9)


def test_nll_is_stable_in_float32_with_extreme_parameters():
    params = random_params(8, 3, 5, 6, 6)
    params[:, 5:20] *= 40  # means far outside the data range: tiny bins everywhere
    x = GRID[torch.randint(0, 256, (8, 3, 6, 6))]
    exact = mixture.nll(params, x)
    single = mixture.nll(params.float(), x.float())
    assert torch.isfinite(single).all()
    torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=1e-2)


def test_nll_upcasts_bfloat16_parameters():
    params = random_params(2, 1, 3, 4, 4).bfloat16()
    x = GRID[torch.randint(0, 256, (2, 1, 4, 4))].float()
    out = mixture.nll(params, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mixture.nll(params.float(), x))


def test_focal_nll_is_nll_at_gamma_zero_and_smaller_at_gamma_two():
    for channels in (1, 3):
        params = random_params(4, channels, 3, 3, 3)
        x = GRID[torch.randint(0, 256, (4, channels, 3, 3))]
        nll = mixture.nll(params, x)
        torch.testing.assert_close(mixture.focal_nll(params, x, gamma=0.0), nll, rtol=1e-12, atol=1e-10)
        focal = mixture.focal_nll(params, x, gamma=2.0)
        assert torch.all(focal < nll)


def test_focal_nll_has_finite_gradients_for_certain_pixels_and_small_gamma():
    params = torch.zeros(1, 3, 2, 2)
    params[:, 1] = -1.2  # means far below the data range: the lowest level is certain in float32
    params[:, 2] = -7.0
    params.requires_grad_()
    x = torch.full((1, 1, 2, 2), -1.0)
    for gamma in (0.5, 1.0, 2.0):
        (grad,) = torch.autograd.grad(mixture.focal_nll(params, x, gamma).sum(), params)
        assert torch.isfinite(grad).all(), gamma


def test_nll_refuses_uint8_images():
    with pytest.raises(ValueError, match="floating point"):
        mixture.nll(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8))


def test_focal_nll_weights_each_subpixel_conditional():
    params = random_params(1, 3, 2)
    x = GRID[torch.tensor([10, 200, 128])].view(1, 3, 1, 1)
    p = params[0, :, 0, 0]
    r, g, b = x[0, :, 0, 0]
    # Conditionals from sums of the reference joint: P(r), P(g | r) = P(r, g) / P(r), P(b | r, g).
    p_r = reference_pmf(p, [r, GRID.view(256, 1, 1), GRID.view(1, 256, 1)]).sum()
    p_rg = reference_pmf(p, [r, g, GRID.view(256, 1)]).sum()
    p_rgb = reference_pmf(p, [r, g, b])
    conditionals = torch.stack([p_r, p_rg / p_r, p_rgb / p_rg])
    expected = -((1 - conditionals) ** 2 * torch.log(conditionals)).sum()
    torch.testing.assert_close(mixture.focal_nll(params, x, gamma=2.0)[0], expected, rtol=1e-8, atol=1e-10)


def total_variation(p, q):
    return 0.5 * float((p - q).abs().sum())


def test_grey_sampler_matches_pmf():
    params = random_params(1, 1, 4)
    params[:, 4:8] = torch.tensor([-0.9, -0.2, 0.5, 0.99]).view(1, 4, 1, 1)
    params[:, 8:12] = torch.tensor([-2.0, -4.0, -3.0, -5.0]).view(1, 4, 1, 1)
    n = 200_000
    draws = mixture.sample(params.expand(1, -1, 1, n), generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(torch.round((draws.flatten() + 1) * 127.5).long(), minlength=256)
    assert total_variation(counts / n, grey_pmf(params)) < 0.02


def test_rgb_sampler_matches_pmf_on_marginals_and_coarse_joint(rgb_case):
    params, pmf = rgb_case
    n = 300_000
    draws = mixture.sample(params.expand(1, -1, 1, n), generator=torch.Generator().manual_seed(2), channels=3)
    levels = torch.round((draws[0, :, 0] + 1) * 127.5).long()  # (3, n)
    for c in range(3):
        marginal = pmf.sum(dim=tuple(d for d in range(3) if d != c))
        counts = torch.bincount(levels[c], minlength=256)
        assert total_variation(counts / n, marginal) < 0.03, f"channel {c}"
    coarse = pmf.view(8, 32, 8, 32, 8, 32).sum(dim=(1, 3, 5)).flatten()
    cells = (levels[0] // 32) * 64 + (levels[1] // 32) * 8 + levels[2] // 32
    assert total_variation(torch.bincount(cells, minlength=512) / n, coarse) < 0.03


def test_sampler_consumes_explicit_noise_deterministically():
    params = random_params(2, 3, 4, 5, 6).float()
    noise = torch.rand(mixture.noise_shape(params.shape, 3), dtype=torch.float64)
    a = mixture.sample(params, noise=noise, channels=3)
    b = mixture.sample(params, noise=noise.clone(), channels=3)
    assert torch.equal(a, b)
    assert torch.equal(mixture.snap_to_grid(a), a)
    with pytest.raises(ValueError, match="noise must have shape"):
        mixture.sample(params, noise=noise[:, :-1], channels=3)


def test_sampler_asks_for_channels_when_ambiguous():
    params = torch.zeros(1, 30, 2, 2)  # 10 components of 1 channel, or 3 of 3 channels
    with pytest.raises(ValueError, match="pass channels=1 or 3"):
        mixture.sample(params)
    assert mixture.sample(params, channels=1).shape == (1, 1, 2, 2)
    assert mixture.sample(params, channels=3).shape == (1, 3, 2, 2)
