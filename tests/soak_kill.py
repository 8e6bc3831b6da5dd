"""Kill-anywhere soak: SIGKILL `ditkit train`, `ditkit extract` and `ditkit sample --num-samples` at random
moments (some aimed at the instant a checkpoint or shard is being written), resume each time, and check that

- after every kill, every checkpoint / shard on disk under its final name is readable,
- nothing finished before a kill is lost or redone after it (data lost: must be none),
- the finished job equals an uninterrupted run exactly (checkpoint, shard and .npz bytes) on the CPU;
- `train-workers` (an image folder read by 2 DataLoader worker processes) is stopped by SIGTERM to its whole
  process group instead, as SLURM pre-empts a job: every stop must exit 0 with a checkpoint, losing no step;
- a second run started on a folder in use is refused (exit 2, one line naming the first one's pid), the first
  goes on, and once it is SIGKILLed its folder is free again and the run finishes equal to the reference.

Run:  .venv/bin/python tests/soak_kill.py --seconds 240        (CI runs a short version: tests/
test_reliability_kill.py). It prints one summary per job and, with --json, one JSON object. It lives in tests/
(formerly benchmarks/) because it is that test's machinery, built on the tests' data fixtures, and measures
no speed.

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
import tempfile
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
    second_writer: str = "not tried"  # "refused" when a second run on the same folder was turned away
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        writer_ok = self.second_writer in ("not tried", "refused")
        return self.final_equal and not self.data_lost and not self.unreadable and writer_ok

    def summary(self) -> str:
        lost = self.lost_per_kill
        mean = sum(lost) / len(lost) if lost else 0.0
        return (
            f"{self.job}: {self.kills} kills survived ({self.kills_during_write} during a write), {self.runs} runs, "
            f"lost per kill mean {mean:.2f} max {max(lost, default=0)}, data lost {len(self.data_lost)}, "
            f"unreadable {len(self.unreadable)}, final equal to uninterrupted: {self.final_equal}, "
            f"second writer: {self.second_writer}, {self.seconds:.0f} s"
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

    def __init__(self, steps: int = 24, ckpt_every: int = 1, images: Path | None = None, workers: int = 0,
                 objective: str = "diffusion") -> None:
        """Digits by default; with `images` an image folder read by `workers` DataLoader processes."""
        data = dict(data_path=str(images), global_batch_size=4) if images else dict(data_path="digits",
                                                                                   global_batch_size=16)
        settings = dict(**data, model="DiT-S/2", image_size=8, log_every=1, lr=1e-3, num_workers=workers,
                        progress=False, model_overrides=TINY, max_steps=steps, ckpt_every=ckpt_every, resume="auto",
                        objective=objective)
        self.steps, self.settings = steps, settings
        self.model_config = dict(in_channels=3, num_classes=3) if images else dict(in_channels=1, num_classes=10)
        self.script = textwrap.dedent(
            f"""
            import sys
            from ditkit.runtime.errors import UserError
            from ditkit.train import TrainOptions, train_as_command
            try:  # the tiny model is not a command-line flag; the rest is what `ditkit train` does
                train_as_command(TrainOptions(results_dir=sys.argv[1], **{settings!r}))
            except UserError as err:  # as the command line reports it
                sys.exit(print(f"ditkit train: error: {{err}}", file=sys.stderr) or 2)
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
        from ditkit.models import DiT, DiTConfig
        from ditkit.runtime.errors import UserError
        from ditkit.train.checkpoint import load_training_checkpoint

        model = DiT(DiTConfig.from_name("DiT-S/2", input_size=8, **self.model_config, **TINY))
        try:
            ckpt = load_training_checkpoint(work / "checkpoints" / name, model)
            model.load_state_dict(ckpt.model)
            model.load_state_dict(ckpt.ema)
        except (UserError, RuntimeError) as err:
            return str(err)
        return None if ckpt.step == int(name) else f"step {ckpt.step} stored in folder {name}"

    def result(self, work: Path) -> str:
        # File bytes: weights, EMA, optimizer state and RNG state all equal an uninterrupted run's.
        final = work / "checkpoints" / f"{self.steps:07d}"
        return _digest_files([final / "model.safetensors", final / "ema.safetensors", final / "state.pt"])


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
        from ditkit.runtime.errors import UserError

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

    def temporaries(self, work: Path) -> set[str]:  # the shards' and the final file's (written as it goes)
        return _names(work / "shards", lambda n: n.endswith(".tmp")) | _names(work, lambda n: n.endswith(".tmp"))

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
              max_delay: float = 6.0, deadline: float | None = None, how: str = "kill") -> SoakReport:
    """Kill `job` up to `kills` times (or until `deadline`), resume, finish, and compare with `reference`.

    Every other kill waits for a temporary checkpoint/shard to appear and kills at once (a write in flight);
    the others come after a random delay in [0, max_delay] s from the process start (imports included).
    `how`: "kill" sends SIGKILL to the process; "term-group" sends SIGTERM to its whole process group (it is
    started in a session of its own), workers included, as SLURM does before pre-emption: the process must
    then write a checkpoint at the step it reached and exit 0, so no step is lost.
    """
    report = SoakReport(job.name if how == "kill" else f"{job.name} ({how})")
    start = time.time()
    before: dict[str, str] = {}
    for i in range(kills):
        if deadline is not None and time.time() > deadline:
            break
        stale = job.temporaries(work)  # leftovers of earlier kills are not a write in flight
        job.started(work)
        errors = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while the job runs
        proc = subprocess.Popen(job.command(work), env=ENV, stdout=subprocess.DEVNULL, stderr=errors,
                                start_new_session=how == "term-group")
        report.runs += 1
        if how == "term-group":
            # A stop is asked of a running loop: before its signal handler exists (imports) SIGTERM kills any
            # process, which loses nothing here but tests nothing either.
            begun = job.progress(work)
            while proc.poll() is None and job.progress(work) == begun:
                time.sleep(0.01)
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
        if how == "term-group":
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=300)
            if proc.returncode != 0:
                errors.seek(0)
                tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
                report.data_lost.append(f"kill {report.kills + 1}: exit {proc.returncode} after SIGTERM to the "
                                        f"group: {tail}")
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        errors.close()
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


