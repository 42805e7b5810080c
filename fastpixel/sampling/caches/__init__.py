"""Caches: each family's state while it is sampled in raster order, and its reference steps
in PyTorch (fastpixel/sampling/engines runs them, or a faster twin over the same buffers).

- `pixelcnnpp.py`: PixelCNN++'s incremental activation cache (DESIGN.md §5);
- `masked.py`: what the masked families' caches share (row states, plans of products);
- `pixelcnn.py`, `gated.py`: PixelCNN's and the Gated PixelCNN's.

May import: fastpixel.models and fastpixel.kernels; never an engine.
"""
