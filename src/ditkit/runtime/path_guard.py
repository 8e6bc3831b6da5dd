"""Nothing ditkit writes may land on, over, or around what it is reading.

A command reads inputs (a checkpoint, an image folder, a VAE) and writes one output (a folder or a file). When
the output is the input itself, holds it, or lies inside it, writing (and `convert --overwrite`'s replacing)
can delete or corrupt the very files being read. Paths are compared by what they point at, not how they are
typed: each existing path and its existing parents are identified by (device, inode), so symlinks, `..`, bind
mounts and hard links to a file are all seen through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ditkit.runtime.errors import UserError

PathLike = str | os.PathLike


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[tuple[int, int]]:
    """The identities of `path` (if it exists) and of every existing folder above it, nearest first."""
    path = Path(os.path.abspath(path))
    found = []
    for p in (path, *path.parents):
        ident = _identity(p)
        if ident is not None:
            found.append(ident)
    return found


def relation(reads: PathLike, writes: PathLike) -> str | None:
    """How output `writes` sits against input `reads`: "is", "contains", "is inside", or None (apart)."""
    read_id, write_id = _identity(Path(reads)), _identity(Path(writes))
    if read_id is not None and read_id == write_id:
        return "is"
    if read_id is not None and read_id in _chain(Path(writes)):
        return "is inside"  # the input is a folder above the output (or above where it will be created)
    if write_id is not None and write_id in _chain(Path(reads))[1:]:
        return "contains"
    return None


def refuse_overlap(
    inputs: Mapping[str, PathLike | None], output: PathLike, out_flag: str, allow: tuple[str, ...] = ()
) -> None:
    """Refuse an output that is, lies inside, or holds any of `inputs`, except the relations in `allow`.

    `inputs` maps the flag that names each input (e.g. "SRC", "--vae") to its path; None entries are skipped.
    A command that only adds files to its output folder and never replaces it can allow "contains" (e.g. `--out .`
    with images in `./imgs`) and, where files added inside an input folder are never read back as input,
    "is inside"."""
    for flag, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        how = relation(path, output)
        if how is None or how in allow:
            continue
        where = {"is": "is the input", "is inside": "is inside the input", "contains": "contains the input"}[how]
        raise UserError(
            f"{out_flag} {output} {where} {flag} {path}: writing there would replace or delete what is being "
            f"read; choose another {out_flag}, apart from {path}"
        )
