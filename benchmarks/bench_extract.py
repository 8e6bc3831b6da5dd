"""Images/s encoded by the SD-VAE architecture (random weights, nothing downloaded), as `ditkit extract` runs it.

Builds `diffusers.AutoencoderKL` with the Stable Diffusion VAE config (the architecture of sd-vae-ft-ema/-mse,
83.65M parameters) and times the encoder through ditkit's VAE wrapper (posterior mean and std) on batches of
random 256×256 images, for each compute dtype and memory format, with cuDNN in the deterministic mode that
extract uses (`--cudnn-benchmark` to see what autotuning would gain). `ditkit extract` encodes each image and its
mirror image, so its rate is about half the encode rate printed here (the JSON line states both).

    python benchmarks/bench_extract.py                        # cuda, bf16 + fp32, batch 32, 256×256
    python benchmarks/bench_extract.py --batch-size 64 --iters 20 --json
    python benchmarks/bench_extract.py --device cpu --quick   # smoke test: 32×32, batch 2, 2 iterations
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)
from ditkit.encoders.autoencoder import SD_VAE_CONFIG, VAE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_sd_vae(device: torch.device, dtype: torch.dtype) -> VAE:
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # silences a casting note meant for from_pretrained users
    torch.manual_seed(0)
    model = AutoencoderKL(**SD_VAE_CONFIG)
    return VAE(model.to(device=device, dtype=dtype), "random SD-VAE")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encode(vae: VAE, batch: torch.Tensor, iters: int, warmup: int) -> float:
    """Images/s over `iters` timed encoder calls, after `warmup` untimed ones (cuDNN autotuning, allocator)."""
    for _ in range(warmup):
        vae.encode(batch)
    sync(batch.device)
    start = time.perf_counter()
    for _ in range(iters):
        mean, std = vae.encode(batch)
    sync(batch.device)
    elapsed = time.perf_counter() - start
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise RuntimeError("non-finite latents: the benchmark is not measuring a working encoder")
    return batch.shape[0] * iters / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", help=f"comma-separated, of {', '.join(DTYPES)} (default bf16,fp32)")
    parser.add_argument("--memory-formats", help="contiguous and/or channels_last (default both)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 32×32, batch 2, 2 iterations, fp32")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN autotune (fastest, not deterministic) instead of extract's deterministic mode")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch_size, args.iters, args.warmup = 32, 2, 2, 1
    args.dtypes = args.dtypes or ("fp32" if args.quick else "bf16,fp32")
    args.memory_formats = args.memory_formats or ("contiguous" if args.quick else "contiguous,channels_last")

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_extract: no GPU visible; use --device cpu --quick for a smoke test")
        # As `ditkit extract` runs (deterministic, so resumed stores are byte-identical), unless asked to
        # measure what cuDNN's autotuner would gain.
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cudnn.deterministic = not args.cudnn_benchmark
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = None
    import diffusers

    print(f"SD-VAE encoder, random weights, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"device {gpu or device}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    results = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        vae = build_sd_vae(device, dtype)
        for fmt in args.memory_formats.split(","):
            memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            vae.model.to(memory_format=memory_format)
            gen = torch.Generator(device=device).manual_seed(0)
            batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen, device=device)
            batch = (batch * 2 - 1).to(dtype).contiguous(memory_format=memory_format)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rate = time_encode(vae, batch, args.iters, args.warmup)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            results.append({"dtype": name, "memory_format": fmt, "images_per_s": round(rate, 2),
                            "extract_images_per_s": round(rate / 2, 2),
                            "peak_gib": round(peak, 2) if peak is not None else None})
            mem = f", peak {peak:.1f} GiB" if peak is not None else ""
            print(f"{name:>4} {fmt:<13} {rate:9.1f} images/s encoded  (extract, image + flip: {rate / 2:.1f}/s{mem})")
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps({
            "benchmark": "extract", "device": gpu or str(device), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "image_size": args.image_size, "batch_size": args.batch_size,
            "iters": args.iters, "tf32_conv": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": args.cudnn_benchmark, "results": results,
        }))


if __name__ == "__main__":
    main()
