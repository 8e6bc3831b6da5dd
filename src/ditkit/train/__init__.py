"""`ditkit train`: train a DiT on one CPU, one GPU, or many GPUs and nodes under torchrun (DDP or FSDP2).

    from ditkit.train import TrainOptions, train
    result = train(TrainOptions(data_path="digits", model="DiT-S/2", max_steps=100))

The package, in pipeline order: `options` (the settings and their flags), `batches` (data and the seeded
global-batch order), `step` (one optimizer step, shared with the benchmarks), `checkpoint` (the one writer and
the one reader of training checkpoints), `logging` (log.txt, metrics.jsonl, TensorBoard) and `loop`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from ditkit.train.options import PRECISIONS, TrainOptions, add_arguments, options_from_args, validate

__all__ = ["PRECISIONS", "TrainOptions", "TrainResult", "add_arguments", "run", "train", "train_as_command",
           "validate"]


def __getattr__(name: str) -> Any:
    """`train` and `TrainResult` load the loop (and the data stack) on first use, so that importing
    `ditkit.train.step` (the benchmarks do) stays as light as the step itself."""
    if name in ("train", "TrainResult"):
        from ditkit.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'ditkit.train' has no attribute {name!r}")


def _finished(signum: int, _frame: Any) -> None:
    """SIGTERM after training returned: the run is over and its checkpoint written; the process is exiting."""


def train_as_command(opts: TrainOptions) -> Any:
    """`train(opts)` as `ditkit train` runs it, in a process that ends when it returns.

    `train` turns a SIGTERM into a checkpoint and a clean stop, and on returning puts back the handler it found.
    Here that handler ignores SIGTERM, so that a scheduler's SIGTERM landing after the last checkpoint (the job
    is finishing as it is stopped) lets the process exit 0 instead of killing it with -15. A Python handler
    rather than SIG_IGN: programs started from this process get the default back.
    """
    from ditkit.train.loop import train

    signal.signal(signal.SIGTERM, _finished)
    return train(opts)


def run(args: argparse.Namespace) -> int:
    """`ditkit train`: the flags as TrainOptions, then the run."""
    result = train_as_command(TrainOptions(**options_from_args(args)))
    if result.stopped_by_signal:
        print(f"checkpoint written at step {result.step}; exiting cleanly", file=sys.stderr)
    return 0
