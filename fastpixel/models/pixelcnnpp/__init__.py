"""PixelCNN++ (Salimans et al. 2017) with the enhanced fork's options: `config.py` (ModelConfig),
`layers.py` (shifted convolutions, gated residual blocks, the causal non-local block),
`model.py` (the network, top to bottom) and `mixture.py` (its likelihood and sampler,
public as `fastpixel.mixture`)."""
