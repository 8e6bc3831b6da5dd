"""Files: atomic writes, a full disk named as such, and loading that never runs code from a file.

Every file ditkit writes (checkpoints, PNGs, .npz shards, manifests, downloads) goes through `atomic_write`, so
a reader sees either the old complete file or the new complete one. `.pt` files are pickles, which can run
code when loaded: `safe_torch_load` reads them with `torch.load(weights_only=True)` (plus `argparse.Namespace`,
which the official train.py stores as `args` and which carries plain values), so a file with a code payload is
refused and its payload never runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ditkit.runtime.errors import UserError


def cache_dir() -> Path:
    """Where ditkit keeps what it computes or downloads once (released checkpoints, digit classifiers, reference
    statistics, measured kernel choices): `$DITKIT_CACHE` if set, else `~/.cache/ditkit` (created on first
    write, not here)."""
    env = os.environ.get("DITKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ditkit"


_CACHE_FALLBACK_NAMED: set[str] = set()


def cache_file(relative: str) -> Path:
    """Where the cache entry `relative` is read or written: in `cache_dir()` when the entry is there or the
    folder can be written (or made); else (a read-only home, a `$DITKIT_CACHE` that is not a folder) in a
    per-user folder of the system's temporary directory, saying so once. A cache that cannot be written is not
    a reason to fail: the work is redone next time at worst."""
    preferred = cache_dir() / relative
    if preferred.exists() or _writable_folder(preferred.parent):
        return preferred
    fallback_root = Path(tempfile.gettempdir()) / f"ditkit-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
    if str(cache_dir()) not in _CACHE_FALLBACK_NAMED:
        _CACHE_FALLBACK_NAMED.add(str(cache_dir()))
        print(f"ditkit: warning: the cache folder {cache_dir()} cannot be written; using {fallback_root} instead "
              "(set DITKIT_CACHE to choose another)", file=sys.stderr)
    return fallback_root / relative


def _writable_folder(folder: Path) -> bool:
    """Whether `folder` could be written, or created and written (its nearest existing ancestor is a writable
    folder); nothing is created here, the writer does that."""
    for path in (folder, *folder.parents):
        if path.exists():
            return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    return False


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file so that `path` is either the old complete file or the new complete one, never a part.

    `write(tmp_path)` writes the content to a temporary file in the same folder; it is flushed to disk
    (fsync) and renamed over `path`, and the folder entry is synced too. On any error the temp file is removed
    and the old file stays. A full disk becomes a one-line UserError.
    """
    path = Path(path)
    tmp = new_temporary(path)
    try:
        write(tmp)
        commit_temporary(tmp, path)
    except BaseException as err:
        discard_temporary(tmp, path, err)
        raise


def commit_temporary(tmp: str, path: Path) -> None:
    """Put a fully written temporary (`new_temporary`) in place: synced to disk, renamed over `path`, and the
    folder entry synced. For writers that cannot hand `atomic_write` one callback (a file written in parts)."""
    os.chmod(tmp, file_mode())  # writers that replace the file (safetensors) leave it 0600
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def discard_temporary(tmp: str, path: Path, err: BaseException | None = None) -> None:
    """Remove the temporary of a failed write; when `err` came from a full disk, raise that as a one-line
    UserError instead (the caller re-raises any other error itself)."""
    full = isinstance(err, Exception) and disk_full(err, path.parent)  # before its space is freed
    _remove_quietly(tmp)
    if full:
        raise UserError(f"disk full while writing {path}; the previous file is intact; free space and retry") from None


def new_temporary(path: Path) -> str:
    """An empty new file `.NAME.PID.RANDOM.tmp` next to `path` (its folder made if needed), made with the
    process's umask (mkstemp's is 0600). The pid lets a later run tell a killed writer's leftover from a running
    writer's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def file_mode() -> int:
    """The mode a new file gets from this process's umask (0644 under the usual 022): outputs are shared
    files that colleagues on a cluster filesystem must be able to read, as with any other program."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def apply_umask(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the umask's mode (for writers that make 0600 files, like safetensors)."""
    mode = file_mode()
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), mode)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file` with the metadata keys in sorted order, so equal tensors and metadata give
    equal bytes: safetensors serialises its metadata map in an arbitrary order that changes from run to run.

    Only the order changes, so the sorted header has the same length and is written over the old one in place
    (no second copy of the tensors in memory or on disk).
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # a JSON spelling that differs from serde's: keep the file as written
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))  # safetensors pads its header with spaces itself


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to the disk (before it is renamed into place)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(err: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write ran out of space, however the writer reports it.

    Python's own writes raise OSError(ENOSPC); safetensors raises SafetensorError("... os error 28"); torch.save
    raises a RuntimeError about an unexpected position (a short write) that names no cause, so a filesystem
    with (almost) no free space left counts as the cause too.
    """
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    if "No space left on device" in text or "os error 28" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < 64 * 1024
    except OSError:
        return False


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# Formats that people hand over by mistake, by their first bytes; a .pt file is a zip or a bare pickle.
_NOT_CHECKPOINTS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                    b"\x93NUMPY": "a NumPy .npy array", b"{": "a JSON file"}


def _unpickling_reason(err: BaseException) -> str:
    """What torch's weights-only refusal says of the file, in ditkit's words (torch's text asks the reader to
    file an issue with torch and suggests `weights_only=False`, neither of which a user of ditkit should do)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled {found.group(1)} object (code that would run on loading), not only tensors"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return (f"it is not a torch.save file of tensors (a plain pickle, or damaged: pickle operation "
                f"{found.group(1)} is not one a weights file uses)")
    return "it holds objects other than tensors and plain containers"


def safe_torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load` restricted to tensors and plain containers; anything else is refused with one line.

    mmap=True maps a zip-format file's tensors instead of reading them (a 2.7 GB DiT-XL/2 file is then
    copied once, straight to where its tensors go); older (non-zip) files are read as usual."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path}: {err.strerror}") from None
    kind = next((name for magic, name in _NOT_CHECKPOINTS.items() if head.startswith(magic)), None)
    if kind is not None:
        raise UserError(f"{path} is {kind}, not a checkpoint; give a .pt or .safetensors weights file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns about pickle protocols with "please file an issue" text; the refusal below says it all
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
            if mmap and head.startswith(b"PK"):
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except (RuntimeError, OSError, ValueError):  # a file or filesystem that cannot be mapped
                    pass  # read it instead; a damaged file fails again below and is reported there
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"refusing to load {path}: {_unpickling_reason(err)}; only weight files load. If you trust its "
            "source, convert it to .safetensors with a trusted tool (safetensors.torch.save_file on a machine "
            "where running its code is safe), or pass a .safetensors file"
        ) from None
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file can fail inside torch.load in many ways
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {msg[:200]}; is it a .pt file?") \
            from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a clear error for a truncated or malformed file."""
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, metadata
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is not a valid safetensors file ({str(err)[:160]}); is it truncated?") from None
