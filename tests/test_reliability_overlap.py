"""Nothing may write over, or delete, the input it is reading (issue 30, class 1).

`ditkit convert --to diffusers CK CK --overwrite` used to exit 0 having deleted the checkpoint folder's model, EMA
and optimizer files. Every verb that writes now compares its output with its inputs by (device, inode) of the
paths and their parents, so `..`, symlinks and hard links are seen through, and refuses an output that is an
input, lies inside one, or (convert, which replaces its output whole) holds one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.runtime.path_guard import relation
from ditkit.train.checkpoint import save_training_checkpoint
from ditkit.weights.checkpoints import checkpoint_metadata, save_model


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A results folder with one real training checkpoint (model, EMA, optimizer state) of a tiny DiT."""
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                                num_heads=4)
    meta = checkpoint_metadata(model.config)
    save_training_checkpoint(tmp_path / "run" / "checkpoints", 2, model, model, {"step": 2, "opt": torch.ones(3)},
                             meta["ditkit_config"], meta["recipe"])
    save_model(model, tmp_path / "tiny.safetensors")
    return tmp_path / "run"


def _refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("ditkit")]
    assert len(lines) == 1, err
    return lines[0]


def test_convert_onto_its_own_checkpoint_folder_is_refused_and_deletes_nothing(run_folder, capsys):
    """The issue's example: DST is the source checkpoint folder, with --overwrite."""
    ck = run_folder / "checkpoints" / "0000002"
    before = _digest(run_folder)
    line = _refused(["convert", "--to", "diffusers", str(ck), str(ck), "--overwrite"], capsys)
    assert "is the input SRC" in line and str(ck) in line
    assert _digest(run_folder) == before  # model, EMA and state.pt untouched


@pytest.mark.parametrize("where", ["holds the source", "inside the source", "symlink to the source",
                                   "same file by hard link", "same file typed with .."])
def test_convert_destinations_overlapping_the_source_are_refused(run_folder, capsys, where):
    ck = run_folder / "checkpoints" / "0000002"
    tiny = run_folder.parent / "tiny.safetensors"
    src, dst, expect = {
        "holds the source": (ck, run_folder, "contains the input"),
        "inside the source": (ck, ck / "diffusers", "is inside the input"),
        "symlink to the source": (ck, run_folder.parent / "link", "is the input"),
        "same file by hard link": (tiny, run_folder.parent / "hard.safetensors", "is the input"),
        "same file typed with ..": (tiny, run_folder / ".." / "tiny.safetensors", "is the input"),
    }[where]
    if where == "symlink to the source":
        dst.symlink_to(ck, target_is_directory=True)
    if where == "same file by hard link":
        os.link(tiny, dst)
    before = _digest(run_folder.parent)
    line = _refused(["convert", "--to", "diffusers", str(src), str(dst), "--overwrite"], capsys)
    assert expect in line, line
    assert _digest(run_folder.parent) == before


def test_convert_to_ditkit_inside_the_diffusers_source_is_refused(tmp_path, capsys):
    """--to ditkit reading folder F may not write F's own weights file (with --overwrite it replaced them)."""
    folder = tmp_path / "dit-diffusers"
    folder.mkdir()
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"weights the user keeps")
    line = _refused(["convert", "--to", "ditkit", str(folder), str(weights), "--overwrite"], capsys)
    assert "is inside the input SRC" in line
    assert weights.read_bytes() == b"weights the user keeps"


def test_other_writers_refuse_an_output_on_their_input(run_folder, tmp_path, capsys):
    """sample --out onto the checkpoint it reads; extract --out inside the image folder it reads."""
    ck = run_folder / "checkpoints" / "0000002"
    line = _refused(["sample", "--ckpt", str(ck), "--out", str(ck), "--num-steps", "2"], capsys)
    assert "is the input --ckpt" in line
    before = _digest(run_folder)
    # Adding a grid inside the checkpoint folder replaces nothing and is never read back as weights: allowed.
    assert main(["sample", "--ckpt", str(ck), "--out", str(ck / "grid"), "--num-steps", "2", "--class-labels", "1",
                 "--per-label", "1", "--device", "cpu", "--no-progress"]) == 0
    assert {k: v for k, v in _digest(run_folder).items() if "grid" not in k} == before
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    line = _refused(["extract", str(tmp_path / "images"), "--out", str(tmp_path / "images" / "store"),
                     "--vae", str(tmp_path / "no-vae")], capsys)
    assert "is inside the input FOLDER" in line


def test_relation_sees_through_paths_and_leaves_apart_ones_alone(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    assert relation(tmp_path / "a", tmp_path / "a" / "b" / "new" / "x") == "is inside"
    assert relation(tmp_path / "a" / "b", tmp_path / "a") == "contains"
    assert relation(tmp_path / "a", tmp_path / "c" / ".." / "a") == "is"
    assert relation(tmp_path / "a", tmp_path / "c" / "new") is None
    assert relation(tmp_path / "c", tmp_path / "cc") is None  # a name prefix is not a parent
