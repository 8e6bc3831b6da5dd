"""Training throughput of DiT-XL/2 with REPA and TREAD against the plain step, one GPU, one loop (issue 26).

    PYTHONPATH=src python benchmarks/bench_repa_tread.py --out $OUT/repa_tread.json          # GPU, ~3 min
    PYTHONPATH=src python benchmarks/bench_repa_tread.py --quick --out /tmp/repa_tread.json  # CPU smoke, seconds

Every arm runs `ditkit train`'s own step (`ditkit.train.step.TrainStep`: the (seed, step) draws, fp32 loss,
backward, fused AdamW, EMA) on synthetic 32×32×4 latents at batch 128, bf16 autocast, each block compiled
(`ditkit.runtime.fast.compile_blocks`) with the fused kernels on; one model serves every arm (compiled once per token
count), the projector's parameters frozen in the arms without REPA. Arms:

- plain: the step as `ditkit train` runs it;
- repa-stored: REPA's projector and loss on targets already in memory — the cost of the stored-features choice
  (reading 256×768 bf16 features per image from disk, 393 kB, is not counted);
- repa-onthefly: the same plus a DINOv2-B-shaped encoder (transformers `Dinov2Model` from its config, random
  weights, no download) run on 256×256 images each step (resized to 224, bf16) — the on-the-fly choice;
- repa-store-read: REPA with its targets read through the real path: a synthetic latent store with random
  float16 features of the encoder's shape (benchmarks/synthetic_store.py), `AlignedLatents` in a DataLoader
  (workers, pinned memory), copied to the GPU each step — the stored-features choice with its reading counted;
- repa-onthefly-fast: on the fly through `fast_encoder` (bf16 weights and input, channels-last, SDPA;
  compiled on a GPU), what `ditkit train` runs on a GPU (there without the compile);
- tread: TREAD's routing at the paper's setting (half the tokens skip blocks 2…24 of 28);
- repa+tread: both, on the fly.

Printed: a table (img/s, ms/step, ratio to plain) and a JSON file at --out.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import torch

from ditkit.diffusion import create_diffusion
from ditkit.encoders.features import fast_encoder
from ditkit.models.config import DiTConfig
from ditkit.models.dit import DiT
from ditkit.runtime.fast import compile_blocks
from ditkit.runtime.io import atomic_write
from ditkit.train.methods import MethodHooks
from ditkit.train.step import TrainStep, autocast_for
from ditkit.training_methods import Alignment, Routing, TrainingMethods
from synthetic_store import make_store

ARMS = ("plain", "repa-stored", "repa-store-read", "repa-onthefly", "repa-onthefly-fast", "tread", "repa+tread")


def dinov2_base_shaped(quick: bool) -> torch.nn.Module:
    """A random transformers DINOv2 with DINOv2-B's shape (tiny with --quick), wrapped as ditkit's encoder."""
    from transformers import Dinov2Config, Dinov2Model

    from ditkit.encoders.features import TransformersPatchEncoder

    if quick:
        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=28, patch_size=14)
        return TransformersPatchEncoder(Dinov2Model(config), image_size=28)
    config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          image_size=518, patch_size=14)  # facebook/dinov2-base
    return TransformersPatchEncoder(Dinov2Model(config), image_size=224)


class Setup:
    """One model, EMA, AdamW and data for every arm."""

    def __init__(self, device: torch.device, quick: bool, batch: int):
        self.device, self.quick, self.batch = device, quick, batch
        if quick:
            config = DiTConfig(input_size=8, in_channels=4, hidden_size=64, depth=6, num_heads=4, num_classes=10)
        else:
            config = DiTConfig.from_name("DiT-XL/2", input_size=32, num_classes=1000)
        self.config = config
        self.encoder = dinov2_base_shaped(quick).to(device)
        feature_dim = self.encoder.feature_dim
        depth = 2 if quick else 8
        routing = Routing(0.5, 2, config.depth - 4 if not quick else 3)
        self.methods = {
            "plain": TrainingMethods(),
            "repa-stored": TrainingMethods(Alignment("dinov2-b", feature_dim, depth=depth)),
            "repa-onthefly": TrainingMethods(Alignment("dinov2-b", feature_dim, depth=depth)),
            "repa-store-read": TrainingMethods(Alignment("dinov2-b", feature_dim, depth=depth)),
            "repa-onthefly-fast": TrainingMethods(Alignment("dinov2-b", feature_dim, depth=depth)),
            "tread": TrainingMethods(routing=routing),
            "repa+tread": TrainingMethods(Alignment("dinov2-b", feature_dim, depth=depth), routing),
        }
        torch.manual_seed(0)
        hooks = MethodHooks(self.methods["repa+tread"], self.encoder)
        self.model = hooks.attach(DiT(config)).to(device).train()
        self.ema = hooks.attach(DiT(config)).to(device).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        # --quick on a CPU: dynamo's tracing only (fullgraph: no graph break in a block at either token count)
        compile_blocks(self.model, **({} if device.type == "cuda" else {"backend": "eager", "fullgraph": True}))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                     weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
        self.diffusion = create_diffusion("", learn_sigma=config.learn_sigma)
        g = torch.Generator().manual_seed(1)
        side = config.input_size
        self.x = torch.randn(batch, config.in_channels, side, side, generator=g).to(device)
        self.y = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
        image_side = 32 if quick else 256
        self.images = (torch.rand(batch, 3, image_side, image_side, generator=g) * 2 - 1).to(device)
        self.stored = torch.randn(batch, config.num_patches, feature_dim, generator=g).to(device)
        self.fast = fast_encoder(copy.deepcopy(self.encoder), compile=device.type == "cuda")
        self.store_dir = tempfile.mkdtemp(prefix="ditkit-repa-store-")
        self.batches = store_batches(self.store_dir, config, feature_dim, batch, quick)

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "store_dir", ""), ignore_errors=True)

    def step_fn(self, arm: str) -> Any:
        """A callable running one optimizer step of `arm` (targets on the fly where the arm says so)."""
        methods = self.methods[arm]
        repa = methods.alignment is not None
        for module in (self.model.projectors, self.ema.projectors):  # frozen (no grad, no EMA) without REPA
            module.requires_grad_(repa if module is self.model.projectors else False)
        for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
            p_ema.requires_grad_(p.requires_grad)
        hooks = MethodHooks(methods, self.encoder)
        self.model.training_path.routing = methods.routing
        self.model.training_path.tap_depth = methods.alignment.depth if repa else None
        precision = "bf16" if self.device.type == "cuda" else "fp32"
        step = TrainStep(self.model, self.model, self.ema, self.opt, self.diffusion, device=self.device,
                         precision=precision, global_batch=self.batch, seed=0, methods=hooks)
        grid = self.config.grid_size
        counter = iter(range(10**9))

        fast = MethodHooks(methods, self.fast)

        def run() -> torch.Tensor:
            targets, x, y = None, self.x, self.y
            if arm in ("repa-onthefly", "repa+tread"):
                with autocast_for(self.device, precision):
                    targets = hooks.targets(self.images, grid)
            elif arm == "repa-onthefly-fast":
                with autocast_for(self.device, precision):
                    targets = fast.targets(self.images, grid)
            elif arm == "repa-store-read":
                x, y, stored = (t.to(self.device, non_blocking=True) for t in next(self.batches))
                targets = MethodHooks.stored_targets(stored, grid)
            elif repa:
                targets = self.stored
            return step(x, y, next(counter), targets=targets).terms[0]

        return run


def store_batches(root: str, config: DiTConfig, feature_dim: int, batch: int, quick: bool) -> Iterator[Any]:
    """Endless (latents, labels, float16 features) batches from a synthetic store through ditkit's reader:
    `AlignedLatents` (the latent store's drawn flips, the features of the same flip) in a DataLoader."""
    from torch.utils.data import DataLoader

    from ditkit.data.feature_store import AlignedLatents, StoredFeatures
    from ditkit.data.store import LatentStore

    make_store(root, count=4 * batch, side=config.input_size, channels=config.in_channels,
               num_classes=config.num_classes, features=(config.num_patches, feature_dim))
    store = LatentStore(root, seed=0)
    data = AlignedLatents(store, StoredFeatures(root, store.manifest))
    cuda = torch.cuda.is_available() and not quick
    for epoch in itertools.count():
        data.set_epoch(epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
        sampler = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
        yield from DataLoader(data, batch_sampler=sampler, num_workers=6 if cuda else 0, pin_memory=cuda)


def time_arm(setup: Setup, arm: str, warmup: int, repeats: int) -> dict[str, Any]:
    run = setup.step_fn(arm)
    cuda = setup.device.type == "cuda"
    start = time.perf_counter()
    for _ in range(warmup):  # includes the compile of a new token count
        run()
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{arm}: the loss became non-finite")
    ms = statistics.median(times) * 1e3
    return {"arm": arm, "img_per_s": setup.batch / (ms / 1e3), "ms_per_step": ms, "repeats": repeats,
            "warmup_s": warm_s, "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke run)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per arm (default 15; 2 with --quick)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    batch = args.batch or (8 if args.quick else 128)
    setup = Setup(device, args.quick, batch)
    repeats = args.repeats or (2 if args.quick else 15)
    rows = [time_arm(setup, arm, warmup=1 if args.quick else 4, repeats=repeats) for arm in ARMS]
    base = rows[0]["img_per_s"]
    print(f"{'arm':<20}{'img/s':>10}{'ms/step':>10}{'vs plain':>10}{'warm-up s':>11}")
    for row in rows:
        row["ratio_to_plain"] = row["img_per_s"] / base
        print(f"{row['arm']:<20}{row['img_per_s']:>10.1f}{row['ms_per_step']:>10.1f}{row['ratio_to_plain']:>10.3f}"
              f"{row['warmup_s']:>11.1f}")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    record = {"device": device_name, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(),
              "model": setup.config.name, "batch": batch, "quick": args.quick, "rows": rows}
    if args.out:
        atomic_write(args.out, lambda tmp: open(tmp, "w").write(json.dumps(record, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
