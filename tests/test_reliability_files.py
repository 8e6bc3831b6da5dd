"""File-system oddities and foreign files (issue 30, classes 3, 7 and 8).

Caption tables as spreadsheet tools save them (byte-order mark, CRLF, quoted cells with commas and line breaks,
semicolons, UTF-16), a caption listed twice with different text, names that leave the folder; image folders
with symlink loops, special files and names that are not UTF-8; a checkpoint folder without its EMA file; a full
disk during `convert`; a cache that cannot be written; a `.pt` pickle that `weights_only` refuses. Each gets one
line naming the path, is skipped by name with a count, or falls back to a working default.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditkit.data.captions import read_captions
from ditkit.data.images import find_images
from ditkit.runtime.errors import UserError
from helpers.cli import refusal_line


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- caption tables


def _captioned(tmp_path: Path, table: bytes, name: str = "metadata.csv") -> tuple[Path, list[Path]]:
    root = tmp_path / "imgs"
    _png(root / "x" / "a.png"), _png(root / "y" / "b.png")
    (root / name).write_bytes(table)
    return root, find_images(root)[0]


@pytest.mark.parametrize("table, encoding", [
    ("file_name,text\r\nx/a.png,a red cat\r\ny/b.png,\"a dog, brown\"\r\n", "utf-8-sig"),  # Excel "CSV UTF-8"
    ("file_name;text\r\nx/a.png;a red cat\r\ny/b.png;\"a dog, brown\"\r\n", "utf-8"),  # a European locale
    ("file_name\ttext\r\nx/a.png\ta red cat\r\ny/b.png\t\"a dog, brown\"\r\n", "utf-16"),  # "Unicode text"
    ("file_name, text\nx/a.png,\"a red\ncat\"\ny/b.png,\"a dog, brown\"\n", "utf-8"),  # a quoted line break
])
def test_caption_csv_as_spreadsheets_save_it_reads_the_same_captions(tmp_path, table, encoding):
    root, paths = _captioned(tmp_path, table.encode(encoding))
    assert read_captions(root, paths) == ["a red cat", "a dog, brown"]


@pytest.mark.parametrize("rows, message", [
    ('{"file_name": "x/a.png", "text": "cat"}\n{"file_name": "x/a.png", "text": "dog"}\n{"file_name": "y/b.png", '
     '"text": "x"}\n', r"x/a.png is listed twice with different captions \(rows 1 and 2\)"),
    ('{"file_name": "../a.png", "text": "cat"}\n', r"row 1 file_name '../a.png' leaves"),
    ('{"file_name": "/etc/a.png", "text": "cat"}\n', r"row 1 file_name '/etc/a.png' leaves"),
])
def test_caption_rows_that_disagree_or_leave_the_folder_are_named(tmp_path, rows, message):
    root, paths = _captioned(tmp_path, rows.encode(), "metadata.jsonl")
    with pytest.raises(UserError, match=message):
        read_captions(root, paths)


def test_a_caption_listed_twice_with_the_same_text_is_fine_and_non_utf8_tables_are_named(tmp_path):
    rows = "file_name,text\nx/a.png,cat\nx/a.png,cat\ny/b.png,dog\n"
    root, paths = _captioned(tmp_path, rows.encode())
    assert read_captions(root, paths) == ["cat", "dog"]
    (root / "metadata.csv").write_bytes("file_name,text\nx/a.png,caf\xe9\ny/b.png,x\n".encode("cp1252"))
    with pytest.raises(UserError, match=r"metadata.csv: byte \d+ is not UTF-8; save the table as UTF-8"):
        read_captions(root, paths)


# ----------------------------------------------------------------------------------------------- image folders


def test_symlink_loops_and_second_links_are_walked_once_and_named(tmp_path, capsys):
    root = tmp_path / "imgs"
    _png(root / "a" / "x.png"), _png(root / "b" / "y.png")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # back to the top: a loop
    (root / "b" / "self").symlink_to(root / "b", target_is_directory=True)
    (root / "b" / "again").symlink_to(root / "a", target_is_directory=True)  # a's images under class b
    paths, labels, classes = find_images(root)
    assert [p.relative_to(root).as_posix() for p in paths] == ["a/x.png", "b/y.png"] and labels == [0, 1]
    assert classes == ["a", "b"]
    err = capsys.readouterr().err
    assert "skipped 3 entries" in err and "a/loop (a link back to a folder already read)" in err


def test_special_files_broken_links_and_non_utf8_names_are_skipped_by_name(tmp_path, capsys):
    root = tmp_path / "imgs"
    _png(root / "a" / "x.png")
    os.mkfifo(root / "a" / "pipe.png")  # opening it would block the reader forever
    (root / "a" / "gone.png").symlink_to(root / "nowhere.png")
    bad = os.path.join(os.fsencode(root / "a"), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write((root / "a" / "x.png").read_bytes())
    paths, _, _ = find_images(root)
    assert [p.name for p in paths] == ["x.png"]
    err = capsys.readouterr().err
    assert "skipped 3 entries" in err
    assert "pipe.png (not a regular file)" in err and "gone.png (a broken link)" in err
    assert "name is not valid UTF-8; rename it" in err
    os.mkdir(os.path.join(os.fsencode(root), b"cl\xe4ss"))  # a class name must be text
    _png(root / "b" / "z.png")
    with pytest.raises(UserError, match="has a name that is not valid UTF-8; rename it"):
        find_images(root)


# ----------------------------------------------------------------------------------------------- checkpoints, convert


@pytest.fixture
def tiny(tmp_path) -> Path:
    import torch

    import ditkit
    from ditkit.weights.checkpoints import save_model

    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                                num_heads=4)
    save_model(model, tmp_path / "tiny.safetensors")
    return tmp_path / "tiny.safetensors"




def test_a_checkpoint_folder_without_its_ema_file_is_named_as_such(tiny, tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoints" / "0000002"
    folder.mkdir(parents=True)
    shutil.copy(tiny, folder / "model.safetensors")
    (folder / "state.pt").write_bytes(b"")
    line = refusal_line(["sample", "--ckpt", str(folder), "--num-steps", "2", "--out", str(tmp_path / "s")], capsys)
    assert "training checkpoint folder without ema.safetensors" in line and "not a diffusers" not in line
    assert f"pass {folder / 'model.safetensors'} to use the raw (non-EMA) weights" in line


def test_a_full_disk_during_convert_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    """A stand-in for diffusers' writer that fills the disk halfway (the real tmpfs case is in
    test_reliability_diskfull.py for the other writers)."""
    from ditkit.weights import convert
    class Filling:
        def save_pretrained(self, folder, safe_serialization=True):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "_import_diffusers", lambda: object())
    monkeypatch.setattr(convert, "to_diffusers_transformer", lambda model: Filling())
    out = tmp_path / "out"
    line = refusal_line(["convert", "--to", "diffusers", str(tiny), str(out)], capsys)
    assert f"disk full while writing {out}" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_unwritable_cache_falls_back_to_a_temporary_folder_once(tmp_path, capsys, monkeypatch):
    from ditkit.runtime import io
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("DITKIT_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    first = io.cache_file("reference-stats/abc.npz")
    io.atomic_write(first, lambda p: Path(p).write_bytes(b"stats"))
    assert first.read_bytes() == b"stats" and str(first).startswith(str(tmp_path / "tmp"))
    assert io.cache_file("reference-stats/abc.npz") == first  # found there again
    err = capsys.readouterr().err
    assert err.count("cannot be written; using") == 1 and str(blocker / "cache") in err


# ----------------------------------------------------------------------------------------------- foreign pickles


def test_a_refused_pickle_gets_ditkits_line_and_no_torch_warning(tmp_path):
    from ditkit.runtime.io import safe_torch_load

    path = tmp_path / "plain.pt"
    with open(path, "wb") as f:
        pickle.dump({"weights": [1.0, 2.0]}, f, protocol=4)  # torch warns about protocol 4 and "file an issue"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as refused:
            safe_torch_load(path)
    message = str(refused.value)
    assert not caught, [str(w.message) for w in caught]
    assert "not a torch.save file of tensors" in message and "convert it to .safetensors" in message
    assert "file an issue" not in message.lower() and "weights_only" not in message
