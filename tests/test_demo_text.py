"""`ditkit demo --text` end to end on a few steps: it trains, reuses the training, writes the grid and figures."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def test_text_demo_runs_end_to_end_and_reuses_training(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ditkit", "demo", "--text", "--results-dir", str(out), "--steps", "3",
           "--num-samples", "20", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    figures = json.loads(first.stdout.strip().splitlines()[-1])
    for part in ("trained_combinations", "held_out_combinations"):
        assert set(figures[part]) == {"digit", "foreground", "background", "colour", "all"}
        assert all(0.0 <= v <= 1.0 for v in figures[part].values())
    assert "held out combinations: digit" in first.stdout and not figures["reused_training"]
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 20 * 32  # one row per prompt: each digit in its held-out colour and in another
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["reused_training"]


def test_text_demo_bad_arguments_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "ditkit", "demo", "--text", "--results-dir", str(tmp_path / "d"), "--steps", "0"]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--steps" in bad.stderr
