"""Where metrics keep what they compute once: trained digit classifiers and reference statistics."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$DITKIT_CACHE` if set, else `~/.cache/ditkit` (created on first write, not here)."""
    env = os.environ.get("DITKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ditkit"
