"""`ditkit scaling`: the paper's scaling pictures on the built-in digits (metric vs steps, metric vs Gflops).

Several DiT configs are trained on the same data for the same number of steps, the EMA weights of each are
scored at a few step counts (digit-class accuracy and the Fréchet distance in the digit classifier's features,
lower = better, like FID), and two PNG pictures are drawn: the metric against training steps (one line per
model) and the final metric against forward Gflops (log x), as in Figures 2 and 8 of Peebles & Xie (2023).

Training runs step-major (every model to the first evaluation point, then every model to the next), so a run
stopped by `--budget-minutes` still has all models at a common step count for the Gflops picture. Each model
trains in segments, resuming exactly from its checkpoint; OUT/results.json records every finished evaluation,
and a re-run skips them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditkit.models.config import DiTConfig
from ditkit.models.precision import PRECISIONS
from ditkit.runtime import counts
from ditkit.runtime.errors import UserError

DEFAULT_MODELS = ("DiT-S/8", "DiT-S/4", "DiT-S/2", "DiT-B/8", "DiT-B/4", "DiT-B/2")
METRICS = ("frechet", "accuracy")
# How each metric improves: the Gflops picture and the correlation's sign are read with this.
LOWER_IS_BETTER = {"frechet": True, "accuracy": False}


@dataclass
class ScalingOptions:
    """One scaling study. Settings that change the numbers are recorded and must match on resume."""

    out: str = "results/scaling"
    models: tuple[str, ...] = DEFAULT_MODELS
    # 32×32 digits: patch 8 still gives 16 tokens, patch 2 gives 256, and the Gflops equal the paper's
    # 256×256 latent-space figures (a 32×32 token grid of 1 channel instead of 4).
    image_size: int = 32
    steps: int = 2000
    eval_at: tuple[int, ...] = (250, 500, 1000, 2000)
    batch_size: int = 128
    # One lr for all models, as in the paper; 3× its 1e-4 so that the short runs separate the models sooner.
    lr: float = 3e-4
    ema_decay: float = 0.99  # a 100-step EMA window: the paper's 0.9999 would still be the init after 2,000 steps
    grad_clip: float = 1.0  # a guard for the wider B models at this lr; rarely active
    num_samples: int = 1000
    cfg_scale: float = 1.0  # the paper's scaling plots are without guidance
    sample_steps: int = 20
    metric: str = "frechet"
    seed: int = 0
    precision: str | None = None  # default: bf16 on GPU, fp32 on CPU
    compile: bool = False  # per-block compile costs tens of seconds per segment: not worth it for short runs
    budget_minutes: float | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. tiny models in tests
    progress: bool = False

    def record(self) -> dict[str, Any]:
        """The settings a finished evaluation depends on (stored in results.json)."""
        keys = ("image_size", "batch_size", "lr", "ema_decay", "grad_clip", "num_samples", "cfg_scale",
                "sample_steps", "seed", "model_overrides")
        return {k: asdict(self)[k] for k in keys}


def validate(opts: ScalingOptions) -> None:
    """One clear line per problem, before anything is trained."""
    from ditkit.models.config import MODEL_NAMES

    if not opts.models:
        raise UserError("--models is empty; name at least one config, e.g. DiT-S/8,DiT-S/4")
    for name in opts.models:
        if name not in MODEL_NAMES:
            raise UserError(f"unknown model {name!r} in --models; choose from {', '.join(MODEL_NAMES)}")
    if len(set(opts.models)) != len(opts.models):
        raise UserError("--models lists a config twice; name each once")
    for name in ("image_size", "steps", "batch_size", "sample_steps"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.num_samples < 20:
        raise UserError(f"--num-samples must be at least 20 for a meaningful score, got {opts.num_samples}")
    if not opts.eval_at:
        raise UserError("--eval-at is empty; give step counts such as 500,1000")
    if any(s < 1 or s > opts.steps for s in opts.eval_at) or list(opts.eval_at) != sorted(set(opts.eval_at)):
        raise UserError(f"--eval-at must be increasing step counts in 1..{opts.steps}, got {list(opts.eval_at)}")
    if opts.metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {opts.metric!r}")
    if opts.budget_minutes is not None and not opts.budget_minutes > 0:
        raise UserError(f"--budget-minutes must be positive, got {opts.budget_minutes}")
    for name in opts.models:
        patch = int(name.rsplit("/", 1)[1])
        if opts.image_size % patch:
            raise UserError(f"--image-size {opts.image_size} is not divisible by the patch size of {name}; "
                            "use a multiple of 8 such as 32")
    counts.scaling_options(opts)  # absurd counts, before anything is trained
    check_models(opts)


def check_models(opts: ScalingOptions) -> None:
    """Every model the overrides describe is a valid, bounded config (one line naming the flag otherwise)."""
    if not isinstance(opts.model_overrides, dict):
        raise UserError("--model-overrides must be a JSON object of model config fields")
    for name in opts.models:
        try:
            DiTConfig.from_name(name, **{"input_size": opts.image_size, **opts.model_overrides})
        except UserError as err:
            raise UserError(f"--models {name} with --model-overrides: {err}") from None
        except TypeError as err:
            raise UserError(f"--model-overrides: {err}") from None


def eval_points(opts: ScalingOptions) -> list[int]:
    """The evaluation steps; the last training step is always one of them."""
    return sorted(set(opts.eval_at) | {opts.steps})


# ----------------------------------------------------------------------------------------------- record


def load_record(path: Path, opts: ScalingOptions) -> dict[str, Any]:
    """results.json of an earlier run with the same settings, or a fresh record."""
    fresh = {"settings": opts.record(), "models": {}}
    if not path.exists():
        return fresh
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; delete it or choose another --out") from None
    old = record.get("settings", {})
    for key, value in opts.record().items():
        if old.get(key) != value:
            raise UserError(f"{path} holds a study with {key}={old.get(key)!r}, not {value!r}; "
                            "choose another --out or the same settings")
    record.setdefault("models", {})
    return record


def save_record(path: Path, record: dict[str, Any]) -> None:
    from ditkit.runtime.io import atomic_write

    text = json.dumps(record, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def final_points(record: dict[str, Any], models: list[str]) -> tuple[int | None, list[dict[str, Any]]]:
    """The last step that every model was evaluated at, and each model's row there."""
    steps_sets = [set(record["models"].get(m, {}).get("evals", {})) for m in models]
    common = set.intersection(*steps_sets) if steps_sets else set()
    if not common:
        return None, []
    step = max(common, key=int)
    rows = []
    for m in models:
        entry = record["models"][m]
        rows.append({"model": m, "gflops": entry["gflops"], "params": entry["params"], **entry["evals"][step]})
    return int(step), rows


