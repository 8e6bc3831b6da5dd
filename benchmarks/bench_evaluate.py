"""Time `ditkit evaluate`'s Inception pipeline (random weights, nothing downloaded), phase by phase.

Writes two ADM-style `.npz` sets of random smooth images, builds torch-fidelity's FID Inception with random
weights (the same network and pipeline as with the real weights), and times: feature extraction (images/s,
TF32 off), the Fréchet distances (2048-d and 2023-d matrix square roots on the CPU), precision/recall (k = 3)
on the device, and a second run with the reference statistics cached. Also checks that device and CPU features
agree on a few images.

    python benchmarks/bench_evaluate.py                      # cuda, 10,000 + 10,000 images, batch 250
    python benchmarks/bench_evaluate.py --device cpu --quick # smoke test: 64 + 64 images
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
from ditkit.metrics import evaluate as ev
from ditkit.metrics import inception as inc
from ditkit.metrics.frechet import feature_statistics, frechet_distance
from ditkit.metrics.precision_recall import precision_recall


def smooth_images(n: int, size: int, seed: int, shift: float) -> np.ndarray:
    """uint8 N×size×size×3 images: 8×8 noise upsampled, so they have structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, 1000):
        m = min(1000, n - start)
        low = torch.randn(m, 3, 8, 8, generator=g) * 60 + 128 + shift
        big = F.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 255).byte()
        out.append(big.permute(0, 2, 3, 1))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=10_000, help="images per set")
    parser.add_argument("--size", type=int, default=64, help="image side (the network resizes to 299)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="64 images per set, batch 16")
    args = parser.parse_args()
    if args.quick:
        args.num, args.batch_size = 64, 16
    rows: dict = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "num": args.num,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DITKIT_CACHE"] = str(tmp / "cache")
        np.savez(tmp / "samples.npz", arr_0=smooth_images(args.num, args.size, 1, 20.0))
        np.savez(tmp / "ref.npz", arr_0=smooth_images(args.num, args.size, 2, 0.0))
        inc.save_random_weights(tmp / inc.WEIGHTS_FILE_NAME)
        net = inc.load_inception(tmp / inc.WEIGHTS_FILE_NAME, args.device)

        # Device and CPU agree (TF32 off): relative difference of pool features on 16 images.
        few = torch.from_numpy(smooth_images(16, args.size, 3, 0.0)).permute(0, 3, 1, 2).contiguous()
        with ev._full_float32():
            on_device = net(few.to(args.device))["pool"].cpu().double()
        on_cpu = inc.load_inception(tmp / inc.WEIGHTS_FILE_NAME, "cpu")(few)["pool"].double()
        rows["pool_rel_diff_device_vs_cpu"] = float((on_device - on_cpu).norm() / on_cpu.norm())

        samples = ev.open_images(tmp / "samples.npz")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        acts = ev.compute_activations(net, samples, args.batch_size, args.device, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows["features_img_per_s"] = args.num / (time.perf_counter() - t)

        t = time.perf_counter()
        ref = ev.reference_features(net, ev.open_images(tmp / "ref.npz"), args.batch_size, args.device, False)
        rows["reference_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ev.reference_features(net, ev.open_images(tmp / "ref.npz"), args.batch_size, args.device, False)
        rows["reference_cached_s"] = time.perf_counter() - t

        t = time.perf_counter()
        mu, sigma = feature_statistics(acts["pool"])
        rows["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        rows["fid_s"] = time.perf_counter() - t
        t = time.perf_counter()
        mu_s, sigma_s = feature_statistics(acts["spatial"])
        rows["sfid"] = frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"])
        rows["sfid_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rows["precision"], rows["recall"] = precision_recall(ref["pool"], acts["pool"], device=args.device)
        rows["precision_recall_s"] = time.perf_counter() - t

        t = time.perf_counter()
        reference = ev.open_images(tmp / "ref.npz")
        full = ev.inception_metrics(samples, reference, net, args.batch_size, args.device, progress=False)
        rows["evaluate_cached_reference_s"] = time.perf_counter() - t
        rows["same_fid_through_pipeline"] = abs(full["fid"] - rows["fid"]) <= 1e-6 * max(1.0, rows["fid"])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows.items()}))


if __name__ == "__main__":
    main()
