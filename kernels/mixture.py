"""The discretised logistic mixture in plain PyTorch: likelihood, focal likelihood and exact sampling.

Parameter layout on the channel axis, for K components and C image channels:
`[logits (K) | means (C*K) | log-scales (C*K) | coupling coefficients (3*K, RGB only)]`.
For RGB the green mean shifts by alpha * red and the blue mean by beta * red + gamma * green,
using the pixel's actual (grid) values of the earlier channels.

Bin masses are computed as log(sigmoid(a) - sigmoid(b)) in a form that never subtracts two
nearly equal numbers, so every bin gets its exact mass in float32 too; the original's
tiny-bin fallback (log-density times bin width when the difference underflows) is what
this replaces, and the two agree wherever that approximation is accurate.

This is the plain-PyTorch twin of the fused kernels in `mixture_nll.py` and
`mixture_sample.py` (their reference), and what `fastpixel.mixture` runs wherever they do not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_LOG_SCALE = -7.0
HALF_BIN = 1.0 / 255.0  # half the spacing of the 256-level grid on [-1, 1]


def num_params(channels: int, nr_mix: int) -> int:
    """Channels of the parameter tensor for `channels` image channels and `nr_mix` components."""
    return (1 + 2 * channels + (3 if channels == 3 else 0)) * nr_mix


def num_mix(num_channels_params: int, channels: int) -> int:
    per_component = num_params(channels, 1)
    if num_channels_params % per_component:
        raise ValueError(f"mixture parameters for {channels} channel(s) need a multiple of {per_component} "
                         f"channels, got {num_channels_params}")
    return num_channels_params // per_component


def _infer_channels(num_channels_params: int, channels: int | None) -> int:
    if channels is not None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        return channels
    fits = [c for c in (1, 3) if num_channels_params % num_params(c, 1) == 0]
    if len(fits) != 1:
        raise ValueError(f"cannot tell the image channels from {num_channels_params} parameter channels; pass channels=1 or 3")
    return fits[0]


def compute_dtype(params: torch.Tensor) -> torch.dtype:
    # bf16 / fp16 lack the precision for log-probabilities and for the 256-level grid.
    return torch.float64 if params.dtype == torch.float64 else torch.float32


def _unpack(params: torch.Tensor, channels: int):
    """Split parameters (B, P, H, W) into logits (B, K, H, W), means and log-scales
    (B, C, K, H, W) and coupling coefficients (B, 3, K, H, W) or None."""
    k = num_mix(params.shape[1], channels)
    params = params.to(compute_dtype(params))
    logits = params[:, :k]
    means = params[:, k:k + channels * k].unflatten(1, (channels, k))
    log_scales = params[:, k + channels * k:k + 2 * channels * k].unflatten(1, (channels, k)).clamp(min=MIN_LOG_SCALE)
    coeffs = torch.tanh(params[:, k + 2 * channels * k:].unflatten(1, (3, k))) if channels == 3 else None
    return logits, means, log_scales, coeffs


def _coupled_mean(mean: torch.Tensor, coeffs: torch.Tensor | None, earlier: list[torch.Tensor]) -> torch.Tensor:
    """A channel's mean shifted by the grid values of the channels before it (RGB coupling):
    green by alpha * red, blue by beta * red + gamma * green. coeffs index (alpha, beta, gamma) on axis 1."""
    if not earlier or coeffs is None:
        return mean
    if len(earlier) == 1:
        return mean + coeffs[:, 0] * earlier[0]
    return mean + coeffs[:, 1] * earlier[0] + coeffs[:, 2] * earlier[1]


def _log_bin_mass(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under a logistic(mean, exp(log_scale)) discretised to the 256-level
    grid, with the lowest and highest bins extended to -inf and +inf."""
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + HALF_BIN)
    lower = inv_scale * (x - mean - HALF_BIN)
    # sigmoid(u) - sigmoid(l) = e^l (e^(u-l) - 1) / ((1 + e^u)(1 + e^l)), with u - l > 0 known.
    middle = lower + torch.log(torch.expm1(upper - lower)) - F.softplus(upper) - F.softplus(lower)
    lowest = -F.softplus(-upper)   # log sigmoid(upper)
    highest = -F.softplus(lower)   # log (1 - sigmoid(lower))
    return torch.where(x < -0.999, lowest, torch.where(x > 0.999, highest, middle))