# ----------------------------------------------------------------------------------------------- statistics


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (what Spearman's coefficient uses)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x: Any, y: Any) -> float:
    """Pearson's correlation coefficient (nan when either side is constant or has fewer than 2 values)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else float("nan")


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation: Pearson's on the (tie-averaged) ranks."""
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def correlations(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """Correlations between log10 Gflops and the metric over the models (rows of `final_points`)."""
    x = [math.log10(r["gflops"]) for r in rows]
    y = [float(r[metric]) for r in rows]
    return {"pearson": pearson(x, y), "spearman": spearman(x, y)}


# ----------------------------------------------------------------------------------------------- pictures

# PIL (already a dependency) draws the two simple charts, so no plotting library is needed on the GPU machine.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _text(draw: Any, xy: tuple[float, float], text: str, font: Any, anchor: str, fill: str = "black") -> None:
    """Text placed by a two-letter anchor (l/m/r, a/m/d), computed here: bitmap fonts reject `anchor=`."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0, y1 - y0
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]] - x0
    y = xy[1] - {"a": 0, "m": h / 2, "d": h}[anchor[1]] - y0
    draw.text((x, y), text, fill=fill, font=font)


def axis_ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Tick positions covering [lo, hi]: powers of ten (with 2 and 5 when three decades or less show) on a log
    axis, steps of 1, 2 or 5 times a power of ten (about 3 to 10 ticks) on a linear one or a narrow log one."""
    if log:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mantissas = (1, 2, 5) if last - first <= 3 else (1,)
        ticks = [m * 10.0**e for e in range(first, last + 1) for m in mantissas]
        ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            return ticks
        # A narrow range (e.g. 40..45) holds too few of those: linear steps, still placed on the log scale.
    raw = (hi - lo) / 5
    base = 10.0 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    start = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(start, int(math.floor(hi / step + 1e-9)) + 1)]


class LinePlot:
    """A minimal chart: lines or annotated points, linear or log axes, a legend; saved as PNG."""

    W, H = 900, 600
    LEFT, RIGHT, TOP, BOTTOM = 90, 150, 50, 70

    def __init__(self, title: str, x_label: str, y_label: str, log_x: bool = False, log_y: bool = False):
        self.title, self.x_label, self.y_label = title, x_label, y_label
        self.log_x, self.log_y = log_x, log_y
        self.series: list[tuple[str, list[tuple[float, float]], list[str] | None, bool]] = []

    def line(self, name: str, points: list[tuple[float, float]]) -> None:
        """A polyline with markers, named in the legend."""
        self.series.append((name, points, None, True))

    def points(self, name: str, points: list[tuple[float, float]], labels: list[str]) -> None:
        """Markers, each annotated with its label."""
        self.series.append((name, points, labels, False))

    def _range(self, values: list[float], log: bool) -> tuple[float, float]:
        if log:
            values = [v for v in values if v > 0]
            lo, hi = math.log10(min(values)), math.log10(max(values))
        else:
            lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or 0.5  # a margin so that markers do not sit on the frame
        lo, hi = lo - pad, hi + pad
        return (10**lo, 10**hi) if log else (lo, hi)

    def save(self, path: Path) -> Path:
        from PIL import Image, ImageDraw

        from ditkit.runtime.io import atomic_write

        # A diverged run can leave NaN/inf scores: leave those points out rather than fail to draw the rest.
        self.series = [(name, [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)],
                        [lab for (x, y), lab in zip(pts, labels) if math.isfinite(x) and math.isfinite(y)]
                        if labels else None, joined) for name, pts, labels, joined in self.series]
        xs = [x for _, pts, _, _ in self.series for x, _ in pts]
        ys = [y for _, pts, _, _ in self.series for _, y in pts]
        if not xs:
            raise UserError(f"nothing finite to draw in {path}: every score is NaN or infinite")
        if self.log_y and any(y <= 0 for y in ys):
            self.log_y = False  # a log axis cannot show zero or negative values
        (x0, x1), (y0, y1) = self._range(xs, self.log_x), self._range(ys, self.log_y)
        left, right, top, bottom = self.LEFT, self.W - self.RIGHT, self.TOP, self.H - self.BOTTOM

        def scale(v: float, lo: float, hi: float, log: bool) -> float:
            if log:
                v, lo, hi = math.log10(v), math.log10(lo), math.log10(hi)
            return (v - lo) / (hi - lo)

        def px(x: float, y: float) -> tuple[float, float]:
            return (left + scale(x, x0, x1, self.log_x) * (right - left),
                    bottom - scale(y, y0, y1, self.log_y) * (bottom - top))

        img = Image.new("RGB", (self.W, self.H), "white")
        draw = ImageDraw.Draw(img)
        small, big = _font(13), _font(16)
        for t in axis_ticks(x0, x1, self.log_x):
            x, _ = px(t, y0)
            draw.line([(x, top), (x, bottom)], fill="#e6e6e6")
            _text(draw, (x, bottom + 6), f"{t:g}", small, "ma", "black")
        for t in axis_ticks(y0, y1, self.log_y):
            _, y = px(x0, t)
            draw.line([(left, y), (right, y)], fill="#e6e6e6")
            _text(draw, (left - 6, y), f"{t:g}", small, "rm", "black")
        draw.rectangle([left, top, right, bottom], outline="black")
        _text(draw, ((left + right) / 2, 15), self.title, big, "ma", "black")
        _text(draw, ((left + right) / 2, self.H - 25), self.x_label, small, "ma", "black")
        # Vertical y label: drawn on its own strip, then rotated.
        strip = Image.new("RGB", (bottom - top, 20), "white")
        _text(ImageDraw.Draw(strip), ((bottom - top) / 2, 10), self.y_label, small, "mm")
        img.paste(strip.rotate(90, expand=True), (8, top))
        for i, (name, pts, labels, joined) in enumerate(self.series):
            color = PALETTE[i % len(PALETTE)]
            where = [px(x, y) for x, y in pts]
            if joined and len(where) > 1:
                draw.line(where, fill=color, width=2)
            for j, (x, y) in enumerate(where):
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
                if labels:
                    _text(draw, (x + 7, y - 7), labels[j], small, "ld", color)
            ly = top + 10 + 22 * i
            draw.line([(right + 12, ly), (right + 36, ly)], fill=color, width=3)
            _text(draw, (right + 42, ly), name, small, "lm", "black")
        atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
        return path


