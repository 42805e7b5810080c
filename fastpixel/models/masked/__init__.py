"""The masked-convolution families: `pixelcnn.py` (PixelCNN, van den Oord et al. 2016a) and
`gated.py` (the conditional Gated PixelCNN, 2016b); `family.py` holds what they share
(config fields, colour-ordered masks, input features, output layers) and `categorical.py`
their likelihood and draw (a softmax over N levels per sub-pixel)."""
