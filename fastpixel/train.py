"""`python -m fastpixel.train`: training any family (PixelCNN++ by default, `--model pixelcnn`
or `--model gated`), on the CPU, one GPU, or many through `torchrun` + DistributedDataParallel.

    python -m fastpixel.train --data_set mnist --data_dir data --save_dir runs/mnist --nr_resnet 3 --nr_filters 64
    python -m fastpixel.train --model gated --data_set mnist --hidden-fmaps 60 --hidden-layers 8 --save_dir runs/gated
    torchrun --standalone --nproc_per_node 2 -m fastpixel.train --data_set mnist ...

The masked families take `--causal_ksize`, `--hidden_ksize`, `--hidden_fmaps`,
`--out_hidden_fmaps`, `--hidden_layers` and `--color_levels` (unset ones take the family's
defaults: fastpixel.PixelCNNConfig, fastpixel.GatedConfig); PixelCNN++ takes `--nr_resnet`,
`--nr_filters`, `--nr_logistic_mix` and the rest of the original's flags.

Batches and learning rate: `--batch_size` is per process, so one optimiser step sees
`batch_size * world_size` images (the global batch), and DDP averages the gradients over
it: `--lr` is the rate for that global batch and is not rescaled with the world size. The
learning rate decays by `--lr_decay` every step.

Nothing is lost when a run is killed: `save_dir/model.safetensors` (the EMA model, for
`fastpixel.load(save_dir)`) and then `save_dir/state.pt` (model, EMA, optimiser, step; loads
with `weights_only=True`, sealed with a SHA-256 digest) are written atomically, in that order,
so the model file is never older than the state, and `--resume` continues from the last state
with the same losses as a run that was never stopped. Each epoch's data order depends only on
(seed, epoch), so a resumed epoch skips exactly the batches it did, and each step's dropout
noise only on (seed, rank, epoch, batch), so no RNG state needs saving. One run at a time
holds a save_dir (a lock on `save_dir/.lock`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .io.checkpoint import MODEL_FILE, load, new_folders_removed_if_empty, save, write_atomically, written_together
from .io.data import DATASETS, DataError, load_dataset
from .io.grid import class_columns, save_grid
from .io.integrity import load_sealed, sealed
from .memory import refuse_beyond_memory
from .models.families import NAMES as FAMILY_NAMES
from .models.families import family_named
from .models.footprint import values_held
from .models.pixelcnnpp import mixture
from .models.pixelcnnpp.config import NONLINEARITIES, ModelConfig
from .models.pixelcnnpp.model import PixelCNNpp
from .sampling import nll_sum, sample, to_model_input
from .usage import (Parser, UsageError, check_writable, leave_process_group, report, report_stop, stop_code,
                    stops_raise)

PROGRAM = "python -m fastpixel.train"
STATE_FILE = "state.pt"
LOCK_FILE = ".lock"
STATE_KEYS = ("model", "ema", "optimizer", "schedule", "step", "epoch", "batch_in_epoch", "world", "config", "args")
MAX_NONFINITE_IN_A_ROW = 5
MAX_GRID = 1024  # images in a sample grid: drawn at every epoch's end, so bounded
COPIES_OF_THE_WEIGHTS = 5  # training holds the weights, their gradients, Adam's two moments and the EMA
# What a training step's peak holds per byte of its layers' outputs (autograd also keeps the
# nonlinearities' inputs and outputs): measured 3.8-4.1 for PixelCNN++ 2/48/5 at batch 16 and 64
# on the CPU, run alone (tests/test_train.py checks the estimate against a measured peak).
ACTIVATIONS_HELD = 4
# What a resumed run takes from the run it continues unless given, and refuses when given
# otherwise: the architecture, the data and its order, and the optimisation (a saved optimiser
# would silently override a new --lr; bf16 rounds otherwise). Every other option it also takes from the run unless
# given (--max_epochs, --num_samples ...), and a value given there simply applies.
RESUME_MUST_MATCH = ("model", "causal_ksize", "hidden_ksize", "hidden_fmaps", "out_hidden_fmaps", "hidden_layers",
                     "color_levels", "data_set", "max_train_images", "nr_resnet", "nr_filters", "nr_logistic_mix",
                     "resnet_nonlinearity", "dropout_p", "class_conditional", "coordconv", "nonlocal_block", "seed",
                     "lr", "lr_decay", "polyak_decay", "focal", "gamma", "grad_clip", "amp",
                     "label_ce", "label_ce_images")
# Options that belong to this invocation, never taken from the run.
NOT_INHERITED = ("resume", "init_from", "save_dir", "given")


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    unset = object()
    typed = p.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in p._actions if a.dest != "help"}))
    args = p.parse_args(argv)
    args.given = sorted(name for name, value in vars(typed).items() if value is not unset)  # what --resume may not override
    return args


def parser() -> Parser:
    """The command line's options (the tests read them)."""
    p = Parser(PROGRAM, __doc__)
    p.add_argument("--model", choices=FAMILY_NAMES, default="pixelcnnpp", help="the model family")
    p.add_argument("--data_set", "--dataset", choices=DATASETS, default="cifar10", help="the data set to train on")
    p.add_argument("--data_dir", default="data", help="where the data set lives (downloaded there when missing)")
    p.add_argument("--no_download", action="store_true", help="never download missing data")
    p.add_argument("--max_train_images", type=int, default=None,
                   help="train on the first this many training images only (default: all)")
    p.add_argument("--save_dir", default="save", help="checkpoints, metrics.jsonl, curves.png and samples")
    masked = p.add_argument_group("pixelcnn and gated families (unset: the family's defaults)")
    for flag, help_text in (("causal_ksize", "kernel size of the first (mask A) layer"),
                            ("hidden_ksize", "kernel size of the later (mask B) layers"),
                            ("hidden_fmaps", "features per stack (gated) or h (pixelcnn); RGB: divisible by 3"),
                            ("out_hidden_fmaps", "features of the output layer; RGB: divisible by 3"),
                            ("hidden_layers", "gated blocks (gated) or residual blocks (pixelcnn)"),
                            ("color_levels", "levels per sub-pixel (2..256)")):
        masked.add_argument(f"--{flag}", type=int, default=None, help=help_text)
    pp = p.add_argument_group("PixelCNN++ (--model pixelcnnpp)")
    pp.add_argument("--nr_resnet", type=int, default=5, help="gated ResNet blocks per stage")
    pp.add_argument("--nr_filters", type=int, default=160, help="features of every layer")
    pp.add_argument("--nr_logistic_mix", type=int, default=10, help="logistic components per sub-pixel")
    pp.add_argument("--resnet_nonlinearity", choices=NONLINEARITIES, default="concat_elu",
                    help="the nonlinearity of the gated ResNet blocks")
    pp.add_argument("--dropout_p", type=float, default=0.5, help="dropout rate inside the gated ResNet blocks")
    pp.add_argument("-ac", "--coordconv", action="store_true", help="add CoordConv channels")
    pp.add_argument("-nl", "--nonlocal", dest="nonlocal_block", action="store_true", help="add a causal non-local block")
    pp.add_argument("-fl", "--focal", action="store_true", help="train with focal loss (bits/dim still reported plainly)")
    pp.add_argument("--gamma", type=float, default=2.0, help="focal loss exponent")
    p.add_argument("--class_conditional", action="store_true", help="condition on the data set's labels")
    p.add_argument("--label_ce", type=float, default=0.0,
                   help="class-conditional runs: weight of a cross-entropy term that teaches the model to tell the "
                        "classes apart, the classifier argmax over y of p(x | y) scored on each batch's first "
                        "--label_ce_images images (in bits/dim, like the loss; 0: plain likelihood)")
    p.add_argument("--label_ce_images", type=int, default=4,
                   help="images per batch scored under every label for --label_ce (each costs num_classes - 1 "
                        "extra forward passes)")
    p.add_argument("--max_epochs", "--epochs", type=int, default=5000, help="stop after this many epochs")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimiser steps in all")
    p.add_argument("--batch_size", type=int, default=16, help="images per process per step")
    p.add_argument("--init_batch_size", type=int, default=100, help="images for the data-dependent initialisation")
    p.add_argument("--lr", "--learning_rate", type=float, default=1e-3, help="Adam's learning rate for the global batch")
    p.add_argument("--lr_decay", type=float, default=0.999995, help="learning-rate factor per step")
    p.add_argument("--polyak_decay", type=float, default=0.9995, help="EMA decay of the weights per step")
    p.add_argument("--grad_clip", "--max_norm", type=float, default=None,
                   help="clip the gradient norm to this (default: no clipping)")
    p.add_argument("--seed", type=int, default=1, help="fixes the initialisation, data order and dropout")
    p.add_argument("--save_interval", type=int, default=1, help="save every this many epochs")
    p.add_argument("--save_every_steps", type=int, default=0, help="also save every this many steps (0: off)")
    p.add_argument("--log_every", type=int, default=100, help="append a metrics line every this many steps")
    p.add_argument("-r", "--resume", "--load_params", action="store_true",
                   help="continue the run in save_dir (its architecture and optimisation settings are read from it)")
    p.add_argument("--init_from", default=None,
                   help="start from these weights (a model file, save_dir or bundled name) instead of a fresh "
                        "data-dependent initialisation; the optimiser starts afresh")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="bf16 autocast: bf16 activations, float32 weights, loss and sums (on a CPU without AMX, slower "
                        "than float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward pass: minutes of compiling at the start of every run "
                        "and resume, then faster steps (15%% on this project's 2-core CPU)")
    p.add_argument("--num_samples", type=int, default=16, help="images in each sample grid (0: none)")
    p.add_argument("--eval_batch_size", type=int, default=100, help="images per forward pass in evaluation")
    p.add_argument("--max_test_images", type=int, default=None, help="evaluate on at most this many test images")
    return p


