"""PixelCNN++ (Salimans et al. 2017), read top to bottom in the order data flows.

Two streams run through the network: `u` sees only the rows above a pixel (down-shifted
2x3 convolutions) and `ul` sees the rows above and the pixels to its left (down-right
shifted 2x2 convolutions, fed the `u` stream as a skip input). An up pass at full, half
and quarter resolution stores every activation; a down pass climbs back up, taking each
stored activation as a skip input. A 1x1 layer turns `ul` into mixture parameters.

Options of the enhanced fork: CoordConv (two coordinate channels on the input), and a
causally masked non-local block. The non-local block sits on the `ul` stream at quarter
resolution, between the up and the down pass: there every position already summarises a
4x4 patch, so attention sees the whole image at 1/256 of the full-resolution cost, and
the cached sampler needs it only once every 4 rows and 4 columns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_labels
from . import mixture
from .config import ModelConfig
from .layers import (
    CausalNonLocal,
    GatedResnet,
    Nin,
    ShiftedConv2d,
    ShiftedConvTranspose2d,
    data_dependent_init,
    down_shift,
    right_shift,
)

LEVELS = 3  # full, half and quarter resolution


class PixelCNNpp(nn.Module):
    """forward(x, labels=None) -> mixture parameters (B, config.num_params_out, H, W).

    x holds images on the 256-level grid scaled to [-1, 1] (`u8 / 127.5 - 1`); the
    parameters at pixel p depend only on pixels strictly before p in raster order.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"PixelCNNpp needs a fastpixel.ModelConfig, got {type(config).__name__}")
        self.config = config
        nf, nr, in_channels = config.nr_filters, config.nr_resnet, config.input_channels

        def u_block(skip_channels=0):
            return GatedResnet(nf, (2, 3), "down", config.resnet_nonlinearity, config.dropout,
                               skip_channels, config.num_classes)

        def ul_block(skip_channels):
            return GatedResnet(nf, (2, 2), "down_right", config.resnet_nonlinearity, config.dropout,
                               skip_channels, config.num_classes)

        self.u_init = ShiftedConv2d(in_channels, nf, (2, 3), "down")
        self.ul_init_above = ShiftedConv2d(in_channels, nf, (1, 3), "down")
        self.ul_init_left = ShiftedConv2d(in_channels, nf, (2, 1), "down_right")

        self.up_u = nn.ModuleList(nn.ModuleList(u_block() for _ in range(nr)) for _ in range(LEVELS))
        self.up_ul = nn.ModuleList(nn.ModuleList(ul_block(nf) for _ in range(nr)) for _ in range(LEVELS))
        self.downsample_u = nn.ModuleList(ShiftedConv2d(nf, nf, (2, 3), "down", stride=2) for _ in range(LEVELS - 1))
        self.downsample_ul = nn.ModuleList(ShiftedConv2d(nf, nf, (2, 2), "down_right", stride=2) for _ in range(LEVELS - 1))

        self.nonlocal_block = CausalNonLocal(nf) if config.nonlocal_block else None

        # Indexed by resolution like the up pass (0 = full); the down pass starts at the
        # coarsest level, whose first block input is the last up-pass activation.
        down_counts = [nr + 1] * (LEVELS - 1) + [nr]
        self.down_u = nn.ModuleList(nn.ModuleList(u_block(nf) for _ in range(n)) for n in down_counts)
        self.down_ul = nn.ModuleList(nn.ModuleList(ul_block(2 * nf) for _ in range(n)) for n in down_counts)
        # upsample_*[level] doubles the resolution from level + 1 to level.
        self.upsample_u = nn.ModuleList(ShiftedConvTranspose2d(nf, nf, (2, 3), "down") for _ in range(LEVELS - 1))
        self.upsample_ul = nn.ModuleList(ShiftedConvTranspose2d(nf, nf, (2, 2), "down_right") for _ in range(LEVELS - 1))

        self.out = Nin(nf, config.num_params_out)

    @staticmethod
    def outline(config: ModelConfig) -> tuple[int, dict[str, tuple[int, ...]]]:
        """How many tensors __init__ makes for `config`, and the shapes of a few that show every
        width: `fastpixel.load` checks a file's header against them before building the model,
        since even on the meta device building takes time in proportion to nr_resnet."""
        nf, nr, labelled = config.nr_filters, config.nr_resnet, config.num_classes is not None
        block = 6 + labelled  # conv_in and conv_out (v, g, b each), and the class bias
        plain, skipped = LEVELS * nr, LEVELS * nr + 2 * (LEVELS * (nr + 1) - 1)  # blocks without and with a skip Nin
        layers = 3 + 4 * (LEVELS - 1) + 1 + 4 * config.nonlocal_block  # outside blocks: inits, resamplings, out, non-local
        shapes = {"u_init.v": (nf, config.input_channels, 2, 3), "out.v": (config.num_params_out, nf, 1, 1)}
        if labelled:
            shapes["up_u.0.0.class_bias.weight"] = (config.num_classes, 2 * nf)
        return 3 * layers + plain * block + skipped * (block + 3), shapes  # v, g and b per weight-normed layer

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        labels = None if labels is None else labels.long()
        x = self.input_features(x)
        u = down_shift(self.u_init(x))
        ul = down_shift(self.ul_init_above(x)) + right_shift(self.ul_init_left(x))

        us, uls = [u], [ul]
        for level in range(LEVELS):
            for u_block, ul_block in zip(self.up_u[level], self.up_ul[level]):
                u = u_block(u, labels=labels)
                ul = ul_block(ul, u, labels)
                us.append(u)
                uls.append(ul)
            if level < LEVELS - 1:
                u = self.downsample_u[level](u)
                ul = self.downsample_ul[level](ul)
                us.append(u)
                uls.append(ul)

        u, ul = us.pop(), uls.pop()
        if self.nonlocal_block is not None:
            ul = self.nonlocal_block(ul)
        for level in reversed(range(LEVELS)):
            for u_block, ul_block in zip(self.down_u[level], self.down_ul[level]):
                u = u_block(u, us.pop(), labels)
                ul = ul_block(ul, torch.cat([u, uls.pop()], dim=1), labels)
            if level > 0:
                u = self.upsample_u[level - 1](u)
                ul = self.upsample_ul[level - 1](ul)
        return self.out(F.elu(ul))

    def nll(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per image, (B,), of x under forward's output
        (the interface every family gives the trainer and bits_per_dim)."""
        return mixture.nll(output, x)

    def log_prob(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log P of each sub-pixel of x given what precedes it, (B, C, H, W), under forward's output."""
        return mixture.log_prob(output, x)

    def level_pmf(self, params: torch.Tensor, channel: int, earlier: torch.Tensor) -> torch.Tensor:
        """A pixel's channel over its 256 levels, (B, 256) float64, from the pixel's parameters
        (B, P) and the earlier channels' levels (B, channel) (the codec's probability model)."""
        return mixture.level_pmf(params, channel, earlier / 127.5 - 1, self.config.channels)

    def input_features(self, x: torch.Tensor) -> torch.Tensor:
        """The image plus a channel of ones (so zero padding differs from black) and, with
        CoordConv, the row and column coordinates in [-1, 1]."""
        batch, _, height, width = x.shape
        features = [x, torch.ones_like(x[:, :1])]
        if self.config.coordconv:
            rows = torch.linspace(-1, 1, height, dtype=x.dtype, device=x.device)
            cols = torch.linspace(-1, 1, width, dtype=x.dtype, device=x.device)
            features.append(rows.view(1, 1, height, 1).expand(batch, 1, height, width))
            features.append(cols.view(1, 1, 1, width).expand(batch, 1, height, width))
        return torch.cat(features, dim=1)

    def check_input(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Raise ValueError saying what was expected when x or labels do not fit this model."""
        cfg = self.config
        expected = f"(batch, {cfg.channels}, {cfg.shape[0]}, {cfg.shape[1]})"
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor of shape {expected} in [-1, 1]")
        if x.dim() != 4:
            raise ValueError(f"x must have shape {expected}, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.channels:
            raise ValueError(f"x must have shape {expected}: this model takes {cfg.channels} channel(s), got shape {tuple(x.shape)}")
        if tuple(x.shape[2:]) != cfg.shape:
            raise ValueError(f"x must have shape {expected}: this model takes {cfg.shape[0]}x{cfg.shape[1]} images, got {x.shape[2]}x{x.shape[3]}")
        check_labels(cfg, labels, x.shape[0])

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Data-dependent initialisation: call once, on the first training batch, before any
        optimiser step. Each weight-normalised layer, in turn, sets its scale and bias so
        that its outputs on this batch have zero mean and its chosen standard deviation."""
        with data_dependent_init(self):
            self(x, labels)
