"""A number or a path read from a file is checked before it is used (issue 30, classes 2 and 3).

Every file format ditkit reads has one validator in `ditkit.runtime.validate`; these tests feed each of them the issue's
examples (a recipe with 10^12 diffusion steps, a diffusers config with sample_size 200000, a store manifest with a
10^5×10^5 latent shape or 10^12 classes, wrong types, shard names that leave the store) through the command line,
and a hypothesis fuzz of random JSON of wrong types and sizes through each reader: the result is either accepted
within the stated bounds or one `UserError`, never another exception.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditkit
from ditkit.cli import main
from ditkit.data.store import FORMAT, MANIFEST, read_manifest
from ditkit.models.config import DiTConfig
from ditkit.recipe import Recipe, infer_recipe
from ditkit.runtime import validate
from ditkit.runtime.errors import UserError
from ditkit.weights.checkpoints import save_model
from ditkit.weights.convert import diffusers_config
from ditkit.weights.diffusers_folder import config_from_diffusers, read_diffusers_folder

TINY = dict(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, in_channels=1, num_classes=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", **{k: v for k, v in TINY.items() if k != "patch_size"})
    path = tmp_path_factory.mktemp("v") / "tiny.safetensors"
    save_model(model, path)
    return path


def _one_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("ditkit")]
    assert len(lines) == 1, err
    return lines[0]


def _recipe() -> dict:
    return infer_recipe(DiTConfig(**TINY)).to_dict()


def _manifest(**changes) -> dict:
    base = {"format": FORMAT, "version": 1, "vae": "v", "scale": 0.5, "shift": 0.0, "image_size": 16,
            "latent_shape": [4, 2, 2], "count": 3, "num_classes": 2, "classes": ["a", "b"],
            "shards": [{"file": "shard-00000.safetensors", "count": 3}]}
    return {**base, **changes}


# ----------------------------------------------------------------------------------------------- the examples


@pytest.mark.parametrize("change, field", [
    (lambda r: r["process"].update(diffusion_steps=10**12),
     r"process\.diffusion_steps must be an integer in 1\.\.100,000"),
    (lambda r: r.update(process="diffusion"), r"recipe\.process must be a JSON object, got str"),
    (lambda r: r["conditioning"].update(classes=5), r"conditioning\.classes must be a list"),
    (lambda r: r["latents"].update(downsample=[8]), r"latents\.downsample must be an integer in 1\.\.64"),
])
def test_a_checkpoint_recipe_that_is_absurd_or_mistyped_is_one_line_naming_file_and_field(tiny, tmp_path, capsys,
                                                                                          change, field):
    recipe = _recipe()
    change(recipe)
    bad = tmp_path / "bad.safetensors"
    save_model(ditkit.load_model(tiny), bad, metadata={"recipe": json.dumps(recipe)})
    line = _one_line(["sample", "--ckpt", str(bad), "--num-steps", "2", "--out", str(tmp_path / "s")], capsys)
    assert "bad.safetensors" in line and re.search(field, line), line


@pytest.mark.parametrize("key, value, message", [
    ("sample_size", 200000, r"sample_size must be an integer in 1\.\.4,096"),
    ("num_layers", "28", r"num_layers must be an integer"),
    ("num_attention_heads", 10000, r"num_attention_heads × attention_head_dim = .* must be in"),
])
def test_a_diffusers_config_with_absurd_sizes_is_refused_before_any_allocation(tmp_path, capsys, key, value, message):
    folder = tmp_path / "dit"
    folder.mkdir()
    cfg = {"_class_name": "DiTTransformer2DModel", **diffusers_config(DiTConfig(**TINY)), key: value}
    (folder / "config.json").write_text(json.dumps(cfg))
    line = _one_line(["convert", "--to", "ditkit", str(folder), str(tmp_path / "out.safetensors")], capsys)
    assert "config.json" in line and re.search(message, line), line


@pytest.mark.parametrize("changes, message", [
    ({"latent_shape": [4, 10**5, 10**5]}, r"latent_shape\[1\] must be an integer in 1\.\.4,096"),
    ({"num_classes": 10**12}, r"num_classes must be an integer in 1\.\.1,000,000"),
    ({"shards": {"file": "x"}}, r"shards must be a list"),
    ({"shards": [{"file": "../other/shard-00000.safetensors", "count": 3}]}, r"shards\[0\]\.file .* leaves"),
    ({"shards": [{"file": "/etc/passwd", "count": 3}]}, r"shards\[0\]\.file .* leaves"),
])
def test_a_store_manifest_with_absurd_numbers_or_escaping_paths_is_one_line(tmp_path, capsys, changes, message):
    store = tmp_path / "store"
    store.mkdir()
    (store / MANIFEST).write_text(json.dumps(_manifest(**changes)))
    line = _one_line(["train", "--data-path", str(store), "--model", "DiT-S/2", "--max-steps", "1",
                      "--results-dir", str(tmp_path / "r")], capsys)
    assert "manifest.json" in line and re.search(message, line), line


def test_a_shard_reached_through_a_symlink_out_of_the_store_is_refused(tmp_path):
    """Class 3: a name inside the store that is a symlink to a file elsewhere is leaving it too."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard.safetensors").write_bytes(b"x")
    store = tmp_path / "store"
    store.mkdir()
    (store / "shard-00000.safetensors").symlink_to(tmp_path / "other" / "shard.safetensors")
    (store / MANIFEST).write_text(json.dumps(_manifest()))
    with pytest.raises(UserError, match=r"shards\[0\]\.file 'shard-00000.safetensors' points outside"):
        read_manifest(store)


