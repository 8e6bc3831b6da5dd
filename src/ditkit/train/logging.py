"""Rank-0 logs of a training run: a progress bar, log.txt, metrics.jsonl and TensorBoard scalars.

A log write never ends a run: when one fails (a full disk, an exceeded quota, a vanished network mount) the
run warns once per file and goes on training and checkpointing; the log picks up again once writes succeed.
Only a checkpoint that cannot be written stops the run, naming the newest intact one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ditkit.runtime.io import atomic_write
from ditkit.train.options import TrainOptions


def progress_bar(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def _warn(text: str) -> None:
    try:
        print(f"warning: {text}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr itself may be a file on the full disk


class _AppendLog:
    """One append-only log file whose failed writes warn once and are otherwise dropped."""

    def __init__(self, path: Path) -> None:
        self.path, self._file, self._warned = path, None, False

    def write(self, text: str) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "a")  # noqa: SIM115 - kept open across writes, closed in close()
            self._file.write(text)
            self._file.flush()
        except OSError as err:
            self.close()  # a fresh file object next time: the failed one still holds the unwritten buffer
            if not self._warned:
                self._warned = True
                _warn(f"cannot write {self.path} ({err.strerror or err}); training goes on and checkpoints are "
                      "still written; this log resumes when writes succeed again")

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass


class RunLogger:
    """Rank-0 logs: a text log, metrics.jsonl, and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, results: Path, opts: TrainOptions, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        results.mkdir(parents=True, exist_ok=True)
        for name, content in (("config.json", run_config), ("options.json", asdict(opts))):
            text = json.dumps(content, indent=2, default=str)
            atomic_write(results / name, lambda tmp, text=text: Path(tmp).write_text(text))
        self.log = _AppendLog(results / "log.txt")
        self.jsonl = _AppendLog(results / "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(results / "tensorboard"))
        except ImportError:
            self.tb = None
        except OSError as err:
            self._tensorboard_failed(err)

    def line(self, text: str) -> None:
        if self.enabled:
            try:
                print(text, file=sys.stderr)
            except OSError:
                pass  # stderr on a full disk: log.txt below may still take it
            self.log.write(text + "\n")

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            try:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.tb.add_scalar(f"train/{key}", value, record["step"])
            except Exception as err:  # noqa: BLE001 - its writer thread re-raises whatever its file write raised
                self._tensorboard_failed(err)

    def _tensorboard_failed(self, err: BaseException) -> None:
        tb, self.tb = self.tb, None
        if tb is not None:
            try:
                tb.close()
            except Exception:  # noqa: BLE001 - closing flushes, which fails the same way
                pass
        _warn(f"TensorBoard logging stopped ({type(err).__name__}: {err}); training goes on, metrics.jsonl keeps "
              "the same scalars")

    def close(self) -> None:
        """Close the files (again is harmless: a run that ends by an error closes them on its way out)."""
        if self.enabled:
            self.log.close()
            self.jsonl.close()
            if self.tb is not None:
                try:
                    self.tb.close()
                    self.tb = None
                except Exception as err:  # noqa: BLE001 - see metrics()
                    self._tensorboard_failed(err)