def format_table(rows: list[dict[str, Any]], step: int | None) -> str:
    """Markdown table: config, params, Gflops, accuracy, Fréchet at the final common step."""
    lines = [f"Evaluated after {step} training steps." if step else "No common evaluation step yet.", "",
             "| config | params (M) | Gflops | accuracy | Fréchet |", "|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["gflops"]):
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['gflops']:.4g} | {r['accuracy']:.3f} | "
                     f"{r['frechet']:.3f} |")
    return "\n".join(lines) + "\n"


def draw_pictures(record: dict[str, Any], models: list[str], metric: str, out: Path) -> list[Path]:
    """OUT/steps.png (metric vs steps per model) and OUT/gflops.png (final metric vs Gflops, log x)."""
    label = {"frechet": "digits Frechet distance (lower is better)",
             "accuracy": "digit-class accuracy (higher is better)"}[metric]
    log_y = metric == "frechet"
    written = []
    plot = LinePlot(title="Metric vs training steps", x_label="training steps", y_label=label, log_y=log_y)
    for m in models:
        evals = record["models"].get(m, {}).get("evals", {})
        pts = sorted((int(s), float(v[metric])) for s, v in evals.items())
        if pts:
            plot.line(m, pts)
    if plot.series:
        written.append(plot.save(out / "steps.png"))
    step, rows = final_points(record, models)
    if rows:
        plot = LinePlot(title=f"Metric vs Gflops after {step} steps", x_label="Gflops per forward pass (log)",
                        y_label=label, log_x=True, log_y=log_y)
        for family in sorted({r["model"].split("/")[0] for r in rows}):
            pts = [(r["gflops"], float(r[metric])) for r in rows if r["model"].split("/")[0] == family]
            names = [r["model"] for r in rows if r["model"].split("/")[0] == family]
            plot.points(family, pts, names)
        written.append(plot.save(out / "gflops.png"))
    return written


