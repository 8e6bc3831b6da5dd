"""The `ditkit sample` command line in the test process: its arguments as parsed, and whole runs."""

from __future__ import annotations

import argparse

from ditkit import sample as sample_mod
from ditkit.cli import main


def parse(ckpt, *argv: str) -> argparse.Namespace:
    """The `ditkit sample` arguments, defaults included, as the CLI parses them."""
    parser = argparse.ArgumentParser()
    sample_mod.add_arguments(parser)
    return parser.parse_args(["--ckpt", str(ckpt), "--no-progress", *argv])


def run_cli(*argv: str) -> int:
    """`ditkit sample ARGV --no-progress` in this process; the exit code."""
    return main(["sample", *argv, "--no-progress"])


def refusal_line(argv: list[str], capsys) -> str:
    """Run `ditkit ARGV` in-process; assert it exits 2 with exactly one `ditkit` line and no traceback; return it."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ditkit")]
    assert len(lines) == 1, err
    return lines[0]
