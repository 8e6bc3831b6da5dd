"""Training checkpoints: a folder per step, written atomically, found again by `--resume auto`.

Layout: RESULTS/checkpoints/0001000/{model.safetensors, ema.safetensors, state.pt}. The folder is assembled
under a temporary name, every file is fsync'ed, and only then renamed into place, so a folder with a final
name is always complete: a run killed mid-write leaves at worst a `.tmp-*` folder, which is ignored and
cleaned up. `state.pt` holds only tensors and plain values (optimizer state, step, RNG state) and is read back
with `weights_only=True`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditkit.checkpoints import CONFIG_KEY, check_shapes, read_safetensors, safe_torch_load
from ditkit.errors import UserError

STEP_DIR = re.compile(r"^\d{7,}$")


@dataclass
class TrainingCheckpoint:
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    state: dict[str, Any],
    config_json: str,
) -> Path:
    """Write checkpoint `step` under `folder` atomically; returns its path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{step:07d}"
    tmp = folder / f".tmp-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {CONFIG_KEY: config_json, "format": "ditkit", "step": str(step)}
    try:
        for name, module in (("model", model), ("ema", ema)):
            tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(tensors, tmp / f"{name}.safetensors", metadata=meta)
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. a resumed run): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == 28:
            raise UserError(
                f"disk full while writing checkpoint {final}; earlier checkpoints are intact; free space and resume"
            ) from None
        raise
    return final


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: int(p.name))


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete `.tmp-*` leftovers of writes that were killed."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 keeps all)."""
    if keep_last > 0:
        for p in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def load_training_checkpoint(path: str | os.PathLike, model: torch.nn.Module) -> TrainingCheckpoint:
    """Read a checkpoint folder on the CPU (no GPU memory spike), checking it fits `model`."""
    path = Path(path)
    files = [path / "model.safetensors", path / "ema.safetensors", path / "state.pt"]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(f"{path} is not a complete training checkpoint (missing {', '.join(missing)})")
    weights, _ = read_safetensors(files[0])
    ema, _ = read_safetensors(files[1])
    check_shapes(model, weights, files[0])
    check_shapes(model, ema, files[1])
    state = safe_torch_load(files[2])
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{files[2]} holds no training state")
    return TrainingCheckpoint(int(state["step"]), weights, ema, state, path)
