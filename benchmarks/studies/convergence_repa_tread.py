"""Convergence on the digits with REPA, TREAD, both, or neither, on both objectives, several seeds (issue 26).

Every run is `ditkit train` (ditkit.train.train) with the same small DiT, data, batch, learning rate, EMA and step
budget; only `--repa-*` / `--tread-*` and the objective differ. Checkpoints are written at fixed steps and each
EMA is scored afterwards with the digits classifier (class accuracy and the digits Fréchet distance of guided
samples, as `ditkit demo` scores them), so the training wall clock of a run is its own (no evaluation inside).

REPA's frozen encoder is `digits-mae` (ditkit.encoders.features): a conv encoder trained self-supervised (masked-
patch reconstruction, no labels) on the digits train split — not the classifier that scores the samples.

    flock /tmp/cpu-heavy.lock nice -n 5 env PYTHONPATH=src python benchmarks/studies/convergence_repa_tread.py \
        --out results/convergence_repa_tread.json --plot docs/convergence_repa_tread.png

Runs already in --out are skipped, so an interrupted study continues where it stopped (a run cut short resumes
from its last checkpoint). On a many-core host, `--jobs N` runs N at once, each a process pinned to its own
`--threads` cores (1 is best for this 0.5M-parameter model: on a busy 2-core machine a 2-thread run was 6× slower
per step than a 1-thread one); the parent trains or loads the cached digits-mae encoder and digits classifier
first (`--cache DIR` sets DITKIT_CACHE: carry the two cached files there to skip minutes of training on a fresh
machine), and writes --out alone. `--device cuda` trains and samples on the GPU (all jobs share it; fp32, eager).

    PYTHONPATH=src python benchmarks/studies/convergence_repa_tread.py --steps 2500 --eval-every 250 \
        --jobs 12 --threads 1 --cache results/ditkit-cache --out results/conv/conv.json --plot results/conv/conv.png \
        --runs results/conv/runs

The summary compares the arms at equal step budgets and at an equal training wall clock (the step loop's time
from metrics.jsonl: the fastest arm's time to the last step, each seed read at its last checkpoint within it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import _paths  # noqa: F401, E402  (benchmarks/ and src/ on sys.path)
import torch

from ditkit.runtime.io import atomic_write  # noqa: E402

MODEL = "DiT-S/2"
OVERRIDES = {"depth": 6, "hidden_size": 64, "num_heads": 2}  # 16 tokens (8×8 digits, 2×2 patches)
ARMS: dict[str, dict[str, Any]] = {
    "plain": {},
    "repa": {"repa_encoder": "digits-mae", "repa_depth": 2, "repa_projector_dim": 256},
    "tread": {"tread_rate": 0.5, "tread_start": 1, "tread_end": 4},
    "repa+tread": {"repa_encoder": "digits-mae", "repa_depth": 2, "repa_projector_dim": 256,
                   "tread_rate": 0.5, "tread_start": 1, "tread_end": 4},
}
OBJECTIVES = ("diffusion", "flow")
CFG = 2.5  # the demo's guidance (all channels)


def train_run(arm: str, objective: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one run (resuming a finished one is a no-op); returns its wall clock and checkpoint folder."""
    from ditkit.train import TrainOptions, train

    folder = Path(args.runs) / f"{arm}-{objective}-s{seed}"
    start = time.perf_counter()
    # fp32 and eager on both devices (the CPU defaults): a GPU run then differs from a CPU run only in where it
    # ran, and compiling a 0.5M-parameter model in every process would cost more than it saves.
    train(TrainOptions(
        data_path="digits", model=MODEL, image_size=8, global_batch_size=args.batch, lr=1e-3, ema_decay=0.99,
        max_steps=args.steps, log_every=args.eval_every, ckpt_every=args.eval_every, global_seed=seed,
        results_dir=str(folder), resume="auto", num_workers=0, progress=False, model_overrides=dict(OVERRIDES),
        objective=objective, precision="fp32", compile=False, **ARMS[arm],
    ))
    return {"train_seconds": time.perf_counter() - start, "folder": str(folder),
            "ckpt_seconds": checkpoint_seconds(folder, args)}


