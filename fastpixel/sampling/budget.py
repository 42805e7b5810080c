"""The memory a draw needs, checked before any work: the images it returns, each batch's
noise and canvas, and the activations of the batch in flight, which dominate. Activations
are what a forward pass holds at once (models/footprint.py) times what each sampler was
measured to keep (tests/test_sampling.py holds the estimate to the peak of real draws)."""
from __future__ import annotations

import torch

from ..memory import refuse_beyond_memory
from ..models.footprint import forward_peak

DEFAULT_BATCH = 256  # images drawn at once when no batch size is given: each holds its noise and activations
# A batch's activations, in multiples of the tensors a forward pass holds at once (counted on
# the meta device), chosen above every peak measured (the process's peak resident memory;
# models of 28x28 and 12x12, batches of 128 and 512): a naive draw, a forward pass per pixel,
# reached 1.2-1.7x for the bundled models and up to 3.6x for small Gated PixelCNNs (oneDNN's
# and the allocator's own buffers come on top of the tensors); a cached draw, which keeps a
# few rows per layer, 0.22-0.98x. So the estimate errs high, by up to 3x for PixelCNN++.
FORWARD_PASSES_HELD = 4
CACHED_PASSES_HELD = 1.5


def draw_memory(model, n: int, batch_size: int, fast: bool = True, copies: int = 1) -> tuple[int, int]:
    """Bytes a draw holds on the host (`copies` arrays of all n images, one batch's float64
    noise, made then stacked, and canvas) and for one batch's activations (on the model's
    device)."""
    config = model.config
    param = next(model.parameters())
    pixels = config.shape[0] * config.shape[1]
    noise_and_canvas = 8 * pixels * (2 * config.noise_channels + config.channels)
    stored = 8 if config.categorical_inputs else 1  # int64 codes, else uint8 images
    host = copies * n * config.channels * pixels * stored + batch_size * noise_and_canvas
    per_image = forward_peak(type(model), config, param.dtype)
    return host, int(batch_size * per_image * (CACHED_PASSES_HELD if fast else FORWARD_PASSES_HELD))


def check_fits(model, n: int, batch_size: int, fast: bool = True, copies: int = 1) -> None:
    """Refuse, before any work, a draw whose memory cannot exist here (a ValueError): on a GPU
    the activations are held to its free memory, the rest to this machine's."""
    host, activations = draw_memory(model, n, batch_size, fast, copies)
    device = next(model.parameters()).device
    what = f"drawing {n} images in batches of {batch_size}"
    advice = "ask for fewer images or a smaller batch size"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if activations > free:
            raise ValueError(f"{what} needs about {activations / 2**30:.3g} GiB of GPU memory, more than the "
                             f"{free / 2**30:.3g} GiB free on {device}: {advice}")
        refuse_beyond_memory(host, what, advice)
    else:
        refuse_beyond_memory(host + activations, what, advice)
