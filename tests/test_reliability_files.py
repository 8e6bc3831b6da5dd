"""File-system oddities and foreign files (issue 30, classes 3, 7 and 8).

Caption tables as spreadsheet tools save them (byte-order mark, CRLF, quoted cells with commas and line breaks,
semicolons, UTF-16), a caption listed twice with different text, names that leave the folder; image folders
with symlink loops, special files and names that are not UTF-8; a checkpoint folder without its EMA file; a full
disk during `convert`; a cache that cannot be written; a `.pt` pickle that `weights_only` refuses. Each gets one
line naming the path, is skipped by name with a count, or falls back to a working default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditkit.data.captions import read_captions
from ditkit.data.images import find_images
from ditkit.errors import UserError


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
