"""The model families, one folder each, and the registry that names them (`families.py`).

- `pixelcnnpp/`: PixelCNN++ (config, layers, model, and its likelihood, the discretised
  logistic mixture);
- `masked/`: the masked-convolution families, PixelCNN and Gated PixelCNN, with what they
  share and their likelihood (a softmax over levels);
- `config.py`: what every family's configuration shares.

A model knows nothing of how it is sampled (fastpixel/sampling) or stored (fastpixel/io).
May import: fastpixel.backend (who runs a training kernel) and fastpixel.kernels.
"""
