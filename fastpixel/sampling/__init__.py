"""Drawing images and scoring them, for every family.

- `sampler.py`: the public `sample` (naive or cached, the backend's choice checked up front);
- `noise.py`: the noise contract (each image's uniforms from its own generator);
- `budget.py`: the memory a draw needs, checked before any work;
- `naive.py`: the naive sampler, a full forward pass per pixel: the reference;
- `caches/`: each family's cache, the state kept while an image is drawn in raster order;
- `engines/`: who runs a cache's steps (PyTorch, Triton + CUDA graphs, the C++ engine),
  behind one interface, and the loop that drives them;
- `likelihood.py`: the public `bits_per_dim` and `log_prob`, and the conversions to and from uint8;
- `codec.py`: the public `encode` and `decode`, a lossless codec driven by the engines.

May import: fastpixel.io, fastpixel.models, fastpixel.backend, fastpixel.extension, fastpixel.kernels.
"""
from .codec import decode, encode
from .likelihood import bits_per_dim, log_prob, nll_sum, to_model_input, to_uint8
from .budget import DEFAULT_BATCH, check_fits
from .noise import image_noise
from .sampler import describe, resolve_backend, sample

__all__ = ["sample", "bits_per_dim", "log_prob", "encode", "decode", "nll_sum", "image_noise", "to_model_input", "to_uint8", "resolve_backend",
           "describe", "check_fits", "DEFAULT_BATCH"]
