"""Files: model checkpoints and their integrity seals (`checkpoint.py`, `integrity.py`),
converters of other projects' trained models (`converters.py`, with the TensorFlow
checkpoint reader `tf_bundle.py`), data sets (`data.py`), images named on a command line
(`sources.py`) and image grids (`grid.py`).

May import: fastpixel.models (the family registry, to build what a file describes).
"""
