"""`ditkit serve` without a browser: a flow model's page request equals `ditkit sample`, the text demo's equals the
demo's own sampler, bad values get one line each, and with no model the verb says how to make the demos."""

from __future__ import annotations

import argparse
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.apps import serve
from ditkit.cli import main
from ditkit.recipe import FlowProcess, LatentSpace, Recipe
from ditkit.runtime.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args([a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))])


def _tiny(seed: int = 0) -> ditkit.DiT:
    torch.manual_seed(seed)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                                num_heads=2, class_dropout_prob=0.1)
    for p in model.parameters():
        if p.requires_grad and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow") / "flow.safetensors"
    model = _tiny()
    recipe = Recipe(model=model.config, process=FlowProcess(), latents=LatentSpace())
    ditkit.save_model(model, path, recipe=recipe)
    return serve.load_served(path, _args(ckpt=path), torch.device("cpu"), demo=False)


def test_flow_request_equals_ditkit_sample(flow_model, tmp_path):
    assert flow_model.kind == "flow" and "heun" in flow_model.samplers
    req = serve.Request(classes=[2, 9], sampler="heun", num_steps=3, cfg_scale=1.5, guide_channels="all",
                        interval=(0.2, 0.9), time_shift=2.0, seed=17, per_label=2)
    serve.check_request(flow_model, req, max_images=16)
    grid, images = serve.generate(flow_model, req, tmp_path / "page")
    argv = shlex.split(serve.command_line(flow_model, req, out=str(tmp_path / "cli")))
    for flag in ("--time-shift", "--guidance-interval", "--guide-channels"):
        assert flag in argv
    assert main(argv[1:] + ["--no-progress"]) == 0
    written = sorted((tmp_path / "cli" / "images").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in written] and len(written) == 4
    for a, b in zip(images, written):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    np.testing.assert_array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(tmp_path / "cli" / "grid.png")))


@pytest.mark.parametrize("change, message", [
    (dict(seed=-1), "seed must be in 0..4294967295"),
    (dict(num_steps=0), "at least 1"),
    (dict(num_steps=5000), "at most 1000"),
    (dict(classes=[10]), "class label 10 is out of range"),
    (dict(classes=[]), "pick at least one class"),
    (dict(per_label=17), "at most 16"),
    (dict(sampler="ddim"), "does not apply to a flow model"),
    (dict(interval=(0.8, 0.2)), "interval"),
    (dict(interval=(0.0, 2.0)), "interval"),
    (dict(cfg_scale=-1.0), "guidance scale"),
    (dict(time_shift=0.0), "time shift"),
])
def test_bad_values_get_one_line(flow_model, change, message):
    req = serve.Request(**{**dict(classes=[1], sampler="euler", num_steps=4, seed=0, per_label=1), **change})
    with pytest.raises(UserError, match=message):
        serve.check_request(flow_model, req, max_images=16)


def test_page_fields_that_are_not_numbers(flow_model):
    values = dict(classes=[1], sampler="euler", steps="many", cfg=1.0, channels="3", use_interval=False,
                  lo=0, hi=1, shift=1.0, seed=0, randomise=False, per_label=1)
    with pytest.raises(UserError, match="steps must be a number"):
        serve._request_from_page(flow_model, values)
    values.update(steps=4, randomise=True)
    req = serve._request_from_page(flow_model, values)
    assert req.classes == [1] and 0 <= req.seed <= 2**32 - 1


def test_text_demo_equals_its_own_sampler(tmp_path, monkeypatch):
    """The page samples the text demo model as `ditkit demo --text` does (demo_text.prompted_samples)."""
    from safetensors.torch import save_file

    from ditkit.apps import demo_text
    from ditkit.data import colour_digits as cd
    from ditkit.models.config import DiTConfig

    torch.manual_seed(0)
    model = demo_text.EncodedTextModel(DiTConfig(**demo_text.DEMO_CONFIG), len(cd.VOCAB)).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    (tmp_path / "results" / "demo_text").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "results" / "demo_text" / demo_text.WEIGHTS))
    monkeypatch.chdir(tmp_path)
    (served,) = serve.load_all(_args(), torch.device("cpu"))
    assert served.is_text and served.ckpt is None  # no `ditkit sample` line for it
    prompt = cd.caption(7, 0, 2)
    req = serve.Request(prompts=[prompt], sampler="dpm-solver", num_steps=20, cfg_scale=demo_text.DEMO_CFG,
                        guide_channels="all", seed=3, per_label=3)
    serve.check_request(served, req, max_images=16)
    _, images = serve.generate(served, req, tmp_path / "page")
    expected = demo_text.prompted_samples(model, [prompt] * 3, demo_text.DEMO_CFG, seed=3)
    expected = torch.clamp(127.5 * expected + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in images]), expected)
    with pytest.raises(UserError, match="knows only these words"):
        served.encoder.encode(["a purple elephant"])


def test_no_models_says_how_to_make_them(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio")
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    assert "make demo" in capsys.readouterr().err


def test_class_names(tmp_path):
    from types import SimpleNamespace

    def recipe(n, classes=None):
        return SimpleNamespace(model=SimpleNamespace(num_classes=n), conditioning=SimpleNamespace(classes=classes))

    run = tmp_path / "run"
    (run / "checkpoints" / "0000100").mkdir(parents=True)
    (run / "options.json").write_text('{"data_path": "digits"}')
    digits = serve.class_names(recipe(10, tuple("0123456789")), run / "checkpoints" / "0000100")
    assert digits[3] == "digit 3"
    assert serve.class_names(recipe(3, ("cat", "1", "dog")), tmp_path / "x.pt") == ["0: cat", "class 1", "2: dog"]
    assert serve.class_names(recipe(4), tmp_path / "x.pt")[3] == "class 3"
    if serve.imagenet_names() is not None:  # Gradio's list, in the standard label order
        names = serve.class_names(recipe(1000), tmp_path / "x.pt")
        assert names[0] == "0: tench" and names[207].lower() == "207: golden retriever" and len(names) == 1000