def second_writer(job: Job, work: Path, timeout: float = 120) -> str | None:
    """Start `job` on `work`; once it holds the folder's lock, pause it (SIGSTOP: so that it cannot finish
    first, however small the job) and start the job again on the same folder. The second must be refused at
    once: exit 2, one line naming the folder and the first one's pid. Then the first is SIGKILLed, and its
    lock must die with it (the caller's next run on `work` shows that). None when all holds, else the problem."""
    job.started(work)
    first = subprocess.Popen(job.command(work), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = work / ".ditkit.lock"
    try:
        deadline = time.time() + timeout
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
            if first.poll() is not None:
                return f"the first run ended (exit {first.returncode}) before it was seen holding the lock"
            if time.time() > deadline:
                return "the first run took no lock"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(job.command(work), env=ENV, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in second.stderr.splitlines() if ln.startswith("ditkit") or "Error" in ln]
        if second.returncode != 2 or len(lines) != 1 or f"pid {first.pid}" not in lines[0] or \
                str(work) not in lines[0]:
            return f"second writer: exit {second.returncode}, {second.stderr.strip()[-300:]!r}"
        return None
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)  # a stopped process takes SIGKILL too
        first.wait()


# ----------------------------------------------------------------------------------------------- set-up


def make_inputs(base: Path, num_images: int = 30) -> dict[str, Path]:
    """The tiny image folder, VAE and sampling checkpoint the jobs use (made once)."""
    import torch

    import ditkit
    from ditkit.weights.checkpoints import save_model
    from helpers.images import smooth_image
    from helpers.vae import make_tiny_vae

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
        # An image folder read by two DataLoader worker processes: what a process-group SIGTERM must spare.
        "train-workers": TrainJob(steps=train_steps, images=inputs["images"], workers=2),
        "train-meanflow": TrainJob(steps=train_steps, objective="meanflow"),  # its 3 draws a step, its JVP
        "extract": ExtractJob(inputs["images"], inputs["vae"]),
        "sample": SampleJob(inputs["ckpt"], num_samples=num_samples),
    }


HOW = {"train-workers": "term-group"}  # jobs stopped by SIGTERM to their process group; the others by SIGKILL


def soak_job(job: Job, name: str, base: Path, rng: random.Random, seconds: float, max_delay: float) -> SoakReport:
    """The kill loop for one job, then the two-writer check on a fresh folder (finished afterwards, so the
    lock is shown to have died with its SIGKILLed holder and the output to be intact)."""
    reference = base / f"{name}-reference"
    _run_to_end(job, reference)
    report = kill_loop(job, base / f"{name}-killed", reference, kills=10**6, rng=rng, max_delay=max_delay,
                       deadline=time.time() + seconds, how=HOW.get(name, "kill"))
    two = base / f"{name}-two-writers"
    problem = second_writer(job, two)
    if problem is None:
        _run_to_end(job, two)
        problem = None if job.result(two) == job.result(reference) else "the output differs after the refusal"
    report.second_writer = problem or "refused"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240, help="wall-clock budget over all jobs")
    parser.add_argument("--jobs", default="train,train-workers,extract,sample",
                        help="train-workers: image folder with 2 DataLoader workers, stopped by SIGTERM to the group")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=400, help="images the sample job makes")
    parser.add_argument("--num-images", type=int, default=60, help="images the extract job encodes")
    parser.add_argument("--max-delay", type=float, default=6.0, help="longest random delay before a kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = Path(args.work or tempfile.mkdtemp(prefix="ditkit-soak-"))
    inputs = make_inputs(base / "inputs", args.num_images)
    jobs = make_jobs(inputs, args.train_steps, args.num_samples)
    names = [j for j in args.jobs.split(",") if j]
    rng = random.Random(args.seed)
    reports = []
    for name in names:
        share = args.seconds / len(names)  # kill time per job; reference, final and two-writer runs come on top
        report = soak_job(jobs[name], name, base, rng, share, args.max_delay)
        reports.append(report)
        print(report.summary(), flush=True)
        for line in report.data_lost + report.unreadable:
            print("  PROBLEM", line, flush=True)
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in reports]))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