def _component_log_probs(params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel and component, log P_k(x_c | x_<c) (B, C, K, H, W), and log mixture weights."""
    check_pair(params, x)
    channels = x.shape[1]
    logits, means, log_scales, coeffs = _unpack(params, channels)
    x = x.to(logits.dtype)
    per_channel = [
        _log_bin_mass(x[:, c:c + 1], _coupled_mean(means[:, c], coeffs, [x[:, i:i + 1] for i in range(c)]),
                      log_scales[:, c])
        for c in range(channels)
    ]
    return torch.stack(per_channel, dim=1), torch.log_softmax(logits, dim=1)


def nll(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in nats per image, (B,), of images x (B, C, H, W) on the
    256-level grid in [-1, 1] under mixture parameters (B, P, H, W)."""
    log_probs, log_weights = _component_log_probs(params, x)
    per_pixel = torch.logsumexp(log_weights + log_probs.sum(dim=1), dim=1)
    return -per_pixel.flatten(1).sum(dim=1)


def log_prob(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log P(x_c | x_<c, context) per sub-pixel, (B, C, H, W): the chain rule inside each
    pixel (mixture weights updated by the earlier channels); summed over a pixel's channels,
    its joint log-probability."""
    log_probs, log_weights = _component_log_probs(params, x)
    # log P(x_<=c): mixture of the running products over channels; differences give conditionals.
    joint = torch.logsumexp(log_weights.unsqueeze(1) + log_probs.cumsum(dim=1), dim=2)  # (B, C, H, W)
    return joint - F.pad(joint, (0, 0, 0, 0, 1, 0))[:, :-1]


def focal_nll(params: torch.Tensor, x: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) per image, (B,): the sum over sub-pixels of
    -(1 - P)^gamma log P, where P = P(x_c | x_<c, context) comes from the chain rule inside
    the pixel (mixture weights updated by the earlier channels). Equal to `nll` at gamma = 0."""
    check_gamma(gamma)
    conditional = log_prob(params, x)
    # clamp away from 0: (1 - P)^gamma has an infinite slope there for gamma < 1
    weight = (-torch.expm1(conditional)).clamp(min=torch.finfo(conditional.dtype).tiny) ** gamma
    return -(weight * conditional).flatten(1).sum(dim=1)


def level_pmf(params: torch.Tensor, channel: int, earlier: torch.Tensor, channels: int) -> torch.Tensor:
    """P(x_c = each of the 256 levels | x_<c = earlier, context), (B, 256) in float64, for
    one pixel's parameters (B, P): the components' bin masses of channel c (means coupled to
    the earlier channels' values), weighted by the mixture weights updated by the earlier
    channels' likelihoods. `earlier` (B, c) holds those channels' grid values. What an
    entropy coder needs, one channel at a time: differences of the CDF, accurate to float64's
    rounding (a bin far in a tail gets ~0, which the coder floors to its least probability)."""
    logits, means, log_scales, coeffs = _unpack(params.double()[:, :, None, None], channels)  # (B, [C,] K, 1, 1)
    values = [earlier[:, i, None, None, None].double() for i in range(channel)]  # (B, 1, 1, 1) each
    log_weights = torch.log_softmax(logits, dim=1)
    for i, x in enumerate(values):  # Bayes: the components that explain the earlier channels weigh more
        log_weights = log_weights + _log_bin_mass(x, _coupled_mean(means[:, i], coeffs, values[:i]), log_scales[:, i])
    log_weights = torch.log_softmax(log_weights, dim=1)
    # each component's CDF at the 255 edges between levels; the first and last bins reach to -inf and +inf
    edges = (torch.arange(255, dtype=torch.float64, device=params.device) / 127.5 - 1 + HALF_BIN).view(1, 1, 255)
    mean = _coupled_mean(means[:, channel], coeffs, values)[:, :, 0, 0, None]  # (B, K, 1)
    cdf = torch.sigmoid((edges - mean) * torch.exp(-log_scales[:, channel, :, 0, 0, None]))
    masses = torch.diff(F.pad(cdf, (1, 0), value=0.0), dim=2, append=torch.ones_like(cdf[:, :, :1]))
    return torch.einsum("bk,bkn->bn", log_weights[:, :, 0, 0].exp(), masses)


def check_gamma(gamma: float) -> None:
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")


def noise_shape(params_shape: torch.Size | tuple, channels: int) -> tuple[int, int, int, int]:
    """Shape of the uniforms `sample` consumes: per pixel, one per component (to choose it)
    and one per channel (to draw the logistic)."""
    batch, p, height, width = params_shape
    return (batch, num_mix(p, channels) + channels, height, width)


@torch.no_grad()
def sample(params: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           channels: int | None = None) -> torch.Tensor:
    """One exact draw per pixel from the discretised mixture, (B, C, H, W) on the 256-level
    grid in [-1, 1] (float64 for float64 parameters, else float32).

    The component is chosen by the Gumbel-max trick and the logistic drawn by its inverse
    CDF, then snapped to the grid, channel by channel, each channel's mean coupled to the
    earlier channels' snapped values. `noise` are uniforms in [0, 1) of `noise_shape`; without
    it they are drawn from `generator` (or the global generator). `channels` is needed only
    when the parameter count fits both 1 and 3 channels.
    """
    if params.dim() != 4:
        raise ValueError(f"params must have shape (batch, P, height, width), got {tuple(params.shape)}")
    channels = _infer_channels(params.shape[1], channels)
    shape = noise_shape(params.shape, channels)
    if noise is None:
        device = generator.device if generator is not None else params.device
        noise = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    logits, means, log_scales, coeffs = _unpack(params, channels)
    k = logits.shape[1]
    # Transform in float64 so that uniforms near 0 or 1 give large but finite draws.
    u = noise.to(device=params.device, dtype=torch.float64).clamp(min=torch.finfo(torch.float64).tiny, max=1 - 2 ** -53)
    gumbel = (-torch.log(-torch.log(u[:, :k]))).to(logits.dtype)
    logistic = (torch.log(u[:, k:]) - torch.log1p(-u[:, k:])).to(logits.dtype)

    component = (logits + gumbel).argmax(dim=1, keepdim=True)  # (B, 1, H, W)

    def pick(t: torch.Tensor) -> torch.Tensor:  # (B, ..., K, H, W) -> (B, ..., H, W), the chosen component
        index = component.view(component.shape[0], *[1] * (t.dim() - 4), 1, *component.shape[2:])
        return t.gather(-3, index.expand(*t.shape[:-3], 1, *t.shape[-2:])).squeeze(-3)

    means, scales = pick(means), torch.exp(pick(log_scales))
    coeffs = None if coeffs is None else pick(coeffs)
    x: list[torch.Tensor] = []
    for c in range(channels):
        x.append(snap_to_grid(_coupled_mean(means[:, c], coeffs, x) + scales[:, c] * logistic[:, c]))
    return torch.stack(x, dim=1)


def snap_to_grid(x: torch.Tensor) -> torch.Tensor:
    """The nearest of the 256 levels k / 127.5 - 1, k = 0..255."""
    return torch.round((x + 1) * 127.5).clamp(0, 255) / 127.5 - 1


def check_pair(params: torch.Tensor, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point on the [-1, 1] grid (u8 / 127.5 - 1), got {x.dtype}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x must have shape (batch, 1 or 3, height, width), got {tuple(x.shape)}")
    if params.dim() != 4 or params.shape[0] != x.shape[0] or params.shape[2:] != x.shape[2:]:
        raise ValueError(f"params must have shape (batch, P, height, width) matching x {tuple(x.shape)}, got {tuple(params.shape)}")
    num_mix(params.shape[1], x.shape[1])

