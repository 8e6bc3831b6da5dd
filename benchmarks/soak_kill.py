"""Kill-anywhere soak: SIGKILL `ditkit train`, `ditkit extract` and `ditkit sample --num-samples` at random
moments (some aimed at the instant a checkpoint or shard is being written), resume each time, and check that

- after every kill, every checkpoint / shard on disk under its final name is readable,
- nothing finished before a kill is lost or redone after it (data lost: must be none),
- the finished job equals an uninterrupted run exactly (weights, shards, .npz bytes) on the CPU.

Run:  .venv/bin/python benchmarks/soak_kill.py --seconds 240        (CI runs a short version: tests/
test_reliability_kill.py). It prints one summary per job and, with --json, one JSON object.

Jobs run tiny models (DiT depth 2, width 64, 8×8 digits; a 4-block VAE on 32×32 images) so that a kill cycle
costs about one process start. "Steps lost" for training = steps finished at the kill (metrics.jsonl) minus
the step of the newest checkpoint left on disk; for extract and sample the unit is a shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4}


@dataclass
class SoakReport:
    """What one job's kill loop saw."""

    job: str
    kills: int = 0
    kills_during_write: int = 0  # killed while a temporary checkpoint/shard existed
    runs: int = 0  # process starts, the final uninterrupted one included
    lost_per_kill: list[int] = field(default_factory=list)  # steps (train) or shards (extract, sample)
    data_lost: list[str] = field(default_factory=list)  # finished items that vanished, changed or went unreadable
    unreadable: list[str] = field(default_factory=list)
    final_equal: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.final_equal and not self.data_lost and not self.unreadable

    def summary(self) -> str:
        lost = self.lost_per_kill
        mean = sum(lost) / len(lost) if lost else 0.0
        return (
            f"{self.job}: {self.kills} kills survived ({self.kills_during_write} during a write), {self.runs} runs, "
            f"lost per kill mean {mean:.2f} max {max(lost, default=0)}, data lost {len(self.data_lost)}, "
            f"unreadable {len(self.unreadable)}, final equal to uninterrupted: {self.final_equal}, "
            f"{self.seconds:.0f} s"
        )


# ----------------------------------------------------------------------------------------------- jobs


class Job:
    """One resumable command, how to see its progress, and how to check what it left on disk."""

    name = "job"

    def command(self, work: Path) -> list[str]:
        raise NotImplementedError

    def started(self, work: Path) -> None:
        """Called just before each process start (progress is counted from here)."""

    def temporaries(self, work: Path) -> set[str]:
        """Names of temporary (not yet renamed) checkpoints or shards on disk now."""
        raise NotImplementedError

    def progress(self, work: Path) -> int:
        """Units (steps or shards) finished so far."""
        raise NotImplementedError

    def finished(self, work: Path) -> dict[str, str]:
        """Finished durable items under their final names -> a content fingerprint."""
        raise NotImplementedError

    def saved_units(self, work: Path) -> int:
        """Units that a resume will not redo."""
        raise NotImplementedError

    def check(self, work: Path, name: str) -> str | None:
        """None when the finished item `name` reads back; else the reason."""
        raise NotImplementedError

    def result(self, work: Path) -> str:
        """A fingerprint of the final output, compared with an uninterrupted run's."""
        raise NotImplementedError


def _names(folder: Path, keep) -> set[str]:
    try:
        return {e.name for e in os.scandir(folder) if keep(e.name)}
    except FileNotFoundError:
        return set()


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


