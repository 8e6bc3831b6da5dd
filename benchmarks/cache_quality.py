"""Feature caching on the demo models: sample quality vs block evaluations saved (the digits yardstick).

For each demo model (class-conditional diffusion, flow, text) and sampler, the same noise and labels are sampled
uncached and with each `--cache` setting; each row gives the digits Fréchet distance and class accuracy (text:
of the recovered ink, and the prompt's digit/colour accuracy), the mean absolute pixel difference from the
uncached images (paired: same noise), and the fraction of network evaluations that ran the block stack (counted
by hooks on the first block, not computed from the schedule).

    flock /tmp/cpu-heavy.lock nice -n 5 env PYTHONPATH=src python benchmarks/cache_quality.py \\
        --results /work/main/results --out benchmarks/results/cache_quality.json --plot docs/cache_quality.png
    PYTHONPATH=src python benchmarks/cache_quality.py --quick          # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import _src  # noqa: F401  (first: puts src/ on sys.path when run from a checkout)

SETTINGS = ("off", "fora-2", "fora-3", "fora-4", "taylor1-3", "taylor2-3", "taylor2-4", "taylor2-5")
# model kind -> the samplers measured: DDPM-250 and DPM-Solver++ 20, or the flow model's SDE-250 and Heun 10
# (the flow demo's own 20-evaluation sampler; a flow model has no DDPM).
RUNS = {"class": (("ddpm", 250), ("dpm-solver", 20)), "flow": (("sde-euler", 250), ("heun", 10)),
        "text": (("ddpm", 250), ("dpm-solver", 20))}


class Counter:
    """Counts the network's evaluations and the first block's runs (= evaluations that ran the stack)."""

    def __init__(self, net: torch.nn.Module):
        self.calls = self.full = 0
        self.handles = [net.register_forward_pre_hook(self._call), net.blocks[0].register_forward_pre_hook(self._block)]

    def _call(self, *_: Any) -> None:
        self.calls += 1

    def _block(self, *_: Any) -> None:
        self.full += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def latest_ema(folder: Path) -> Path:
    ckpts = sorted((folder / "checkpoints").iterdir())
    return ckpts[-1] / "ema.safetensors"


def class_rows(folder: Path, kind: str, num: int, settings: tuple[str, ...], runs: tuple) -> list[dict]:
    """Rows for a class-conditional demo model (diffusion or flow) through `ditkit.sample.Sampler`."""
    import ditkit
    from ditkit.apps.demo import DEMO_CFG
    from ditkit.metrics.digits_classifier import digits_metrics
    from ditkit.sample import Sampler

    path = latest_ema(folder)
    model, recipe = ditkit.load_model_with_recipe(path)
    model.eval()
    rows = []
    for sampler_name, steps in runs:
        base = None
        for setting in settings:
            sampler = Sampler(model=model, vae=None, sampler=sampler_name, num_steps=steps, cfg_scale=DEMO_CFG,
                              guide_channels="all", recipe=recipe, cache=None if setting == "off" else setting)
            counter, start = Counter(model), time.perf_counter()
            labels = torch.arange(num) % model.config.num_classes
            images = sampler.images(labels, torch.Generator().manual_seed(1))
            seconds = time.perf_counter() - start
            counter.close()
            pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            scores = digits_metrics(pixels, labels, verbose=False)
            base = pixels if base is None else base
            rows.append(_row(kind, str(path), sampler_name, steps, setting, scores, pixels, base, counter, seconds))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _row(kind: str, path: str, sampler: str, steps: int, setting: str, scores: dict, pixels: torch.Tensor,
         base: torch.Tensor, counter: Counter, seconds: float) -> dict:
    return {"model": kind, "checkpoint": path, "sampler": sampler, "steps": steps, "cache": setting,
            "frechet": round(float(scores["frechet"]), 4),
            "accuracy": None if scores.get("accuracy") is None else round(float(scores["accuracy"]), 4),
            **{k: v for k, v in scores.items() if k not in ("frechet", "accuracy", "num_samples")},
            "pixel_mad_vs_off": round(float((pixels - base).abs().mean()) * 127.5, 3),  # in 0..255 levels
            "evaluations": counter.calls, "block_evaluations": counter.full, "num_samples": len(pixels),
            "saved": round(counter.calls / max(counter.full, 1), 3), "seconds": round(seconds, 1)}


def text_rows(folder: Path, num: int, settings: tuple[str, ...], runs: tuple) -> list[dict]:
    """Rows for the text demo model (its word encoder in front; guidance through the null caption)."""
    from safetensors.torch import load_file

    from ditkit.apps import demo_text as dt
    from ditkit.data import colour_digits as cd
    from ditkit.diffusion import samplers
    from ditkit.diffusion.guidance import guided_captions
    from ditkit.metrics.digits_classifier import digits_metrics
    from ditkit.models.config import DiTConfig
    from ditkit.sample.cache import caching, parse

    path = folder / dt.WEIGHTS
    model = dt.EncodedTextModel(DiTConfig(**dt.DEMO_CONFIG), len(cd.VOCAB))
    model.load_state_dict(load_file(str(path)))
    model.eval()
    prompts, combos = dt.evaluation_prompts(False, num)
    ids, mask = cd.tokenize(prompts)
    rows = []
    for sampler_name, steps in runs:
        base = None
        for setting in settings:
            gen = torch.Generator().manual_seed(1)
            noise = torch.randn(num, 3, 8, 8, generator=gen)
            counter, start = Counter(model.dit), time.perf_counter()
            with torch.no_grad(), caching(model, parse(setting)):  # one batch: one cache state
                x = samplers.sample(guided_captions(model, dt.DEMO_CFG, channels="all"), noise, sampler=sampler_name,
                                    num_steps=steps, clip_denoised=True, model_kwargs={"y": ids, "mask": mask},
                                    generator=gen, prediction=dt.DEMO_PREDICTION)
            seconds = time.perf_counter() - start
            counter.close()
            # as uint8 and back, as every image ditkit writes
            pixels = (torch.clamp(127.5 * x.clamp(-1, 1) + 128.0, 0, 255).to(torch.uint8).float() / 127.5 - 1.0)
            _, _, ink = cd.read_image(pixels)
            scores = {**digits_metrics(ink, combos[:, 0], verbose=False), **dt.score(pixels, combos)}
            base = pixels if base is None else base
            rows.append(_row("text", str(path), sampler_name, steps, setting, scores, pixels, base, counter, seconds))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quick_rows(settings: tuple[str, ...]) -> list[dict]:
    """A tiny random pixel model, 8 samples, DDPM 20 and DPM-Solver++ 8: checks the script in seconds."""
    import ditkit
    from ditkit.sample import Sampler

    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                                num_heads=2).eval()
    rows = []
    for sampler_name, steps in (("ddpm", 20), ("dpm-solver", 8)):
        base = None
        for setting in settings:
            sampler = Sampler(model=model, vae=None, sampler=sampler_name, num_steps=steps, cfg_scale=2.0,
                              guide_channels="all", cache=None if setting == "off" else setting)
            counter = Counter(model)
            labels = torch.arange(8) % 10
            pixels = sampler.images(labels, torch.Generator().manual_seed(1)).permute(0, 3, 1, 2).float() / 127.5 - 1
            counter.close()
            base = pixels if base is None else base
            scores = {"frechet": float("nan"), "accuracy": None}  # the quick run checks the plumbing only
            rows.append(_row("quick", "random", sampler_name, steps, setting, scores, pixels, base, counter, 0.0))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per row, Fréchet change against the uncached row of the same model and sampler."""
    lines = ["| model | sampler | cache | block evals | saved | Fréchet | Δ vs off | accuracy | pixel MAD |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        off = next(o for o in rows if o["model"] == r["model"] and o["sampler"] == r["sampler"] and o["cache"] == "off")
        rise = (r["frechet"] / off["frechet"] - 1) * 100 if off["frechet"] == off["frechet"] and off["frechet"] else 0
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"| {r['model']} | {r['sampler']} {r['steps']} | {r['cache']} | {r['block_evaluations']}/"
                     f"{r['evaluations']} | {r['saved']:.2f}× | {r['frechet']:.3f} | {rise:+.1f}% | {acc} | "
                     f"{r['pixel_mad_vs_off']:.2f} |")
    return "\n".join(lines)