def report(record: dict[str, Any], models: list[str], metric: str, out: Path) -> dict[str, Any]:
    """Write OUT/table.md and the pictures; return the summary (also stored in results.json)."""
    from ditkit.runtime.io import atomic_write

    step, rows = final_points(record, models)
    table = format_table(rows, step)
    summary: dict[str, Any] = {"step": step, "metric": metric}
    if len(rows) >= 2:
        corr = correlations(rows, metric)
        summary.update(corr)
        table += (f"\nCorrelation between log10 Gflops and {metric} over {len(rows)} models: "
                  f"Pearson {corr['pearson']:.3f}, Spearman {corr['spearman']:.3f}"
                  f" ({'negative' if LOWER_IS_BETTER[metric] else 'positive'} = larger models are better).\n")
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table))
    summary["pictures"] = [str(p) for p in draw_pictures(record, models, metric, out)]
    summary["table"] = table
    return summary


# ----------------------------------------------------------------------------------------------- the study


def _evaluate(result: Any, opts: ScalingOptions, device: Any) -> dict[str, float]:
    from ditkit.metrics.digits_classifier import score_sampler
    from ditkit.sample import SamplingPipeline

    sampler = SamplingPipeline(model=result.ema, vae=None, sampler="dpm-solver", num_steps=opts.sample_steps,
                      cfg_scale=opts.cfg_scale, guide_channels="all", device=device, recipe=result.recipe)
    # The same noise for every model and step: differences come from the weights only.
    scores = score_sampler(sampler, opts.num_samples, seed=opts.seed + 1)
    return {"accuracy": round(float(scores["accuracy"]), 5), "frechet": round(float(scores["frechet"]), 5)}


