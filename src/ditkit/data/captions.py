"""Captions of an image folder, in the layouts people keep them in.

- A sidecar text file per image: `cat.png` + `cat.txt` (its whole content, stripped, is the caption).
- One table for the folder, the Hugging Face image-folder convention: `metadata.jsonl` / `captions.jsonl` (one
  JSON object a line) or `metadata.csv`, with a `file_name` column (the image's path relative to the table's
  folder) and the caption in a `text`, `caption` or `prompt` column (the first present, in that order).

A table, when present, is used for every image (sidecars are then ignored); an image without a caption, or
with an empty one, is an error naming the file and the fix, since a silently uncaptioned image would teach the
model to ignore text. The images themselves are found, cropped and checked by data/images.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ditkit.runtime import validate
from ditkit.runtime.errors import UserError

TABLES = ("metadata.jsonl", "captions.jsonl", "metadata.csv")
TEXT_COLUMNS = ("text", "caption", "prompt")


def _text_column(columns: list[str], where: Path) -> str:
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise UserError(f"{where}: no caption column; name one of {', '.join(TEXT_COLUMNS)} (beside file_name)")


def _decode(table: Path) -> str:
    """The text of a table as editors and spreadsheets save it: UTF-8 with or without a byte-order mark, or
    UTF-16 with one (Excel's "Unicode text"); anything else is named with the fix."""
    try:
        raw = table.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {table}: {err.strerror}") from None
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{table}: byte {err.start} is not UTF-8; save the table as UTF-8 (\"CSV UTF-8\" in "
                        "spreadsheet tools)") from None


def _csv_rows(text: str) -> list[dict]:
    """Rows of a CSV as spreadsheet tools write it: CRLF line ends, quoted cells holding commas, quotes or line
    breaks, and a comma, semicolon or tab delimiter (whichever the header line uses)."""
    header = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=header.count)
    rows = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [{(k or "").strip(): v for k, v in row.items()} for row in rows]


def _rows(table: Path) -> list[dict]:
    """The rows of a .jsonl or .csv table as dicts (a bad line is named by its number)."""
    text = _decode(table)
    if table.suffix == ".csv":
        return _csv_rows(text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{table}: line {number} is not a JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{table}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_table(table: Path) -> dict[str, str]:
    """{file_name (relative, '/'-separated): caption} of a metadata.jsonl / captions.jsonl / metadata.csv."""
    rows = _rows(table)
    if not rows:
        return {}
    column = _text_column(list(rows[0]), table)
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{table}: row {number} has no file_name")
        # A name is relative to the table's folder and stays inside it (the images are found there).
        key = validate.relative_name(name.strip(), table.parent, f"row {number} file_name", str(table)).as_posix()
        value = row.get(column)
        value = value if isinstance(value, str) else ""
        if key in out and " ".join(out[key].split()) != " ".join(value.split()):
            raise UserError(f"{table}: {key} is listed twice with different captions (rows {first[key]} and "
                            f"{number}); keep one row per image")
        first.setdefault(key, number)
        out[key] = value
    return out


def find_table(root: Path) -> Path | None:
    """The caption table in `root`, if any (more than one is ambiguous, hence an error)."""
    found = [root / name for name in TABLES if (root / name).is_file()]
    if len(found) > 1:
        raise UserError(f"{root} has {' and '.join(p.name for p in found)}; keep one caption table")
    return found[0] if found else None


def read_captions(root: str | os.PathLike, paths: list[Path]) -> list[str]:
    """The caption of each image in `paths` (under `root`), from the folder's table or the sidecar files."""
    root = Path(root)
    table = find_table(root)
    captions = []
    if table is not None:
        by_name = read_table(table)
        for path in paths:
            caption = by_name.get(Path(path).relative_to(root).as_posix())
            if caption is None:
                raise UserError(f"{path}: no caption in {table}; add a row with file_name "
                                f"{Path(path).relative_to(root).as_posix()}")
            captions.append(_checked(caption, path, table))
        return captions
    for path in paths:
        sidecar = Path(path).with_suffix(".txt")
        try:
            text = sidecar.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no caption; write it to {sidecar.name} beside the image, or list every "
                            f"image in {root / 'metadata.jsonl'} (file_name, text)") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read the caption {sidecar}: {err}") from None
        captions.append(_checked(text, path, sidecar))
    return captions


def _checked(caption: str, image: Path, source: Path) -> str:
    caption = " ".join(caption.split())  # one line: newlines and runs of spaces carry no meaning here
    if not caption:
        raise UserError(f"{image}: its caption in {source} is empty; write one or remove the image")
    return caption
