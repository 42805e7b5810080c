"""`python -m fastpixel.convert`: import a PixelCNN++ trained with openai/pixel-cnn (or its
enhanced fork) or with pclucas14/pixel-cnn-pp, so it samples with fastpixel's cached sampler.

    python -m fastpixel.convert --from openai save/params_cifar.ckpt cifar.safetensors
    python -m fastpixel.convert --from pclucas14 models/pcnn_lr.0.00040_nr-resnet5_nr-filters160_889.pth cifar.safetensors

How the weights are mapped: fastpixel/io/converters.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .io.checkpoint import save
from .io.converters import SOURCES, ConvertError, from_openai, from_pclucas14
from .usage import Parser, UsageError, report

PROGRAM = "python -m fastpixel.convert"


def _image_size(text: str):
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> Parser:
    """The command line's options (the tests read them)."""
    parser = Parser(PROGRAM, __doc__)
    parser.add_argument("--from", dest="source", choices=SOURCES, required=True, help="which code trained the model")
    parser.add_argument("checkpoint", help="openai: the checkpoint prefix, its .index or its folder; pclucas14: the .pth state_dict")
    parser.add_argument("out", help="the fastpixel model file to write (.safetensors)")
    parser.add_argument("--image_size", type=_image_size, default=None,
                        help="N or HxW (default: 28 for one channel, 32 for RGB; the weights cannot tell)")
    for name in ("channels", "nr_resnet", "nr_filters", "nr_logistic_mix"):
        parser.add_argument(f"--{name}", type=int, default=None, help="read from the weights; a value given must agree")
    parser.add_argument("--resnet_nonlinearity", choices=["concat_elu", "elu", "relu"], default=None,
                        help="openai only: needed for elu or relu, which the weights cannot tell apart")
    return parser


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(image_size=args.image_size, channels=args.channels, nr_resnet=args.nr_resnet,
                   nr_filters=args.nr_filters, nr_logistic_mix=args.nr_logistic_mix)
    try:
        if Path(args.out).exists() and Path(args.checkpoint).exists() and os.path.samefile(args.out, args.checkpoint):
            raise UsageError(f"the output {args.out} is the checkpoint being converted: choose another name")
        if args.source == "openai":
            model = from_openai(args.checkpoint, resnet_nonlinearity=args.resnet_nonlinearity, **options)
        elif args.resnet_nonlinearity not in (None, "concat_elu"):
            raise UsageError("pclucas14/pixel-cnn-pp models use concat_elu only")
        else:
            model = from_pclucas14(args.checkpoint, **options)
        if Path(args.out).is_dir():
            raise UsageError(f"output path {args.out} is a directory")
        save(model, args.out)
    except (ConvertError, UsageError, OSError) as err:
        return report(PROGRAM, err)
    print(f"wrote {args.out}: {args.source} model, {model.config.to_json()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
