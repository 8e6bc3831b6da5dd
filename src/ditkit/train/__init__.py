"""`ditkit train`: train a DiT on one CPU, one GPU, or many GPUs and nodes under torchrun (DDP or FSDP2).

    from ditkit.train import TrainOptions, train
    result = train(TrainOptions(data_path="digits", model="DiT-S/2", max_steps=100))

The package, in pipeline order: `options` (the settings and their flags), `batches` (data and the seeded
global-batch order), `step` (one optimizer step, shared with the benchmarks), `checkpoint` (the one writer and
the one reader of training checkpoints), `logging` (log.txt, metrics.jsonl, TensorBoard) and `loop`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ditkit.train.options import PRECISIONS, TrainOptions, add_arguments, options_from_args, validate

__all__ = ["PRECISIONS", "TrainOptions", "TrainResult", "add_arguments", "run", "train", "validate"]


def __getattr__(name: str) -> Any:
    """`train` and `TrainResult` load the loop (and the data stack) on first use, so that importing
    `ditkit.train.step` (the benchmarks do) stays as light as the step itself."""
    if name in ("train", "TrainResult"):
        from ditkit.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'ditkit.train' has no attribute {name!r}")


def run(args: argparse.Namespace) -> int:
    """`ditkit train`: the flags as TrainOptions, then the run."""
    from ditkit.train.loop import train

    result = train(TrainOptions(**options_from_args(args)))
    if result.stopped_by_signal:
        print(f"checkpoint written at step {result.step}; exiting cleanly", file=sys.stderr)
    return 0