# ---------------------------------------------------------------------------------- processes
@dataclass
class Processes:
    """Where this process stands among those `torchrun` started (one, without torchrun)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values


def start_processes() -> Processes:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world, device)


# ---------------------------------------------------------------------------------- data order
def epoch_batches(n: int, epoch: int, seed: int, global_batch: int) -> torch.Tensor:
    """This epoch's global batches of image indices, (steps, global_batch): a permutation that
    depends only on (seed, epoch), cut into full batches (the remainder is dropped)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    order = torch.randperm(n, generator=generator)
    steps = n // global_batch
    return order[:steps * global_batch].view(steps, global_batch)


def seed_step(seed: int, rank: int, epoch: int, batch: int) -> None:
    """Seed the global generators (dropout) from where training stands: each process draws
    different masks, and a resumed run draws the same ones as a run that never stopped."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, epoch, batch]).generate_state(1, dtype=np.uint64)[0]))


def init_indices(n: int, seed: int, size: int) -> torch.Tensor:
    """The images of the data-dependent initialisation: the same on every process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


class _Images(torch.utils.data.Dataset):
    """(image, label) pairs for a DataLoader; label 0 where the data set has none."""

    def __init__(self, data):
        self.images = data.images
        self.labels = data.labels if data.labels is not None else torch.zeros(len(data.images), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


# ---------------------------------------------------------------------------------- training state
class Trainer:
    """Model, EMA copy, optimiser and schedule, and the counters that say where training is."""

    def __init__(self, args: argparse.Namespace, config: ModelConfig, procs: Processes):
        self.args, self.procs = args, procs
        self.model = family_named(args.model).model(config).to(procs.device)
        self.ema = None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.schedule = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=args.lr_decay)
        self.step = 0            # optimiser steps taken (skipped non-finite steps do not count)
        self.epoch = 0           # current epoch
        self.batch_in_epoch = 0  # batches of the current epoch consumed
        self.epoch_bits: list[float] = []  # train bits/dim of those batches
        self.data = ""           # data_identity of the training set
        self.saved_step = None   # step of the last checkpoint in save_dir, if any
        self.nonfinite_in_a_row = 0

    def initialise(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """PixelCNN++'s data-dependent initialisation; the masked families start as built."""
        if isinstance(self.model, PixelCNNpp):
            x = to_model_input(images.to(self.procs.device))
            self.model.data_init(x, None if labels is None else labels.to(self.procs.device))
        self.ema = copy.deepcopy(self.model).eval()

    def start_from(self, path: str) -> None:
        """Model and EMA from a saved model of the same configuration (a warm start), or of the
        same one without classes for a class-conditional run: the per-class biases start fresh."""
        try:
            saved = load(path, family=self.args.model)
        except (OSError, ValueError) as err:
            raise UsageError(f"--init_from: {err}") from None
        config = self.model.config
        adds_classes = saved.config.num_classes is None and dataclasses.replace(saved.config, num_classes=config.num_classes) == config
        if saved.config != config and not adds_classes:
            raise UsageError(f"--init_from: {path} has configuration {saved.config.to_json()}, "
                             f"this run needs {config.to_json()} (or the same without num_classes)")
        self.model.load_state_dict(saved.state_dict(), strict=not adds_classes)
        self.ema = copy.deepcopy(self.model).eval()

    @torch.no_grad()
    def update_ema(self) -> None:
        # Warm-up as in TensorFlow's ExponentialMovingAverage(num_updates): without it the
        # average of a short run stays dominated by the random initial weights (0.9995^2000 = 37%).
        decay = min(self.args.polyak_decay, (1 + self.step) / (10 + self.step))
        for ema, p in zip(self.ema.parameters(), self.model.parameters()):
            ema.lerp_(p, 1 - decay)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "epoch_bits": self.epoch_bits, "data": self.data,
                "world": self.procs.world, "config": self.model.config.to_json(), "args": json.dumps(vars(self.args))}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema = copy.deepcopy(self.model).eval()
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for p in self.model.parameters():  # Adam's state maps onto parameters by position: check it fits
            moments = self.optimizer.state.get(p, {}).get("exp_avg")
            if moments is not None and moments.shape != p.shape:
                raise ValueError(f"its optimiser state holds a {tuple(moments.shape)} moment for a parameter of "
                                 f"shape {tuple(p.shape)}")
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.epoch_bits = list(state.get("epoch_bits", []))
        self.saved_step = self.step

    def save(self, save_dir: Path) -> None:
        """The EMA model, then the training state, both written before either replaces its old
        file: a failed write (a full disk) leaves the last checkpoint whole, and a kill between
        the two renames leaves the model one checkpoint ahead of the state, never behind it."""
        state = self.state_dict()
        with written_together():
            save(self.ema, save_dir / MODEL_FILE, metadata={"step": str(self.step)})
            write_atomically(save_dir / STATE_FILE, lambda tmp: Path(tmp).write_bytes(sealed(state)))
        self.saved_step = self.step

    def checkpoint_note(self, save_dir: Path) -> str:
        """What a stopped run leaves to resume from, in words."""
        if self.saved_step is None:
            return f"no checkpoint was written to {save_dir}"
        return f"the last checkpoint in {save_dir} (step {self.saved_step}) is intact"


