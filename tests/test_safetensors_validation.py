"""Safetensors files from strangers: damaged headers, absurd sizes, wrong dtypes, truncation and bad stored
configs each give one clear UserError line (and exit 2 from the CLI), never a traceback or a huge allocation.

The files are built byte by byte here (8-byte little-endian header length, JSON header, data), independently
of the safetensors writer, so each test states exactly which part of the format is broken.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from ditkit.cli import main
from ditkit.runtime.errors import UserError
from ditkit.runtime.io import read_safetensors
from ditkit.weights.checkpoints import CONFIG_KEY, load_model, save_model
from helpers.models import tiny_dit

TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=4)


def raw_file(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file written by hand: u64 header length, JSON header, raw data."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def tiny_file(tmp_path: Path) -> Path:
    model = tiny_dit(0)
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    return path


def split(path: Path) -> tuple[dict, bytes]:
    """Header and data of a real file, parsed by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


F32_4 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)

BROKEN = {
    "header length beyond the file": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [4],
                                                                   "data_offsets": [0, 16]}}, F32_4, 2**62),
    "absurd tensor size": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [10**12],
                                                        "data_offsets": [0, 4 * 10**12]}}, F32_4),
    "shape disagrees with offsets": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [1000],
                                                                  "data_offsets": [0, 16]}}, F32_4),
    "negative dimension": lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [-4],
                                                        "data_offsets": [0, 16]}}, F32_4),
    "unknown dtype": lambda p: raw_file(p, {"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, F32_4),
    "header not JSON": lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{{{{{" + F32_4),
    "empty file": lambda p: p.write_bytes(b""),
    "cut inside the header": lambda p: p.write_bytes(struct.pack("<Q", 200) + b'{"a": {"dt'),
    "non-string metadata": lambda p: raw_file(p, {"__metadata__": {"x": 5}, "a": {"dtype": "F32", "shape": [4],
                                                                                  "data_offsets": [0, 16]}}, F32_4),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_give_one_line(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    BROKEN[case](path)
    with pytest.raises(UserError) as err:
        read_safetensors(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "not a valid safetensors file" in message


def test_truncated_real_checkpoint_is_refused(tmp_path):
    path = tiny_file(tmp_path)
    raw = path.read_bytes()
    for keep in (len(raw) - 1, len(raw) // 2, 7):
        path.write_bytes(raw[:keep])
        with pytest.raises(UserError, match="not a valid safetensors file"):
            load_model(path)


def test_integer_weights_are_refused_not_cast(tmp_path):
    """safetensors accepts I64 tensors; ditkit must not cast them silently into weights."""
    header, data = split(tiny_file(tmp_path))
    entry = header["pos_embed"]
    assert entry["dtype"] == "F32"
    entry["dtype"] = "I32"  # same byte size, so the file stays structurally valid
    path = raw_file(tmp_path / "int.safetensors", header, data)
    tensors, _ = read_safetensors(path)
    assert tensors["pos_embed"].dtype == torch.int32  # the library's view: valid
    with pytest.raises(UserError, match=r"'pos_embed' has dtype int32; DiT weights are floating point"):
        load_model(path)


def _with_config(tmp_path: Path, config_text: str) -> Path:
    header, data = split(tiny_file(tmp_path))
    header["__metadata__"][CONFIG_KEY] = config_text
    return raw_file(tmp_path / "cfg.safetensors", header, data)


@pytest.mark.parametrize(
    "config_text,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({**TINY, "depth": "two"}), "depth must be an integer"),
        (json.dumps({**TINY, "learn_sigma": 1}), "learn_sigma must be true or false"),
        (json.dumps({**TINY, "depth": 0}), "depth must be a positive integer"),
        (json.dumps({**TINY, "evil": "x"}), "unknown key"),
        (json.dumps({**TINY, "hidden_size": 66, "num_heads": 3}), "divisible by 4"),
        # Structurally valid but absurd: must be refused from the tensors' shapes before any model is built.
        (json.dumps({**TINY, "depth": 10**9}), r"cfg.safetensors: model config: depth must be an integer in 1..1,024"),
        (json.dumps({**TINY, "depth": 100}), "stored model config says depth=100 but the tensors say 2"),
        (json.dumps({**TINY, "hidden_size": 4096, "num_heads": 4}), "hidden_size=4096 but the tensors say 64"),
    ],
)
def test_bad_stored_configs_are_refused_before_use(tmp_path, config_text, message):
    path = _with_config(tmp_path, config_text)
    with pytest.raises(UserError, match=message):
        load_model(path)


def test_cli_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    path = _with_config(tmp_path, json.dumps({**TINY, "depth": 10**9}))
    code = main(["convert", "--to", "diffusers", str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ditkit convert: error: ") and "depth must be" in err


def test_consistent_file_still_loads_exactly(tmp_path):
    """The checks do not reject good files: a hand-rebuilt copy loads to the same tensors."""
    original = tiny_file(tmp_path)
    header, data = split(original)
    copy = raw_file(tmp_path / "copy.safetensors", header, data)
    a, b = load_model(original), load_model(copy)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