def _train_options(opts: ScalingOptions, name: str, step: int) -> Any:
    from ditkit.train import TrainOptions

    return TrainOptions(
        data_path="digits", model=name, image_size=opts.image_size, global_batch_size=opts.batch_size,
        lr=opts.lr, ema_decay=opts.ema_decay, grad_clip=opts.grad_clip, max_steps=step,
        global_seed=opts.seed, precision=opts.precision, compile=opts.compile, log_every=50,
        ckpt_every=10**9, keep_last=1, results_dir=str(run_dir(opts, name)), resume="auto", num_workers=0,
        progress=opts.progress, model_overrides=dict(opts.model_overrides),
    )


def _gflops(name: str, opts: ScalingOptions) -> float:
    from ditkit.models.flops import count_macs

    config = DiTConfig.from_name(name, input_size=opts.image_size, in_channels=1, num_classes=10,
                                 **opts.model_overrides)
    return count_macs(config) / 1e9


def _guess_seconds(name: str, steps: int, seconds_per_step: dict[str, float], opts: ScalingOptions,
                   eval_seconds: dict[str, float] | None = None) -> float:
    """Seconds a segment of `steps` steps will take: from this model's last segment, else scaled by Gflops from
    the costliest model measured so far (an overestimate for a larger model when that one was bound by kernel
    launches rather than arithmetic, which errs on the safe side of a budget). 0 before any measurement."""
    eval_seconds = eval_seconds or {}
    if name in seconds_per_step:
        return seconds_per_step[name] * steps + eval_seconds.get(name, 0.0)
    if not seconds_per_step:
        return 0.0
    ref = max(seconds_per_step, key=lambda m: _gflops(m, opts))
    ratio = max(_gflops(name, opts) / _gflops(ref, opts), 1.0)
    return ratio * (seconds_per_step[ref] * steps + eval_seconds.get(ref, 0.0))


def run_dir(opts: ScalingOptions, name: str) -> Path:
    """Training folder of one model inside OUT."""
    return Path(opts.out) / "runs" / name.replace("/", "-")