def data_identity(data) -> str:
    """A cheap fingerprint of a training set, so --resume notices other data: its shape, and the
    SHA-256 of at most 1000 evenly spaced images and of all labels."""
    images = data.images
    digest = hashlib.sha256(images[torch.linspace(0, len(images) - 1, min(len(images), 1000)).long()].numpy())
    if data.labels is not None:
        digest.update(data.labels.numpy())
    return f"{len(images)} images {'x'.join(map(str, images.shape[1:]))}, sha256 {digest.hexdigest()[:16]}"


MASKED_FLAGS = ("causal_ksize", "hidden_ksize", "hidden_fmaps", "out_hidden_fmaps", "hidden_layers", "color_levels")


def config_from(args: argparse.Namespace, dataset):
    _, channels, height, width = dataset.images.shape
    num_classes = dataset.num_classes if args.class_conditional else None
    try:
        if args.model != "pixelcnnpp":
            sizes = {name: getattr(args, name) for name in MASKED_FLAGS if getattr(args, name) is not None}
            codes = dataset.images.dtype == torch.int64
            if codes and args.color_levels is None:
                raise UsageError(f"--data_set codes needs --color_levels K, the number of codes (the training "
                                 f"codes reach {int(dataset.images.max())})")
            return family_named(args.model).config(image_size=(height, width), channels=channels,
                                                   num_classes=num_classes, categorical_inputs=codes, **sizes)
        if dataset.images.dtype == torch.int64:
            raise UsageError("maps of codes need a masked family: pass --model gated or --model pixelcnn")
        return ModelConfig(image_size=(height, width), channels=channels, nr_resnet=args.nr_resnet,
                           nr_filters=args.nr_filters, nr_logistic_mix=args.nr_logistic_mix,
                           num_classes=dataset.num_classes if args.class_conditional else None,
                           dropout=args.dropout_p, resnet_nonlinearity=args.resnet_nonlinearity,
                           coordconv=args.coordconv, nonlocal_block=args.nonlocal_block)
    except ValueError as err:
        raise UsageError(f"the {args.model} model cannot take {args.data_set} images ({height}x{width}x{channels}): {err}") from None