class TrainJob(Job):
    name = "train"

    def __init__(self, steps: int = 24, ckpt_every: int = 1) -> None:
        settings = dict(data_path="digits", model="DiT-S/2", image_size=8, global_batch_size=16, log_every=1,
                        lr=1e-3, num_workers=0, progress=False, model_overrides=TINY, max_steps=steps,
                        ckpt_every=ckpt_every, resume="auto")
        self.steps, self.settings = steps, settings
        self.script = textwrap.dedent(
            f"""
            import sys
            from ditkit.train import TrainOptions, train
            train(TrainOptions(results_dir=sys.argv[1], **{settings!r}))
            """
        )

    def command(self, work: Path) -> list[str]:
        return [sys.executable, "-c", self.script, str(work)]

    def temporaries(self, work: Path) -> set[str]:
        return _names(work / "checkpoints", lambda n: n.startswith(".tmp-"))

    def started(self, work: Path) -> None:
        path = work / "metrics.jsonl"
        self._offset = path.stat().st_size if path.exists() else 0
        self._resumed_at = self.saved_units(work)

    def progress(self, work: Path) -> int:
        """The last step this process logged (metrics.jsonl, one line a step), else where it resumed from."""
        try:
            with open(work / "metrics.jsonl", "rb") as f:
                f.seek(self._offset)
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError):
                continue  # a line cut by the kill
        return self._resumed_at

    def finished(self, work: Path) -> dict[str, str]:
        from ditkit.train.checkpoint import list_checkpoints

        return {p.name: _digest_files([f for f in p.iterdir()]) for p in list_checkpoints(work / "checkpoints")}

    def saved_units(self, work: Path) -> int:
        from ditkit.train.checkpoint import list_checkpoints

        found = list_checkpoints(work / "checkpoints")
        return int(found[-1].name) if found else 0

    def check(self, work: Path, name: str) -> str | None:
        from ditkit.errors import UserError
        from ditkit.models import DiT, DiTConfig
        from ditkit.train.checkpoint import load_training_checkpoint

        model = DiT(DiTConfig.from_name("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY))
        try:
            ckpt = load_training_checkpoint(work / "checkpoints" / name, model)
            model.load_state_dict(ckpt.model)
            model.load_state_dict(ckpt.ema)
        except (UserError, RuntimeError) as err:
            return str(err)
        return None if ckpt.step == int(name) else f"step {ckpt.step} stored in folder {name}"

    def result(self, work: Path) -> str:
        # Tensors, not file bytes: safetensors writes its metadata map in arbitrary order.
        from safetensors.torch import load_file

        final = work / "checkpoints" / f"{self.steps:07d}"
        h = hashlib.sha256()
        for name in ("model", "ema"):
            tensors = load_file(str(final / f"{name}.safetensors"))
            for key in sorted(tensors):
                h.update(key.encode())
                h.update(tensors[key].numpy().tobytes())
        return h.hexdigest()


class ExtractJob(Job):
    name = "extract"

    def __init__(self, images: Path, vae: Path) -> None:
        self.images, self.vae = images, vae

    def command(self, work: Path) -> list[str]:
        return [sys.executable, "-m", "ditkit", "extract", str(self.images), "--out", str(work), "--vae",
                str(self.vae), "--image-size", "32", "--batch-size", "1", "--shard-size", "1", "--dtype",
                "float32", "--workers", "0", "--device", "cpu", "--no-progress"]

    def temporaries(self, work: Path) -> set[str]:
        return _names(work, lambda n: n.endswith(".tmp"))

    def progress(self, work: Path) -> int:
        return len(self.finished(work))

    def finished(self, work: Path) -> dict[str, str]:
        if not work.is_dir():
            return {}
        return {p.name: _digest_files([p]) for p in work.glob("shard-*.safetensors")}

    def saved_units(self, work: Path) -> int:
        return self.progress(work)

    def check(self, work: Path, name: str) -> str | None:
        from ditkit.data.store import open_shard, shard_metadata
        from ditkit.errors import UserError

        try:
            if shard_metadata(work / name) is None:
                return "no ditkit metadata"
            open_shard(work / name)
        except (UserError, OSError, ValueError) as err:
            return str(err)
        return None

    def result(self, work: Path) -> str:
        return _digest_files(list(work.glob("shard-*.safetensors")) + [work / "manifest.json"])


class SampleJob(Job):
    name = "sample"

    def __init__(self, ckpt: Path, num_samples: int = 48, batch_size: int = 4, steps: int = 25) -> None:
        self.ckpt, self.num_samples, self.batch_size, self.steps = ckpt, num_samples, batch_size, steps

    def command(self, work: Path) -> list[str]:
        return [sys.executable, "-m", "ditkit", "sample", "--ckpt", str(self.ckpt), "--num-samples",
                str(self.num_samples), "--batch-size", str(self.batch_size), "--sampler", "ddim", "--num-steps",
                str(self.steps), "--device", "cpu", "--out", str(work), "--no-progress"]

    def temporaries(self, work: Path) -> set[str]:
        return _names(work / "shards", lambda n: n.endswith(".tmp"))

    def progress(self, work: Path) -> int:
        return len(self.finished(work))

    def finished(self, work: Path) -> dict[str, str]:
        return {p.name: _digest_files([p]) for p in (work / "shards").glob("shard_*.npz")}

    def saved_units(self, work: Path) -> int:
        return self.progress(work)

    def check(self, work: Path, name: str) -> str | None:
        import numpy as np

        try:
            with np.load(work / "shards" / name) as f:
                if f["arr_0"].shape[0] != self.batch_size or f["arr_1"].shape[0] != self.batch_size:
                    return f"shard holds {f['arr_0'].shape[0]} images, not {self.batch_size}"
        except (OSError, ValueError, KeyError) as err:
            return str(err)
        return None

    def result(self, work: Path) -> str:
        return _digest_files(list(work.glob("samples_*.npz")))


# ----------------------------------------------------------------------------------------------- the loop


def run_in_process(job: Job, work: Path) -> None:
    """The uninterrupted reference run, in this process (saves a Python start-up in CI)."""
    if isinstance(job, TrainJob):
        from ditkit.train import TrainOptions, train

        train(TrainOptions(results_dir=str(work), **job.settings))
        return
    from ditkit.cli import main

    argv = job.command(work)[3:]  # drop "python -m ditkit"
    if main(argv) != 0:
        raise RuntimeError(f"{job.name} reference run failed")


def _run_to_end(job: Job, work: Path, timeout: float = 600) -> None:
    done = subprocess.run(job.command(work), env=ENV, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{job.name} failed (exit {done.returncode}): {done.stderr[-2000:]}")


def kill_loop(job: Job, work: Path, reference: Path, kills: int, rng: random.Random,
              max_delay: float = 6.0, deadline: float | None = None) -> SoakReport:
    """Kill `job` up to `kills` times (or until `deadline`), resume, finish, and compare with `reference`.

    Every other kill waits for a temporary checkpoint/shard to appear and kills at once (a write in flight);
    the others come after a random delay in [0, max_delay] s from the process start (imports included).
    """
    report = SoakReport(job.name)
    start = time.time()
    before: dict[str, str] = {}
    for i in range(kills):
        if deadline is not None and time.time() > deadline:
            break
        stale = job.temporaries(work)  # leftovers of earlier kills are not a write in flight
        job.started(work)
        proc = subprocess.Popen(job.command(work), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report.runs += 1
        aim_at_write = i % 2 == 1
        delay = rng.uniform(0.0, max_delay)
        t0 = time.time()
        hit_write = False
        while proc.poll() is None:
            if aim_at_write:
                if job.temporaries(work) - stale:
                    hit_write = True
                    break
                if time.time() - t0 > 4 * max_delay:
                    break  # no write seen in time: kill anyway
                time.sleep(0.001)
            else:
                if time.time() - t0 >= delay:
                    break
                time.sleep(0.01)
        if proc.poll() is not None:
            break  # finished before the kill: the loop is over
        hit_write = hit_write or bool(job.temporaries(work) - stale)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report.kills += 1
        report.kills_during_write += int(hit_write)
        reached = job.progress(work)
        after = job.finished(work)
        report.lost_per_kill.append(max(0, reached - job.saved_units(work)))
        for name, digest in before.items():
            if after.get(name) != digest:
                report.data_lost.append(f"kill {report.kills}: {name} {'changed' if name in after else 'vanished'}")
        for name in sorted(set(after) - set(before)):
            problem = job.check(work, name)
            if problem:
                report.unreadable.append(f"kill {report.kills}: {name}: {problem}")
        before = after
    _run_to_end(job, work)
    report.runs += 1
    after = job.finished(work)
    for name, digest in before.items():
        if after.get(name) != digest:
            report.data_lost.append(f"final run: {name} {'changed' if name in after else 'vanished'}")
    report.final_equal = job.result(work) == job.result(reference)
    report.seconds = time.time() - start
    return report


# ----------------------------------------------------------------------------------------------- set-up


def make_inputs(base: Path, num_images: int = 30) -> dict[str, Path]:
    """The tiny image folder, VAE and sampling checkpoint the jobs use (made once)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import ditkit
    from ditkit.checkpoints import save_model
    from test_data_fixtures import make_tiny_vae, smooth_image

    base.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    images = base / "images"
    for i in range(num_images):  # enough images that an extract runs for several seconds
        folder = images / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(40, 36, seed=i)).save(folder / f"img{i:03d}.png")
    vae = make_tiny_vae(base / "vae")
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY)
    for p in model.parameters():  # random output layers, so samples depend on the weights
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    save_model(model, base / "tiny.safetensors")
    return {"images": images, "vae": vae, "ckpt": base / "tiny.safetensors"}


def make_jobs(inputs: dict[str, Path], train_steps: int = 24, num_samples: int = 48) -> dict[str, Job]:
    return {
        "train": TrainJob(steps=train_steps),
        "extract": ExtractJob(inputs["images"], inputs["vae"]),
        "sample": SampleJob(inputs["ckpt"], num_samples=num_samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240, help="wall-clock budget over all jobs")
    parser.add_argument("--jobs", default="train,extract,sample")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=400, help="images the sample job makes")
    parser.add_argument("--num-images", type=int, default=60, help="images the extract job encodes")
    parser.add_argument("--max-delay", type=float, default=6.0, help="longest random delay before a kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import tempfile

    base = Path(args.work or tempfile.mkdtemp(prefix="ditkit-soak-"))
    inputs = make_inputs(base / "inputs", args.num_images)
    jobs = make_jobs(inputs, args.train_steps, args.num_samples)
    names = [j for j in args.jobs.split(",") if j]
    rng = random.Random(args.seed)
    reports = []
    for name in names:
        job = jobs[name]
        reference = base / f"{name}-reference"
        _run_to_end(job, reference)
        share = args.seconds / len(names)  # kill time per job; reference and final runs come on top
        report = kill_loop(job, base / f"{name}-killed", reference, kills=10**6, rng=rng,
                           max_delay=args.max_delay, deadline=time.time() + share)
        reports.append(report)
        print(report.summary(), flush=True)
        for line in report.data_lost + report.unreadable:
            print("  PROBLEM", line, flush=True)
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in reports]))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
