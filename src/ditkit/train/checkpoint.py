"""Training checkpoints: a folder per step, written atomically, found again by `--resume auto`.

Layout: RESULTS/checkpoints/0001000/{model.safetensors, ema.safetensors, state.pt}. The folder is assembled
under a temporary name, every file is fsync'ed, and only then renamed into place, so a folder with a final
name is always complete: a run killed mid-write leaves at worst a `.tmp-*` folder, which is ignored and
cleaned up. `state.pt` holds only tensors and plain values (optimizer state, step, RNG state) and is read back
with `weights_only=True`.

The same format serves every strategy and world size: model and EMA are full (gathered) state dicts, and the
AdamW state is keyed by parameter *name* (`torch.distributed.checkpoint.state_dict`'s full optimizer state dict),
not by index, so a checkpoint written by FSDP on 2 processes resumes under DDP on 1 or 4, and the reverse.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditkit.recipe import METADATA_KEY
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import (
    apply_umask,
    disk_full,
    fsync_dir,
    fsync_file,
    read_safetensors,
    safe_torch_load,
    save_safetensors,
)
from ditkit.weights.checkpoints import CONFIG_KEY, check_shapes

STEP_DIR = re.compile(r"^\d{7,}$")


@dataclass
class TrainingCheckpoint:
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path
    recipe_json: str | None = None  # the run's recipe (None in checkpoints written before recipes existed)


def save_training_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    ema: torch.nn.Module | Mapping[str, torch.Tensor],
    state: dict[str, Any],
    config_json: str,
    recipe_json: str | None = None,
) -> Path:
    """Write checkpoint `step` under `folder` atomically; returns its path. model/ema: modules or state dicts.
    The config (and the recipe, when given) go into both weight files' metadata."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{step:07d}"
    tmp = folder / f".tmp-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {CONFIG_KEY: config_json, "format": "ditkit", "step": str(step)}
    if recipe_json is not None:
        meta[METADATA_KEY] = recipe_json
    try:
        for name, module in (("model", model), ("ema", ema)):
            weights = module.state_dict() if isinstance(module, torch.nn.Module) else module
            tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
            save_safetensors(tensors, tmp / f"{name}.safetensors", meta)  # same run, same bytes
        torch.save(state, tmp / "state.pt")
        apply_umask(tmp)  # safetensors writes 0600 files; colleagues on a shared filesystem must read them
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. a resumed run): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(folder)
    except Exception as err:
        full = disk_full(err, folder)  # before the partial folder is removed and its space freed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            earlier = [p for p in list_checkpoints(folder) if p != final]
            kept = f"the newest intact checkpoint is {earlier[-1]}" if earlier else "no earlier checkpoint exists"
            raise UserError(
                f"disk full while writing checkpoint {final}; {kept}; free space and resume with --resume auto"
            ) from None
        raise
    except BaseException:  # KeyboardInterrupt and the like: leave no partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
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


def prune_checkpoints(folder: str | os.PathLike, keep_last: int, keep: Iterable[Path] = ()) -> None:
    """Keep the newest `keep_last` checkpoints (0 keeps all), and those in `keep` (the last good one)."""
    if keep_last > 0:
        kept = {Path(p) for p in keep}
        for p in list_checkpoints(folder)[:-keep_last]:
            if p not in kept:
                shutil.rmtree(p, ignore_errors=True)


class IncompleteCheckpoint(UserError):
    """A checkpoint folder with a file missing or unreadable (deleted, or a copy cut short); `reason` says which."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_training_checkpoint(path: str | os.PathLike, model: torch.nn.Module) -> TrainingCheckpoint:
    """Read a checkpoint folder on the CPU (no GPU memory spike), checking it fits `model`."""
    path = Path(path)
    files = [path / "model.safetensors", path / "ema.safetensors", path / "state.pt"]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        reason = f"missing {', '.join(missing)}"
        raise IncompleteCheckpoint(f"{path} is not a complete training checkpoint ({reason})", reason)
    try:
        weights, metadata = read_safetensors(files[0])
        ema, _ = read_safetensors(files[1])
        state = safe_torch_load(files[2])
    except UserError as err:
        raise IncompleteCheckpoint(str(err), str(err).replace(f"{path}{os.sep}", "")) from None
    if not isinstance(state, dict) or "step" not in state:
        raise IncompleteCheckpoint(f"{files[2]} holds no training state", "state.pt holds no training state")
    check_shapes(model, weights, files[0])
    check_shapes(model, ema, files[1])
    return TrainingCheckpoint(int(state["step"]), weights, ema, state, path, metadata.get(METADATA_KEY))


def load_newest_complete(folder: str | os.PathLike, model: torch.nn.Module,
                         note: Callable[[str], None]) -> TrainingCheckpoint | None:
    """`--resume auto`: the newest checkpoint under `folder` that reads back whole, or None. Each newer one that
    does not is passed over and named through `note` (a resume loses its steps, never its exactness)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load_training_checkpoint(path, model)
        except IncompleteCheckpoint as err:
            note(f"checkpoint {path} is incomplete ({err.reason}); passing over it to the one before")
    return None


# ----------------------------------------------------------------------------------------------- any world size

OPTIMIZER_FORMAT = "by-name"  # state.pt["optimizer_format"] of checkpoints whose AdamW state is keyed by name


def _full_options(cpu_offload: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a plain or FSDP2-sharded model, on the CPU. Sharded: every rank must call it
    (it all-gathers) and only rank 0 receives the tensors (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def gather_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The full AdamW state keyed by parameter name, on the CPU (collective for a sharded model, as above)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, opt, options=_full_options(cpu_offload=True))
    # AdamW's betas are a tuple in a fresh optimizer and a list in one restored from a checkpoint; store lists,
    # so that a resumed run writes the same state.pt bytes as an uninterrupted one.
    for group in state.get("param_groups", []):
        for key, value in group.items():
            if isinstance(value, tuple):
                group[key] = list(value)
    return state


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore the optimizer from a checkpoint's state.pt: the by-name full state (any strategy, any world size;
    each rank keeps its shard), or the index-keyed `opt.state_dict()` of older unsharded checkpoints."""
    saved = state["optimizer"]
    if state.get("optimizer_format") != OPTIMIZER_FORMAT:
        opt.load_state_dict(saved)  # index-keyed: the same parameter order, unsharded
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=saved, options=_full_options(cpu_offload=False))
