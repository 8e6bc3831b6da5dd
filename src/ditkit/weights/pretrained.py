"""The authors' released DiT checkpoints: fetched on first use into a cache folder.

`--ckpt DiT-XL-2-256x256.pt` (or `DiT-XL-2-512x512.pt`) that is not a file on disk is looked up in the cache
(`$DITKIT_CACHE`, else `~/.cache/ditkit`) and, when absent, downloaded from the authors' address
https://dl.fbaipublicfiles.com/DiT/models/<name> with a progress bar. The download goes to a temporary file in
the cache folder, is checked (byte count against the server's Content-Length, the expected size when known,
and that it is a PyTorch zip archive), fsynced and renamed into place, so an interrupted download never
leaves a file that looks complete. Offline, one line says which URL failed and where to put the file by hand.
A copy that the authors' scripts downloaded (`./pretrained_models/<name>`) is used as it is.
`$DITKIT_PRETRAINED_URL` replaces the base address (mirrors, tests).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ditkit.runtime.errors import UserError
from ditkit.runtime.io import atomic_write, cache_file

BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"


@dataclass(frozen=True)
class Pretrained:
    """A released checkpoint: its config, and the file's size and SHA-256 where they are recorded."""

    model: str
    image_size: int
    num_classes: int = 1000
    size: int | None = None
    sha256: str | None = None


# The two files the authors published (EMA weights of DiT-XL/2 after 7M steps, ImageNet, SD-VAE latents).
PRETRAINED: dict[str, Pretrained] = {
    "DiT-XL-2-256x256.pt": Pretrained("DiT-XL/2", 256),
    "DiT-XL-2-512x512.pt": Pretrained("DiT-XL/2", 512),
}


def is_pretrained(name: str | os.PathLike) -> bool:
    """Whether `name` is the bare file name of a released checkpoint."""
    return str(name) in PRETRAINED


def url_for(name: str, base_url: str | None = None) -> str:
    base = base_url or os.environ.get("DITKIT_PRETRAINED_URL") or BASE_URL
    return base.rstrip("/") + "/" + name


def _fetch(url: str, dest: str, expected_size: int | None, sha256: str | None, progress: bool, timeout: float) -> None:
    """Stream `url` into `dest`, checking the byte count (and SHA-256 when given)."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        header = response.headers.get("Content-Length")
        total = int(header) if header and header.isdigit() else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(url).name)
        received = 0
        try:
            with open(dest, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received != total:
        raise UserError(f"download of {url} stopped after {received} of {total} bytes; run again to retry")
    if expected_size is not None and received != expected_size:
        raise UserError(f"{url} has {received} bytes, expected {expected_size}; the file on the server differs")
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise UserError(f"{url} has SHA-256 {digest.hexdigest()}, expected {sha256}; the download is corrupt")
    if not zipfile.is_zipfile(dest):
        raise UserError(f"{url} did not return a PyTorch checkpoint (not a zip archive); check the address")


def fetch_pretrained(
    name: str,
    cache: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Path of the released checkpoint `name` in the cache, downloading it first when it is not there."""
    if name not in PRETRAINED:
        raise UserError(f"unknown released checkpoint {name!r}; the authors published: {', '.join(PRETRAINED)}")
    dest = Path(cache) / name if cache is not None else cache_file(name)
    if dest.is_file():
        return dest
    legacy = Path("pretrained_models") / name  # where the authors' scripts download it
    if cache is None and legacy.is_file():
        return legacy
    info = PRETRAINED[name]
    url = url_for(name, base_url)
    try:
        atomic_write(dest, lambda tmp: _fetch(url, tmp, info.size, info.sha256, progress, timeout))
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise UserError(
            f"cannot download {url} ({str(reason).strip()[:120]}); fetch it on a machine with internet and put it "
            f"at {dest} (or pass --ckpt PATH)"
        ) from None
    return dest


def resolve_checkpoint(ckpt: str, cache: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """A `--ckpt` value as a local path: an existing file or folder as is, a released name via the cache."""
    path = Path(ckpt).expanduser()
    if path.exists():
        return path
    if is_pretrained(ckpt):
        return fetch_pretrained(ckpt, cache, progress=progress)
    raise UserError(f"checkpoint not found: {ckpt} (released names: {', '.join(PRETRAINED)})")
