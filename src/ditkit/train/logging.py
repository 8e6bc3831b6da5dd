"""Rank-0 logs of a training run: a progress bar, log.txt, metrics.jsonl and TensorBoard scalars."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ditkit.train.options import TrainOptions


def progress_bar(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


class RunLogger:
    """Rank-0 logs: a text log, metrics.jsonl, and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, results: Path, opts: TrainOptions, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        results.mkdir(parents=True, exist_ok=True)
        (results / "config.json").write_text(json.dumps(run_config, indent=2))
        (results / "options.json").write_text(json.dumps(asdict(opts), indent=2, default=str))
        self.log = open(results / "log.txt", "a")
        self.jsonl = open(results / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(results / "tensorboard"))
        except ImportError:
            self.tb = None

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr)
            self.log.write(text + "\n")
            self.log.flush()

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.log.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