def test_caption_and_weight_files_named_by_a_manifest_stay_inside(tmp_path):
    captions = {"text_encoder": "t5", "max_tokens": 8, "channels": 16, "files": ["../captions-00000.safetensors"]}
    with pytest.raises(UserError, match=r"captions\.files\[0\] .* leaves"):
        validate.store_manifest(_manifest(captions=captions), tmp_path, "manifest.json")
    with pytest.raises(UserError, match=r"weight_map entry .*leaves"):
        validate.weight_index({"weight_map": {"a": "../../x.safetensors"}}, tmp_path, "index.json")


# ----------------------------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**15), 10**15), st.sampled_from([10**12, 2**63, -1, 0]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=8,
)
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutate(data: dict, path: list[str], value) -> dict:
    """`data` with the entry at `path` (keys into nested objects, stopping at a non-object) set to `value`."""
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            break
        node = node[key]
    node[path[-1]] = value
    return data


def _recipe_paths() -> list[list[str]]:
    return [[part, key] for part, fields in _recipe().items() if isinstance(fields, dict) for key in fields] + \
        [[part] for part in _recipe()]


@FUZZ
@given(path=st.sampled_from(_recipe_paths()), value=JSON)
def test_fuzz_recipe_json(path, value):
    try:
        recipe = Recipe.from_dict(_mutate(_recipe(), path, value))
    except UserError:
        return
    assert validate.model_numbers(recipe.model) <= validate.MAX_MODEL_NUMBERS
    assert getattr(recipe.process, "diffusion_steps", 1) <= validate.MAX_DIFFUSION_STEPS


@FUZZ
@given(key=st.sampled_from([*TINY, "mlp_ratio", "learn_sigma", "conditioning", "class_dropout_prob", "x"]),
       value=JSON)
def test_fuzz_model_config_json(key, value):
    try:
        config = DiTConfig.from_dict({**TINY, key: value})
    except UserError:
        return
    assert validate.model_numbers(config) <= validate.MAX_MODEL_NUMBERS


@FUZZ
@given(key=st.sampled_from(["sample_size", "patch_size", "num_layers", "num_attention_heads", "attention_head_dim",
                            "in_channels", "out_channels", "num_embeds_ada_norm", "norm_type", "norm_eps"]),
       value=JSON, whole=st.one_of(st.none(), JSON))
def test_fuzz_diffusers_config_json(tmp_path_factory, key, value, whole):
    cfg = {"_class_name": "DiTTransformer2DModel", **diffusers_config(DiTConfig(**TINY)), key: value}
    try:
        config = config_from_diffusers(cfg if whole is None else whole)
    except UserError:
        pass
    else:
        assert validate.model_numbers(config) <= validate.MAX_MODEL_NUMBERS
    folder = tmp_path_factory.mktemp("d")  # the folder reader: config.json and the sidecar beside it
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "ditkit_config.json").write_text(json.dumps({"config": value} if whole is None else whole))
    with pytest.raises(UserError):  # never a traceback; no weights here, so at best "no weights file"
        read_diffusers_folder(folder)


@FUZZ
@given(key=st.sampled_from(["count", "num_classes", "latent_shape", "scale", "shift", "image_size", "classes",
                            "shards", "captions", "recipe", "format"]), value=JSON)
def test_fuzz_store_manifest(tmp_path_factory, key, value):
    store = tmp_path_factory.mktemp("s")
    (store / MANIFEST).write_text(json.dumps(_manifest(**{key: value})))
    try:
        manifest = read_manifest(store)
    except UserError:
        return
    c, h, w = manifest["latent_shape"]
    assert c * h * w <= 1024 * 4096 * 4096 and manifest["num_classes"] <= validate.MAX_CLASSES


@FUZZ
@given(value=JSON, key=st.sampled_from(["dtype", "shape", "data_offsets", "x"]))
def test_fuzz_shard_header_and_side_files(value, key):
    header = {"mean": {"dtype": "F16", "shape": [1, 2], "data_offsets": [0, 4]}}
    header["mean"][key] = value
    for check in (lambda: validate.shard_header(header, 4, "shard"),
                  lambda: validate.shard_header(value, 4, "shard"),
                  lambda: validate.settings_json(value, "settings.json"),
                  lambda: validate.vae_config(value, "vae/config.json"),
                  lambda: validate.sidecar(value, "ditkit_config.json"),
                  lambda: validate.weight_index(value, ".", "index.json")):
        try:
            check()
        except UserError:
            pass


def test_a_results_folder_config_of_the_wrong_type_is_one_line(tmp_path, capsys):
    results = tmp_path / "r"
    results.mkdir()
    (results / "config.json").write_text("[1, 2]")
    line = _one_line(["train", "--data-path", "digits", "--model", "DiT-S/8", "--image-size", "8", "--max-steps", "1",
                      "--results-dir", str(results), "--resume", "auto"], capsys)
    assert "config.json: the run config must be a JSON object, got list" in line


@pytest.fixture(scope="module")
def caption_root(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("captions")
    Image.new("RGB", (2, 2)).save(root / "a.png")
    return root


@FUZZ
@given(rows=st.lists(st.one_of(JSON, st.fixed_dictionaries({"file_name": JSON, "text": JSON})), max_size=4))
def test_fuzz_caption_table(caption_root, rows):
    from ditkit.data.captions import read_captions

    (caption_root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    try:
        captions = read_captions(caption_root, [caption_root / "a.png"])
    except UserError:
        return
    assert len(captions) == 1 and isinstance(captions[0], str) and captions[0]