def checkpoint_seconds(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Training wall clock up to each checkpoint, from metrics.jsonl (logged once per checkpoint interval): the
    step loop alone, without set-up (data, encoder) and checkpoint writing, so that arms compare by their steps."""
    per_window: dict[int, float] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "images_per_sec" in rec:  # a resumed run logs its windows again: the last record of a step wins
            per_window[int(rec["step"])] = args.eval_every * args.batch / rec["images_per_sec"]
    total, out = 0.0, {}
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        total += per_window.get(step, float("nan"))
        out[str(step)] = total
    return out


def score_run(folder: str, objective: str, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Accuracy and Fréchet distance of the EMA at each checkpoint (guided, as the demo samples)."""
    from ditkit.metrics.digits_classifier import score_sampler
    from ditkit.sample import Sampler
    from ditkit.weights.checkpoints import load_model_with_recipe

    scores = {}
    device = torch.device(args.device)
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        model, recipe = load_model_with_recipe(Path(folder) / "checkpoints" / f"{step:07d}")
        sampler = Sampler(model=model.to(device), vae=None, sampler="heun" if objective == "flow" else "dpm-solver",
                          num_steps=10 if objective == "flow" else 20, cfg_scale=CFG, guide_channels="all",
                          device=device, progress=False, recipe=recipe)
        got = score_sampler(sampler, args.eval_samples, seed=1)
        scores[step] = {"accuracy": float(got["accuracy"]), "frechet": float(got["frechet"])}
    return scores


def one_run(arm: str, objective: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train and score one run (in a worker process with --jobs > 1); the record entry, not yet written."""
    run = train_run(arm, objective, seed, args)
    run.update(arm=arm, objective=objective, seed=seed, scores=score_run(run["folder"], objective, args),
               device=args.device, threads=torch.get_num_threads())
    return run


def _spread(vals: list[float], fmt: str = ".2f") -> str:
    """mean [min–max] over seeds."""
    return f"{statistics.mean(vals):{fmt}} [{min(vals):{fmt}}–{max(vals):{fmt}}]"


def seconds_at(run: dict[str, Any], step: int, args: argparse.Namespace) -> float:
    """The run's training wall clock up to checkpoint `step`: measured per interval (ckpt_seconds) when the
    record has it, else (records before it was kept) the whole run's wall clock scaled by steps, set-up included."""
    if "ckpt_seconds" in run:
        return run["ckpt_seconds"][str(step)]
    return run["train_seconds"] * step / args.steps


def reach(run: dict[str, Any], steps: list[int], target: float = 0.98) -> int | None:
    """The first checkpoint whose digit-class accuracy is at least `target` (None: not reached)."""
    return next((s for s in steps if run["scores"][str(s)]["accuracy"] >= target), None)


def _by_arm(record: dict[str, Any], objective: str) -> dict[str, list[dict[str, Any]]]:
    """The objective's runs per arm (arms without runs left out)."""
    got = {arm: [r for r in record["runs"] if r["arm"] == arm and r["objective"] == objective] for arm in ARMS}
    return {arm: runs for arm, runs in got.items() if runs}


def steps_table(record: dict[str, Any], args: argparse.Namespace) -> str:
    """Equal step budgets: per arm and objective, the Fréchet distance at each checkpoint, mean [min–max] over
    seeds, the training seconds per run, accuracy at the last step and each seed's steps to accuracy ≥ 0.98."""
    steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    head = "| objective | recipe | train s/run | " + " | ".join(f"Fréchet @{s}" for s in steps)
    lines = [head + " | accuracy @last | steps to acc ≥ 0.98 |", "|" + " --- |" * (len(steps) + 5)]
    for objective in OBJECTIVES:
        for arm, runs in _by_arm(record, objective).items():
            cells = [_spread([r["scores"][str(s)]["frechet"] for r in runs]) for s in steps]
            acc = [r["scores"][str(steps[-1])]["accuracy"] for r in runs]
            reach_text = ", ".join("—" if s is None else str(s) for s in (reach(r, steps) for r in runs))
            secs = statistics.mean(seconds_at(r, steps[-1], args) for r in runs)
            lines.append(f"| {objective} | {arm} | {secs:.0f} | " + " | ".join(cells)
                         + f" | {_spread(acc, '.3f')} | {reach_text} |")
    return "\n".join(lines)


def clock_table(record: dict[str, Any], args: argparse.Namespace) -> str:
    """Equal training wall clock: per objective the budget is the fastest arm's mean time to the last step (so
    every arm has checkpoints up to it); each seed of each arm is read at its last checkpoint finished within
    that budget (no interpolation: the curves are not smooth enough). Also each seed's seconds to accuracy ≥ 0.98."""
    steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    lines = ["| objective | recipe | budget s | steps reached | Fréchet @budget | accuracy @budget | "
             "s to acc ≥ 0.98 |", "|" + " --- |" * 7]
    for objective in OBJECTIVES:
        arms = _by_arm(record, objective)
        if not arms:
            continue
        budget = min(statistics.mean(seconds_at(r, steps[-1], args) for r in runs) for runs in arms.values())
        for arm, runs in arms.items():
            at = [max((s for s in steps if seconds_at(r, s, args) <= budget), default=None) for r in runs]
            got = [(r, s) for r, s in zip(runs, at) if s is not None]
            fre = _spread([r["scores"][str(s)]["frechet"] for r, s in got]) if got else "—"
            acc = _spread([r["scores"][str(s)]["accuracy"] for r, s in got], ".3f") if got else "—"
            first = [reach(r, steps) for r in runs]
            secs = ", ".join("—" if s is None else f"{seconds_at(r, s, args):.0f}" for r, s in zip(runs, first))
            reached = ", ".join("—" if s is None else str(s) for s in at)
            lines.append(f"| {objective} | {arm} | {budget:.0f} | {reached} | {fre} | {acc} | {secs} |")
    return "\n".join(lines)


def summary(record: dict[str, Any], args: argparse.Namespace) -> str:
    """Both comparisons the issue asks for: at the same step budgets, and at the same training wall clock."""
    return ("Same step budget (mean [min–max] over seeds):\n" + steps_table(record, args)
            + "\n\nSame training wall clock (budget: the fastest arm's mean time to the last step; each seed at "
            "its last checkpoint within it):\n" + clock_table(record, args))


def draw(record: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Fréchet vs steps, one panel per objective, one line per recipe (seed mean), the seeds' range as a band."""
    from PIL import Image, ImageDraw

    from ditkit.apps.scaling import PALETTE, _font, _text, axis_ticks

    steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    w, h, left, top, pw, ph = 1200, 520, 70, 50, 420, 380
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img, "RGBA")
    allv = [r["scores"][str(s)]["frechet"] for r in record["runs"] for s in steps]
    lo, hi = 0.0, max(allv) * 1.05
    for k, objective in enumerate(OBJECTIVES):
        x0 = left + k * (pw + 90)

        def px(step: float, v: float, x0: int = x0) -> tuple[float, float]:
            return x0 + (step - steps[0]) / max(1, steps[-1] - steps[0]) * pw, top + ph - (v - lo) / (hi - lo) * ph

        for t in axis_ticks(lo, hi, False):
            d.line([px(steps[0], t), px(steps[-1], t)], fill="#e6e6e6")
            _text(d, (x0 - 6, px(steps[0], t)[1]), f"{t:g}", _font(12), "rm")
        for s in steps:
            _text(d, (px(s, lo)[0], top + ph + 6), str(s), _font(12), "ma")
        d.rectangle([x0, top, x0 + pw, top + ph], outline="black")
        _text(d, (x0 + pw / 2, 15), f"{objective}: digits Frechet distance vs training steps", _font(15), "ma")
        for i, arm in enumerate(ARMS):
            runs = [r for r in record["runs"] if r["arm"] == arm and r["objective"] == objective]
            if not runs:
                continue
            color = PALETTE[i % len(PALETTE)]
            vals = [[r["scores"][str(s)]["frechet"] for r in runs] for s in steps]
            band = [px(s, max(v)) for s, v in zip(steps, vals)] + [px(s, min(v)) for s, v in reversed(
                list(zip(steps, vals)))]
            rgb = tuple(int(color[j:j + 2], 16) for j in (1, 3, 5))
            d.polygon(band, fill=(*rgb, 50))
            d.line([px(s, statistics.mean(v)) for s, v in zip(steps, vals)], fill=color, width=3)
            if k == 1:
                _text(d, (x0 + pw + 12, top + 12 + 22 * i), f"{arm} ({len(runs)} seeds)", _font(13), "lm", color)
    _text(d, (w / 2 - 60, h - 20), "training steps (band: min-max over seeds; line: mean)", _font(13), "ma")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _pin(slots: Any, threads: int) -> None:
    """Worker start: take one core set from the queue (each worker its own), stay on it, use that many threads."""
    cores = slots.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


def core_sets(jobs: int, threads: int) -> list[set[int]]:
    """`jobs` disjoint sets of `threads` cores from those this process may use (wrapping round when short)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return [{cores[(j * threads + i) % len(cores)] for i in range(threads)} for j in range(jobs)]


def prepare(args: argparse.Namespace) -> None:
    """Before any worker starts: the cache folder and device for every process (children inherit the
    environment), and the cached models trained once here rather than by every worker at the same time."""
    if args.cache:
        os.environ["DITKIT_CACHE"] = str(Path(args.cache).resolve())
    if args.device == "cpu":  # `ditkit train` takes the GPU when it sees one: hide it from every process
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible")
    from ditkit.metrics.digits_classifier import get_digits_classifier

    get_digits_classifier(8)
    if any(ARMS[arm].get("repa_encoder") for arm in args.arms):
        from ditkit.encoders.features import digits_encoder_path, load_digits_encoder

        print(f"digits-mae encoder: {digits_encoder_path()} (trained now if absent: minutes)", flush=True)
        load_digits_encoder(verbose=True)


def run_all(todo: list[tuple[str, str, int]], record: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Every pending run, --jobs at a time; results are gathered here and --out written by this process only."""
    def keep(run: dict[str, Any]) -> None:
        record["runs"].append(run)
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        last = run["scores"][args.steps]
        print(f"{run['arm']:>10} {run['objective']:>9} seed {run['seed']}: {run['train_seconds']:.0f} s, Fréchet "
              f"{last['frechet']:.2f}, accuracy {last['accuracy']:.3f}", flush=True)

    if args.jobs == 1:
        torch.set_num_threads(args.threads)
        for arm, objective, seed in todo:
            keep(one_run(arm, objective, seed, args))
        return
    ctx = multiprocessing.get_context("spawn")  # no forked copies of this process's torch threads
    slots = ctx.Queue()
    for cores in core_sets(args.jobs, args.threads):
        slots.put(cores)
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_pin, initargs=(slots, args.threads)) as pool:
        futures = [pool.submit(one_run, arm, objective, seed, args) for arm, objective, seed in todo]
        for future in as_completed(futures):
            keep(future.result())


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The study's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--runs", default="results/convergence_repa_tread", help="the runs' folders")
    p.add_argument("--out", default="results/convergence_repa_tread.json")
    p.add_argument("--plot", default=None, help="write the picture here (PNG)")
    p.add_argument("--report-only", action="store_true", help="no training: the table and picture from --out")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each a process on its own cores")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (and cores) per run (default: 2 with --jobs 1, else the cores / jobs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where runs train and sample (cuda: every job shares the visible GPU)")
    p.add_argument("--cache", default=None,
                   help="ditkit's cache folder (DITKIT_CACHE): where the digits-mae encoder and the classifier are")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.threads is None:
        args.threads = 2 if args.jobs == 1 else max(1, _cores() // args.jobs)
    return args


def _cores() -> int:
    """How many cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"settings": {}, "runs": []}
    record["settings"] = {k: getattr(args, k) for k in ("steps", "eval_every", "batch", "eval_samples")} | {
        "model": MODEL, "overrides": OVERRIDES, "arms": ARMS, "cfg": CFG}
    done = {(r["arm"], r["objective"], r["seed"]) for r in record["runs"]}
    # seeds outermost: a cut-short study still has every recipe at the first seeds
    todo = [(arm, objective, seed) for seed in ([] if args.report_only else args.seeds)
            for objective in args.objectives for arm in args.arms if (arm, objective, seed) not in done]
    if todo:
        start = time.perf_counter()
        prepare(args)
        run_all(todo, record, out, args)
        print(f"{len(todo)} runs in {time.perf_counter() - start:.0f} s "
              f"({args.jobs} at once, {args.threads} threads each, {args.device})", flush=True)
    record = json.loads(out.read_text())
    print(summary(record, args))
    if args.plot:
        draw(record, args, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