def check_memory(args: argparse.Namespace, config) -> None:
    """Refuse, before building anything, a run whose memory cannot exist here (`--nr_logistic_mix
    1000000` asked for 940 GB in its first forward pass)."""
    try:
        refuse_beyond_memory(memory_estimate(args, config), "this run",
                             "use a smaller model, --batch_size or --init_batch_size")
    except ValueError as err:
        raise UsageError(str(err)) from None


def memory_estimate(args: argparse.Namespace, config) -> int:
    """Bytes a training step's peak holds: the training state (weights, gradients, Adam's
    moments, the EMA) and one batch's activations, in float32."""
    weights, per_image = values_held(family_named(args.model).model, config)
    step_images = args.batch_size + (args.label_ce_images * (config.num_classes - 1) if args.label_ce else 0)
    return 4 * (weights * COPIES_OF_THE_WEIGHTS + per_image * ACTIVATIONS_HELD * max(step_images, args.init_batch_size))


def check_args(args: argparse.Namespace, procs: Processes) -> None:
    for name in ("lr", "lr_decay", "polyak_decay", "gamma", "dropout_p", "grad_clip"):
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            raise UsageError(f"--{name} must be a finite number, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must lie in 0 .. 2**63 - 1, got {args.seed}")
    if args.resume and args.init_from:
        raise UsageError("--init_from starts a new run and --resume continues one: pass one of them")
    positive = ["nr_resnet", "nr_filters", "nr_logistic_mix", "batch_size", "init_batch_size", "max_epochs",
                "save_interval", "log_every", "eval_batch_size"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("max_steps", "max_test_images", "max_train_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.save_every_steps < 0 or args.num_workers < 0 or args.num_samples < 0:
        raise UsageError("--save_every_steps, --num_workers and --num_samples must not be negative")
    if args.num_workers > (os.cpu_count() or 1):
        raise UsageError(f"--num_workers {args.num_workers}: this machine has {os.cpu_count()} cores; more loader "
                         "processes than cores only compete with training")
    if args.num_samples > MAX_GRID:
        raise UsageError(f"--num_samples {args.num_samples}: a sample grid holds at most {MAX_GRID} images")
    if not 0 < args.lr_decay <= 1 or not 0 <= args.polyak_decay < 1:
        raise UsageError("--lr_decay must lie in (0, 1] and --polyak_decay in [0, 1)")
    if not args.lr > 0 or (args.grad_clip is not None and not args.grad_clip > 0) or args.gamma < 0:
        raise UsageError("--lr and --grad_clip must be positive and --gamma must not be negative")
    if not 0 <= args.label_ce < math.inf or not args.label_ce_images >= 1:
        raise UsageError(f"--label_ce must be a finite number >= 0 (got {args.label_ce}) and --label_ce_images "
                         f"positive (got {args.label_ce_images})")
    if args.label_ce and not args.class_conditional:
        raise UsageError("--label_ce teaches a class-conditional model its labels: add --class_conditional")
    if args.label_ce and args.label_ce_images > args.batch_size:
        raise UsageError(f"--label_ce_images {args.label_ce_images} exceeds --batch_size {args.batch_size}")
    if args.model == "pixelcnnpp":
        given = [f"--{name}" for name in MASKED_FLAGS if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} shape the pixelcnn and gated families; pass --model pixelcnn or "
                             "--model gated, or use PixelCNN++'s --nr_resnet/--nr_filters/--nr_logistic_mix")
    elif args.focal or args.coordconv or args.nonlocal_block:
        raise UsageError(f"--focal, --coordconv and --nonlocal are PixelCNN++ options; the {args.model} family has none")


def load_data(args: argparse.Namespace, procs: Processes):
    try:
        # Rank 0 downloads when needed; the others wait, then read what it wrote.
        if procs.main:
            train = load_dataset(args.data_set, args.data_dir, "train", download=not args.no_download)
            test = load_dataset(args.data_set, args.data_dir, "test", download=not args.no_download)
        if procs.world > 1:
            dist.barrier()
        if not procs.main:
            train = load_dataset(args.data_set, args.data_dir, "train", download=False)
            test = load_dataset(args.data_set, args.data_dir, "test", download=False)
    except DataError as err:
        raise UsageError(str(err)) from None
    if args.class_conditional and (train.labels is None or test.labels is None):
        raise UsageError(f"--class_conditional needs labels, and {args.data_set} in {args.data_dir} has none")
    if args.max_train_images is not None:
        train.images = train.images[:args.max_train_images]
        train.labels = None if train.labels is None else train.labels[:args.max_train_images]
    if args.max_test_images is not None:
        test.images = test.images[:args.max_test_images]
        test.labels = None if test.labels is None else test.labels[:args.max_test_images]
    global_batch = args.batch_size * procs.world
    if len(train.images) < global_batch:
        raise UsageError(f"{len(train.images)} training images cannot fill one global batch of {global_batch}")
    return train, test


# ---------------------------------------------------------------------------------- the loop
class Stop(Exception):
    """Training ends early (a signal, or non-finite numbers), with the process's exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def model_input(images: torch.Tensor) -> torch.Tensor:
    """A batch as models take it: codes (N, 1, H, W) as (N, H, W), images on the [-1, 1] grid."""
    return images[:, 0] if images.dtype == torch.int64 else to_model_input(images)


def bits_per_dim_of(nats: torch.Tensor, config) -> torch.Tensor:
    return nats / (config.channels * config.shape[0] * config.shape[1] * math.log(2))


def train(args: argparse.Namespace, procs: Processes) -> Trainer:
    check_args(args, procs)
    save_dir = check_writable(args.save_dir, "--save_dir", directory=True) if procs.main else Path(args.save_dir)
    with exclusive(save_dir, procs.main):
        return _train(args, procs, save_dir)


@contextlib.contextmanager
def exclusive(save_dir: Path, main: bool):
    """Hold save_dir for this run alone: an flock on save_dir/.lock (which holds the PID), released
    when the process ends however it ends. Then remove the temporaries killed runs left. A run that
    wrote nothing leaves nothing, not even the lock or save_dir."""
    if not main:
        yield
        return
    lock = save_dir / LOCK_FILE
    held = False
    with new_folders_removed_if_empty(save_dir):
        save_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
                raise UsageError(f"--save_dir {save_dir} is in use by another training run (PID {holder}); "
                                 "wait for it to end, or choose another --save_dir") from None
            held = True
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            for stale in save_dir.glob(".*.tmp"):  # write_atomically's, from killed runs
                stale.unlink(missing_ok=True)
            yield
        finally:
            if held and [p.name for p in save_dir.iterdir()] == [LOCK_FILE]:
                lock.unlink()
            os.close(descriptor)


def read_state(state_path: Path, args: argparse.Namespace, procs: Processes, save_dir: Path) -> dict:
    """The training state a --resume continues from, once it is clear that it is whole; the
    run's own options fill in those this command did not give (`args` is updated), and one
    given otherwise that would make the resume inexact is refused, naming both values."""
    if not state_path.is_file():
        raise UsageError(f"--resume: no training state at {state_path}")
    try:
        state = load_sealed(state_path)
        missing = [key for key in STATE_KEYS if key not in state]
        saved_args = json.loads(state["args"]) if not missing else {}
    except Exception as err:  # noqa: BLE001  (a corrupt file fails in many ways)
        raise UsageError(f"--resume: cannot read {state_path}: {err}") from None
    if missing:
        raise UsageError(f"--resume: {state_path} is not a whole training state: it lacks {', '.join(missing)}")
    given = set(getattr(args, "given", vars(args)))
    run = {**vars(parse_args([])), **saved_args}  # a state written before an option existed ran with its default
    conflicts = [f"--{name} {_shown(getattr(args, name))} (the run has {_shown(run[name])})"
                 for name in RESUME_MUST_MATCH if name in given and getattr(args, name) != run[name]]
    saved_world = state.get("world", 1)
    if "batch_size" not in given and run["batch_size"] * saved_world % procs.world == 0:
        args.batch_size = run["batch_size"] * saved_world // procs.world
    if args.batch_size * procs.world != run["batch_size"] * saved_world:
        conflicts.append(f"--batch_size {args.batch_size} times {procs.world} processes (the run has "
                         f"{run['batch_size']} times {saved_world})")
    if conflicts:
        raise UsageError(f"--resume: {'; '.join(conflicts)} would not continue the run in {save_dir} exactly; "
                         "leave those options out to take the run's")
    for name, value in run.items():
        if name not in given and name not in NOT_INHERITED and name != "batch_size" and hasattr(args, name):
            setattr(args, name, value)
    return state


def _shown(value) -> str:
    return "(unset)" if value is None else str(value)


def _train(args: argparse.Namespace, procs: Processes, save_dir: Path) -> Trainer:
    state_path = save_dir / STATE_FILE
    if args.resume:
        state = read_state(state_path, args, procs, save_dir)
        check_args(args, procs)  # the options taken from the run, with those given
    torch.manual_seed(args.seed)
    train_set, test_set = load_data(args, procs)
    config = config_from(args, train_set)
    check_memory(args, config)
    trainer = Trainer(args, config, procs)
    trainer.data = data_identity(train_set)
    if args.resume:
        if state.get("data", trainer.data) != trainer.data:
            raise UsageError(f"--resume: the training data in {args.data_dir} ({trainer.data}) are not those of the "
                             f"run in {save_dir} ({state['data']})")
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise UsageError(f"--resume: {state_path} does not fit this run: {err}") from None
    else:
        if state_path.exists():
            raise UsageError(f"{state_path} exists: pass --resume to continue that run, or choose another --save_dir")
        if args.init_from:
            trainer.start_from(args.init_from)
        else:
            size = min(args.init_batch_size, len(train_set.images))
            index = init_indices(len(train_set.images), args.seed, size)
            trainer.initialise(train_set.images[index], None if config.num_classes is None else train_set.labels[index])
    if procs.main:
        write_atomically(save_dir / "config.json", lambda tmp: Path(tmp).write_text(config.to_json() + "\n"))

    net = trainer.model
    if procs.world > 1:
        device_ids = [procs.device.index] if procs.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if args.compile:  # the training forward alone: checkpoints, the EMA and evaluation use the plain modules
        net = torch.compile(net)
    # A signal ends the run after the current step or evaluation batch, with a checkpoint
    # (all processes agree when).
    stop_signal = []
    previous_handlers = (signal.signal(signal.SIGTERM, lambda signum, _: stop_signal.append(signum)),
                         signal.signal(signal.SIGINT, lambda signum, _: stop_signal.append(signum)))

    global_batch = args.batch_size * procs.world
    log = MetricsLog(save_dir / "metrics.jsonl", procs.main)
    log.keep_until(trainer.step, trainer.epoch) if args.resume else log.keep_until(-1, 0)
    first_step = trainer.step
    try:
        try:
            while trainer.epoch < args.max_epochs and not reached_max_steps(trainer, args):
                batches = epoch_batches(len(train_set.images), trainer.epoch, args.seed, global_batch)
                run_epoch(trainer, net, batches, train_set, args, procs, log, stop_signal, save_dir)
                if trainer.batch_in_epoch < len(batches):  # --max_steps fell inside the epoch: saved as unfinished,
                    if trainer.step > first_step:         # and reported as an epoch's end is
                        evaluate_and_show(trainer, test_set, args, procs, log, stop_signal, save_dir,
                                          f"samples_step{trainer.step:07d}.png")
                    break
                finish_epoch(trainer, test_set, args, procs, log, stop_signal, save_dir)
            if procs.main:
                trainer.save(save_dir)
        except OSError as err:  # a full disk, a lost mount: one line, and what there is to resume from
            raise Stop(f"cannot go on: {err.strerror or err}{f' ({err.filename})' if err.filename else ''}; "
                       f"{trainer.checkpoint_note(save_dir)}", 2) from None
    except Stop as why:
        if procs.main:
            with contextlib.suppress(OSError):  # what the run got to; no evaluation delays the stop
                plot_curves(log.records(), save_dir / "curves.png")
            print(f"{PROGRAM}: {why}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handlers[0])
        signal.signal(signal.SIGINT, previous_handlers[1])
    if procs.main:
        tested = [r["test_bpd"] for r in log.records() if "test_bpd" in r]
        score = f"; test bits/dim {tested[-1]:.4f} (EMA weights)" if tested else ""
        print(f"done: {trainer.step} steps, {trainer.epoch} epochs{score}; EMA model in {save_dir / MODEL_FILE}, "
              f"curves and samples in {save_dir}")
    return trainer


def reached_max_steps(trainer: Trainer, args) -> bool:
    return args.max_steps is not None and trainer.step >= args.max_steps


class MetricsLog:
    """metrics.jsonl, one JSON object per line, appended by the main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def append(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def records(self) -> list[dict]:
        """The records; a line a kill cut short is left out."""
        if not self.path.exists():
            return []
        return [record for line in self.path.read_text().splitlines() if (record := _record(line)) is not None]

    def keep_until(self, step: int, epoch: int) -> None:
        """Keep what a checkpoint at (`step`, `epoch`) had seen logged, and drop the rest, which a
        run killed after that checkpoint wrote and the resumed run writes again: later steps,
        the test of an epoch the checkpoint had not finished (logged at the same step, just
        before the epoch's checkpoint), and a torn last line. Step -1 (a new run) drops all."""
        def seen(record: dict) -> bool:
            untested_epoch = "test_bpd" in record and not record.get("partial_epoch") and record.get("epoch", 0) >= epoch
            return record.get("step", step + 1) <= step and not untested_epoch

        if self.enabled and self.path.exists():
            kept = "".join(json.dumps(r) + "\n" for r in self.records() if seen(r))
            write_atomically(self.path, lambda tmp: Path(tmp).write_text(kept))


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def run_epoch(trainer: Trainer, net, batches: torch.Tensor, data, args, procs: Processes, log: MetricsLog,
              stop_signal: list, save_dir: Path) -> None:
    """Train on this epoch's remaining batches."""
    config = trainer.model.config
    device = procs.device
    # The loader gets its own generator: it would otherwise draw from the global one when it
    # starts, and a resumed epoch (which starts a loader mid-epoch) would then drop out differently.
    loader = torch.utils.data.DataLoader(
        _Images(data), batch_sampler=[b[procs.rank * args.batch_size:(procs.rank + 1) * args.batch_size].tolist()
                                      for b in batches[trainer.batch_in_epoch:]],
        num_workers=args.num_workers, generator=torch.Generator())
    net.train()
    total = len(batches)
    if args.max_steps is not None:  # the bar ends where the run will
        total = min(total, trainer.batch_in_epoch + max(0, args.max_steps - trainer.step))
    with tqdm(total=total, initial=trainer.batch_in_epoch, disable=not procs.main, desc=f"epoch {trainer.epoch}",
              unit="batch") as bar:  # closed before any message, which would otherwise land on its line
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            if reached_max_steps(trainer, args):
                break
            seed_step(args.seed, procs.rank, trainer.epoch, trainer.batch_in_epoch)
            x = model_input(images.to(device, non_blocking=True))
            labels = labels.to(device) if config.num_classes is not None else None
            scored = args.label_ce_images if args.label_ce else 0
            x_all, labels_all = with_other_labels(x, labels, scored, config.num_classes) if scored else (x, labels)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                params = net(x_all, labels_all).float()  # one call: DDP allows one forward per backward
            plain = trainer.model.nll(params[:len(x)], x)
            loss = mixture.focal_nll(params[:len(x)], x, args.gamma) if args.focal else plain
            loss = bits_per_dim_of(loss.mean(), config)
            if scored:
                others = trainer.model.nll(params[len(x):], x_all[len(x):]).view(scored, -1)
                label_ce = label_cross_entropy(plain[:scored], others)
                loss = loss + args.label_ce * bits_per_dim_of(label_ce, config)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            finite = torch.stack([torch.isfinite(loss)] + [p.grad.isfinite().all() for p in trainer.model.parameters()
                                                           if p.grad is not None]).all()
            # One vote per process, summed over processes: [non-finite?, stop asked?, train bits/dim, label_ce].
            votes = torch.stack([(~finite).double(), torch.tensor(float(bool(stop_signal)), dtype=torch.float64, device=device),
                                 bits_per_dim_of(plain.detach().mean(), config).double(),
                                 label_ce.detach().double() if scored else torch.zeros((), dtype=torch.float64, device=device)])
            votes = procs.all_sum(votes).tolist()
            trainer.batch_in_epoch += 1
            if votes[0] > 0:
                trainer.nonfinite_in_a_row += 1
                log.append(step=trainer.step, epoch=trainer.epoch, event="non-finite loss, step skipped")
                if trainer.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise Stop(f"{MAX_NONFINITE_IN_A_ROW} non-finite losses in a row at step {trainer.step}; stopping: "
                               f"{trainer.checkpoint_note(save_dir)} (try a lower --lr or --grad_clip)")
            else:
                trainer.nonfinite_in_a_row = 0
                if args.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), args.grad_clip)
                trainer.optimizer.step()
                # Finite loss and gradients can still step to infinite weights (a huge --lr): they
                # are never counted, averaged or saved. Every process holds the same weights.
                if not torch.stack([p.isfinite().all() for p in trainer.model.parameters()]).all():
                    raise Stop(f"step {trainer.step + 1} made the weights non-finite; stopping without saving: "
                               f"{trainer.checkpoint_note(save_dir)} (try a lower --lr or --grad_clip)")
                trainer.schedule.step()
                trainer.update_ema()
                trainer.step += 1
            train_bpd = float(votes[2]) / procs.world
            trainer.epoch_bits.append(train_bpd)
            seen += len(x) * procs.world
            images_per_sec = seen / (time.perf_counter() - started)
            bar.set_postfix(bpd=f"{train_bpd:.3f}", img_s=f"{images_per_sec:.1f}")
            bar.update(1)
            last = reached_max_steps(trainer, args) or votes[1] > 0  # a run's last step is always logged
            if (trainer.step % args.log_every == 0 or last) and votes[0] == 0:
                log.append(step=trainer.step, epoch=trainer.epoch, train_bpd=train_bpd, lr=trainer.schedule.get_last_lr()[0],
                           images_per_sec=images_per_sec, **({"label_ce": float(votes[3]) / procs.world} if scored else {}))
            if args.save_every_steps and trainer.step % args.save_every_steps == 0 and votes[0] == 0 and procs.main:
                trainer.save(save_dir)
            if votes[1] > 0:
                stop_for_signal(trainer, stop_signal, procs, save_dir)


