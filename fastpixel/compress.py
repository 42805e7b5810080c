"""`python -m fastpixel.compress`: store images losslessly in about the model's bits/dim, and back.

    python -m fastpixel.compress encode mnist:test:0-9999 mnist_test.fpx --checkpoint mnist --data_dir data
    python -m fastpixel.compress decode mnist_test.fpx decoded.npy --checkpoint mnist
    python -m fastpixel.compress info mnist_test.fpx

IMAGES is a .npy array (uint8 (N, C, H, W) or (N, H, W); int codes (N, H, W) for a prior over
codes), a .png picture or a folder of them, or DATASET:SPLIT:FIRST-LAST indices into
--data_dir (a class-conditional model then codes each image with its label, which travels
in the file). Decoding needs the model that encoded, on an engine whose arithmetic agrees
(the encoder's, by default): anything else is refused with a one-line error and exit 2, and
nothing is written. See fastpixel/sampling/codec.py for the format.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .backend import NAMES
from .io.checkpoint import bundled_models, load, write_array, write_atomically
from .io.sources import SourceError, read_source
from .sampling.codec import DEFAULT_BATCH, CodecError, decode, encode, read_header
from .usage import Parser, UsageError, check_writable, report, report_stop, stops_raise

PROGRAM = "python -m fastpixel.compress"


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> Parser:
    """The command line's options (the tests read them)."""
    parser = Parser(PROGRAM, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode", help="images to a .fpx file")
    enc.add_argument("images", help="a .npy array, a .png picture or folder, or DATASET:SPLIT:FIRST-LAST")
    enc.add_argument("out", help="the .fpx file to write")
    enc.add_argument("--data_dir", default="data", help="where DATASET:SPLIT:FIRST-LAST is read from")
    enc.add_argument("--batch_size", type=int, default=DEFAULT_BATCH,
                     help="images coded together (the unit of decoding)")
    dec = commands.add_parser("decode", help="a .fpx file to a .npy array")
    dec.add_argument("data", help="the .fpx file")
    dec.add_argument("out", help="the .npy array to write (uint8 (N, C, H, W); codes: int64 (N, H, W))")
    info = commands.add_parser("info", help="what a .fpx file holds")
    info.add_argument("data", help="the .fpx file")
    for command in (enc, dec):
        command.add_argument("--checkpoint", default="mnist",
                             help=f"a bundled model ({', '.join(bundled_models())}), a model file or a training save_dir")
        command.add_argument("--backend", choices=["auto", *NAMES], default="auto",
                             help="the engine (decode: auto takes the encoder's)")
    return parser


def _model(args):
    try:
        return load(args.checkpoint, device="cpu")
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None


def run(args: argparse.Namespace) -> str:
    backend = None if getattr(args, "backend", "auto") == "auto" else args.backend
    if args.command == "info":
        return json.dumps({k: v for k, v in read_header(_read(args.data)).items() if k not in ("streams", "digests")})
    check_writable(args.out, "out")
    model = _model(args)
    start = time.perf_counter()
    if args.command == "encode":
        try:
            source = read_source(args.images, args.data_dir)
        except (SourceError, OSError, ValueError) as err:
            raise UsageError(str(err)) from None
        labels = source.labels if model.config.num_classes is not None else None
        if model.config.num_classes is not None and labels is None:
            raise UsageError("this model is class-conditional: encode a data set (DATASET:SPLIT:FIRST-LAST), whose "
                             "labels travel in the file")
        data = encode(model, source.images, labels, batch_size=args.batch_size, backend=backend, progress=True)
        write_atomically(Path(args.out), lambda tmp: Path(tmp).write_bytes(data))
        n, size = len(source.images), len(data)
        return (f"wrote {args.out}: {n} images in {size:,} bytes, {8 * size / source.images.numel():.4f} bits per "
                f"sub-pixel, in {time.perf_counter() - start:.1f} s")
    images = decode(model, _read(args.data), backend=backend, progress=True)
    write_array(args.out, images.numpy())
    return f"wrote {args.out}: {len(images)} images, decoded in {time.perf_counter() - start:.1f} s"


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with stops_raise():
            print(run(args))
    except (UsageError, CodecError, ValueError) as err:
        return report(PROGRAM, err)
    except KeyboardInterrupt as stop:
        return report_stop(PROGRAM, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
