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

from ditkit.train.loop import TrainResult, train
from ditkit.train.options import PRECISIONS, TrainOptions, add_arguments, validate

__all__ = ["PRECISIONS", "TrainOptions", "TrainResult", "add_arguments", "run", "train", "validate"]


def run(args: argparse.Namespace) -> int:
    opts = TrainOptions(
        data_path=args.data_path,
        model=args.model,
        image_size=args.image_size,
        num_classes=args.num_classes,
        vae=args.vae,
        global_batch_size=args.global_batch_size,
        grad_accum_steps=args.grad_accum_steps,
        strategy=args.strategy,
        epochs=args.epochs,
        max_steps=args.max_steps,
        global_seed=args.global_seed,
        lr=args.lr,
        ema_decay=args.ema_decay,
        precision=args.precision,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
        grad_clip=args.grad_clip,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        keep_last=args.keep_last,
        sample_every=args.sample_every,
        eval_every=args.eval_every,
        results_dir=args.results_dir,
        resume=args.resume,
        num_workers=args.num_workers,
        conditioning=args.conditioning,
        noise_schedule=args.noise_schedule,
        skip_nonfinite=args.skip_nonfinite,
        progress=not args.no_progress,
    )
    result = train(opts)
    if result.stopped_by_signal:
        print(f"checkpoint written at step {result.step}; exiting cleanly", file=sys.stderr)
    return 0