COLOURS = {"fora": (31, 119, 180), "taylor1": (255, 127, 14), "taylor2": (44, 160, 44)}


def plot(rows: list[dict], path: Path, width: int = 900, panel: int = 300) -> None:
    """One panel per (model, sampler): Fréchet change vs off (%) against evaluations saved (×), drawn with PIL."""
    from PIL import Image, ImageDraw

    groups = sorted({(r["model"], r["sampler"], r["steps"]) for r in rows}, key=str)
    cols = 2
    img = Image.new("RGB", (width, panel * ((len(groups) + cols - 1) // cols)), "white")
    draw = ImageDraw.Draw(img)
    for i, group in enumerate(groups):
        x0, y0 = (i % cols) * (width // cols), (i // cols) * panel
        mine = [r for r in rows if (r["model"], r["sampler"], r["steps"]) == group]
        off = next(r for r in mine if r["cache"] == "off")["frechet"]
        rises = [(r["saved"], (r["frechet"] / off - 1) * 100 if off == off and off else 0.0, r["cache"]) for r in mine]
        box = (x0 + 50, y0 + 30, x0 + width // cols - 20, y0 + panel - 40)
        n = mine[0].get("num_samples", "")
        title = "{} {} {}: Frechet change vs block evaluations saved".format(*group)
        _panel(draw, box, rises, f"{title} ({n} samples)")
    img.save(path)


def _panel(draw: Any, box: tuple[int, int, int, int], rises: list[tuple[float, float, str]], title: str) -> None:
    left, up, right, down = box
    top = max(10.0, max(y for _, y, _ in rises) * 1.1)
    bottom = min(-5.0, min(y for _, y, _ in rises) * 1.1)

    def sx(v: float) -> float:  # 1× … 5× saved
        return left + (v - 1) / 4.0 * (right - left)

    def sy(v: float) -> float:
        return down - (v - bottom) / (top - bottom) * (down - up)

    draw.rectangle([left, up, right, down], outline="black")
    draw.text((left, up - 22), title, fill="black")
    draw.line([left, sy(5), right, sy(5)], fill=(200, 0, 0))  # the 5% goal
    draw.line([left, sy(0), right, sy(0)], fill=(160, 160, 160))
    draw.text((left - 40, sy(5) - 6), "+5%", fill=(200, 0, 0))
    draw.text((left - 40, sy(0) - 6), "0%", fill=(100, 100, 100))
    for k in range(1, 6):
        draw.text((sx(k) - 6, down + 4), f"{k}x", fill="black")
    for saved, rise, name in rises:
        colour = next((c for p, c in COLOURS.items() if name.startswith(p)), (0, 0, 0))
        x, y = sx(min(saved, 5.0)), sy(rise)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((x + 5, y - 12), name, fill=colour)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="folder holding demo/, demo-flow/, demo_text/")
    parser.add_argument("--models", default="class,flow,text")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--samplers", default=None, help="only these samplers (comma-separated), e.g. ddpm,sde-euler")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--plot", help="write the quality-vs-savings picture here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = tuple(args.settings.split(","))
    wanted = None if args.samplers is None else set(args.samplers.split(","))
    runs = {k: tuple(r for r in v if wanted is None or r[0] in wanted) for k, v in RUNS.items()}
    if args.quick:
        rows = quick_rows(settings)
    else:
        root, rows = Path(args.results), []
        for kind in args.models.split(","):
            if kind == "text":
                rows += text_rows(root / "demo_text", args.num_samples, settings, runs["text"])
            else:
                folder = root / ("demo" if kind == "class" else "demo-flow")
                rows += class_rows(folder, kind, args.num_samples, settings, runs[kind])
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"num_samples": args.num_samples, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