def with_other_labels(x: torch.Tensor, labels: torch.Tensor, scored: int, classes: int):
    """The batch, then its first `scored` images again under each of the other labels, image by
    image: image i under labels[i] + 1, labels[i] + 2, ... (mod classes)."""
    shifts = torch.arange(1, classes, device=labels.device)
    others = (labels[:scored, None] + shifts) % classes
    return torch.cat([x, x[:scored].repeat_interleave(classes - 1, dim=0)]), torch.cat([labels, others.flatten()])


def label_cross_entropy(true_nll: torch.Tensor, other_nll: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, in nats, of the classifier softmax over y of log p(x | y) (a uniform
    prior), given each image's nll under its own label (n,) and under the others (n, classes - 1).
    Plain likelihood holds log p(y | x) at the weight of one image's bits, a few thousandths
    of a bit per dimension: too little pressure to steer hard."""
    logits = -torch.cat([true_nll[:, None], other_nll], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def stop_for_signal(trainer: Trainer, stop_signal: list, procs: Processes, save_dir: Path) -> None:
    """Save, then end the run with exit code 128 + the signal's number (130 SIGINT, 143 SIGTERM)."""
    if procs.main:
        trainer.save(save_dir)
    signum = stop_signal[0] if stop_signal else signal.SIGTERM  # a process the signal did not reach
    raise Stop(f"stopped by {signal.Signals(signum).name} at step {trainer.step}; resume with --resume", 128 + signum)


def finish_epoch(trainer: Trainer, test, args, procs: Processes, log: MetricsLog, stop_signal: list,
                 save_dir: Path) -> None:
    """An epoch's end: its test bits/dim, grid and curves, then a checkpoint."""
    evaluate_and_show(trainer, test, args, procs, log, stop_signal, save_dir,
                      f"samples_epoch{trainer.epoch:04d}.png", epoch_done=True)
    if procs.main and trainer.epoch % args.save_interval == 0:
        trainer.save(save_dir)


def evaluate_and_show(trainer: Trainer, test, args, procs: Processes, log: MetricsLog, stop_signal: list,
                      save_dir: Path, grid_name: str, epoch_done: bool = False) -> None:
    """Test bits/dim of the EMA weights (plain likelihood, at most --max_test_images), a sample
    grid and the curves: at each epoch's end, and where a run stops inside an epoch. The
    evaluation runs a batch at a time with a vote after each, so that a signal is honoured
    within one batch, not after the whole test set; every process runs as many batches."""
    config = trainer.model.config
    share = slice(procs.rank, None, procs.world)
    images = test.images[share]
    labels = None if config.num_classes is None else test.labels[share]
    size = args.eval_batch_size
    nats = 0.0
    for start in range(0, -(-len(test.images) // procs.world), size):
        if start < len(images):
            nats += nll_sum(trainer.ema, images[start:start + size], None if labels is None else labels[start:start + size],
                            batch_size=size)
        if procs.all_sum(torch.tensor([float(bool(stop_signal))], device=procs.device)).item() > 0:
            stop_for_signal(trainer, stop_signal, procs, save_dir)
    total = procs.all_sum(torch.tensor([nats, float(images.numel())], dtype=torch.float64, device=procs.device))
    test_bpd = float(total[0] / (total[1] * math.log(2)))
    epoch_train_bpd = sum(trainer.epoch_bits) / len(trainer.epoch_bits) if trainer.epoch_bits else None
    epoch = trainer.epoch
    if epoch_done:
        trainer.epoch += 1
        trainer.batch_in_epoch = 0
        trainer.epoch_bits = []
    if not procs.main:
        return
    where = f"epoch {epoch}" if epoch_done else f"step {trainer.step} (inside epoch {epoch})"
    log.append(step=trainer.step, epoch=epoch, test_bpd=test_bpd, epoch_train_bpd=epoch_train_bpd,
               **({} if epoch_done else {"partial_epoch": True}))
    print(f"{where}: test bits/dim {test_bpd:.4f} on {len(test.images)} images (EMA weights)")
    if args.num_samples and not config.categorical_inputs:
        try:  # a signal abandons the grid at once (it takes seconds); the next step's vote stops the run
            with stops_raise():
                images = sample(trainer.ema, args.num_samples, seed=0)
            save_grid(images, save_dir / grid_name, class_columns(args.num_samples, config.num_classes))
        except KeyboardInterrupt as stop:
            stop_signal.append(stop_code(stop) - 128)
    plot_curves(log.records(), save_dir / "curves.png")


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["train_bpd"]) for r in records if r.get("train_bpd") is not None]
    test = [(r["step"], r["test_bpd"]) for r in records if "test_bpd" in r]
    if train:
        ax.plot(*zip(*train), label="train (batch)", alpha=0.6)
    if test:
        ax.plot(*zip(*test), marker="o", label="test (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.grid(True, alpha=0.3)
    if train or test:
        ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    with stops_raise():
        procs = start_processes()
        code = _run(args, procs)
    if procs.world > 1:
        leave_process_group(code)
    return code


def _run(args: argparse.Namespace, procs: Processes) -> int:
    """Train; the exit code."""
    try:
        train(args, procs)
    except UsageError as err:
        return report(PROGRAM, err) if procs.main else 2
    except Stop as why:
        return why.code
    except KeyboardInterrupt as stop:  # before the training loop's own handlers were installed
        outcome = "nothing was saved (training had not started)"
        return report_stop(PROGRAM, stop, outcome) if procs.main else stop_code(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
