"""The authors' names (`DiT_models`, `find_model`) under ditkit.compat."""

from __future__ import annotations

import torch

from ditkit.compat import DiT_models, find_model
from ditkit.models import MODEL_NAMES

TINY = dict(input_size=8, in_channels=4, num_classes=10)


def test_dit_models_has_the_twelve_names_and_builds_their_shapes():
    assert list(DiT_models) == list(MODEL_NAMES)
    model = DiT_models["DiT-S/4"](**TINY)
    # DiT-S: depth 12, width 384; patch 4 -> 2x2 tokens; keys of the official layout
    assert model.config.depth == 12 and model.config.hidden_size == 384 and model.config.patch_size == 4
    assert model.pos_embed.shape == (1, 4, 384)
    assert DiT_models["DiT-XL/2"].__name__ == "DiT_XL_2"


def test_find_model_returns_ema_of_a_train_py_dict_and_a_bare_state_dict(tmp_path):
    torch.manual_seed(0)
    model, ema = DiT_models["DiT-S/8"](**TINY), DiT_models["DiT-S/8"](**TINY)
    path = tmp_path / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": None}, path)
    got = find_model(str(path))
    assert got.keys() == ema.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in ema.state_dict().items())
    assert not torch.equal(got["x_embedder.proj.weight"], model.state_dict()["x_embedder.proj.weight"])
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    fresh = DiT_models["DiT-S/8"](**TINY)
    fresh.load_state_dict(find_model(bare))
    assert torch.equal(fresh.x_embedder.proj.weight, model.x_embedder.proj.weight)


def test_find_model_takes_a_released_name_from_the_cache(tmp_path, monkeypatch):
    model = DiT_models["DiT-S/8"](**TINY)
    torch.save(model.state_dict(), tmp_path / "DiT-XL-2-256x256.pt")  # stands in for the released file
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path))
    got = find_model("DiT-XL-2-256x256.pt")
    assert torch.equal(got["pos_embed"], model.pos_embed)


def test_broadcast_object_alone_and_in_a_one_process_group(tmp_path):
    """`ditkit.runtime.distributed.broadcast_object` (used by benchmarks/bench_ddp.py): the object itself without a
    process group, and through `broadcast_object_list` in one."""
    import torch.distributed as dist

    from ditkit.runtime.distributed import broadcast_object

    payload = {"step": 3, "rows": [1, 2]}
    assert broadcast_object(payload) is payload
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = broadcast_object(payload)
    finally:
        dist.destroy_process_group()
    assert got == payload