def run_scaling(opts: ScalingOptions, log: Any = None) -> dict[str, Any]:
    """Train and evaluate every model at every evaluation step (skipping recorded ones); write the outputs.

    Returns the summary: final common step, table text, correlations, picture paths, and `stopped_early`
    when the budget ran out.
    """
    from ditkit.models.flops import count_macs, count_params
    from ditkit.train import train

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    validate(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    record = load_record(path, opts)
    start = time.perf_counter()
    seconds_per_step: dict[str, float] = {}
    eval_seconds: dict[str, float] = {}
    stopped_early = False
    for step in eval_points(opts):
        for name in opts.models:
            entry = record["models"].setdefault(name, {"evals": {}})
            if str(step) in entry["evals"]:
                continue
            if opts.budget_minutes is not None:
                done = max((int(s) for s in entry["evals"]), default=0)
                guess = _guess_seconds(name, step - done, seconds_per_step, opts, eval_seconds)
                if time.perf_counter() - start + guess > 60 * opts.budget_minutes:
                    log(f"budget of {opts.budget_minutes:g} min reached before {name} step {step}; stopping "
                        "(re-run with a larger --budget-minutes to continue)")
                    stopped_early = True
                    break
            log(f"{name}: training to step {step}")
            t0 = time.perf_counter()
            result = train(_train_options(opts, name, step))
            t1 = time.perf_counter()
            if result.stopped_by_signal:
                raise KeyboardInterrupt
            if result.step != step:
                raise UserError(f"{run_dir(opts, name)} has a checkpoint at step {result.step}, past {step}; "
                                "delete that folder or choose another --out")
            trained_from = max((int(s) for s in entry["evals"]), default=0)
            seconds_per_step[name] = (t1 - t0) / max(step - trained_from, 1)
            eval_seconds[name] = time.perf_counter() - t1
            config = result.ema.config
            entry["gflops"] = count_macs(config) / 1e9
            entry["params"] = count_params(config)
            device = next(result.ema.parameters()).device
            entry["evals"][str(step)] = {**_evaluate(result, opts, device),
                                         "train_seconds": round(t1 - t0, 2),
                                         "eval_seconds": round(time.perf_counter() - t1, 2)}
            log(f"{name} step {step}: {json.dumps(entry['evals'][str(step)])}")
            save_record(path, record)
        if stopped_early:
            break
    summary = report(record, list(opts.models), opts.metric, out)
    summary["stopped_early"] = stopped_early
    summary["elapsed_seconds"] = round(time.perf_counter() - start, 1)
    record["summary"] = {k: v for k, v in summary.items() if k != "table"}
    save_record(path, record)
    return summary


# ----------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ScalingOptions()
    a = parser.add_argument
    a("--models", default=",".join(d.models), help="comma-separated paper configs (default: S and B, patch 8/4/2)")
    a("--out", default=d.out, help=f"output folder (default {d.out})")
    a("--image-size", type=int, default=d.image_size, help=f"digits side (default {d.image_size})")
    a("--steps", type=int, default=d.steps, help=f"training steps per model (default {d.steps})")
    a("--eval-at", type=_int_list, default=d.eval_at,
      help=f"steps to evaluate at (default {','.join(map(str, d.eval_at))}; --steps is always added)")
    a("--batch-size", type=int, default=d.batch_size, help=f"global batch size (default {d.batch_size})")
    a("--lr", type=float, default=d.lr, help=f"learning rate, the same for all models (default {d.lr:g})")
    a("--ema-decay", type=float, default=d.ema_decay, help=f"EMA decay (default {d.ema_decay})")
    a("--num-samples", type=int, default=d.num_samples, help=f"samples per evaluation (default {d.num_samples})")
    a("--cfg-scale", type=float, default=d.cfg_scale, help="guidance scale of the samples (default 1: none)")
    a("--metric", choices=METRICS, default=d.metric, help="metric in the pictures (default frechet)")
    a("--seed", type=int, default=d.seed)
    a("--precision", choices=tuple(p for p in PRECISIONS if p != "fp8"), default=None,
      help="default: bf16 on GPU, fp32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
      help="torch.compile each block (default off: compiling costs more than it saves in short segments)")
    a("--budget-minutes", type=float, default=None,
      help="stop before a training segment that would end past this budget (estimated from earlier segments)")
    a("--model-overrides", type=_json_dict, default={},
      help="JSON object of config fields applied to every model, e.g. '{\"depth\": 2, \"hidden_size\": 64}'")
    a("--progress", action="store_true", help="show a training progress bar")


def run(args: argparse.Namespace) -> int:
    opts = ScalingOptions(
        out=args.out, models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        image_size=args.image_size, steps=args.steps, eval_at=tuple(args.eval_at), batch_size=args.batch_size,
        lr=args.lr, ema_decay=args.ema_decay, num_samples=args.num_samples, cfg_scale=args.cfg_scale,
        metric=args.metric, seed=args.seed, precision=args.precision, compile=args.compile,
        budget_minutes=args.budget_minutes, model_overrides=args.model_overrides, progress=args.progress,
    )
    summary = run_scaling(opts)
    print(summary["table"], end="")
    for p in summary["pictures"]:
        print(f"picture: {p}")
    print(f"results: {Path(opts.out) / 'results.json'} ({summary['elapsed_seconds']:.0f} s)")
    if summary["stopped_early"]:
        print("stopped early by --budget-minutes; the table is at the last step all models reached")
    return 0
