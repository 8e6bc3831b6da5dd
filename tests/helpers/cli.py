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
