"""ditkit ⇄ diffusers conversion, checked against diffusers' own DiT and float64 references written here.

Tolerances: "float32 round-off" is max |Δ| ≤ 2e-5 · max(1, max |reference|) for these 2-block, 64-wide models
(observed ~1e-6); round trips must be bit-exact.
"""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch

import ditkit
from ditkit.cli import main
from ditkit.models.config import DiTConfig
from ditkit.weights import convert
from helpers import models, vae

# A tiny DiT with every trained weight random (the official init zeroes the output, hiding mistakes).
random_dit = partial(models.random_dit, std=0.15, in_channels=4)
# A 2-level AutoencoderKL (8 → 16 channels, ×2 downsampling, 4 latent channels) saved to a folder.
tiny_vae = partial(vae.make_tiny_vae, seed=3, perturb=None, block_out_channels=(8, 16), norm_num_groups=8,
                   sample_size=16)

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TINY = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=4, num_classes=10)
ROUNDOFF = 2e-5


def inputs(config: DiTConfig, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.tensor([3.0, 250.0, 611.0, 999.0])[:batch]
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    return x, t, y


def assert_roundoff(actual: torch.Tensor, reference: torch.Tensor) -> None:
    gap = (actual.double() - reference.double()).abs().max().item()
    bound = ROUNDOFF * max(1.0, reference.abs().max().item())
    assert gap <= bound, f"max |diff| {gap:.3g} > {bound:.3g}"


def frequency_embedding_f64(t: torch.Tensor, dim: int, denominator: float) -> torch.Tensor:
    """[cos(t·f), sin(t·f)] with f_i = 10000^(-i/denominator), in float64 (128 for DiT, 127 for diffusers)."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-math.log(10000.0) * i / denominator)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def with_time_frequencies(model: ditkit.DiT, denominator: float) -> None:
    """Swap ditkit's timestep embedding for the float64 formula above with the given denominator."""
    emb = model.t_embedder

    def forward(t: torch.Tensor) -> torch.Tensor:
        freq = frequency_embedding_f64(t, emb.frequency_embedding_size, denominator)
        return emb.mlp(freq.to(emb.mlp[0].weight.dtype))

    emb.forward = forward


@torch.no_grad()
def diffusers_out(net, x, t, y) -> torch.Tensor:
    return net(x, timestep=t, class_labels=y).sample


# ----------------------------------------------------------------------------------------------- ditkit → diffusers


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A random ditkit model and the diffusers folder `to_diffusers` wrote for it (shared: writing is slow)."""
    model = random_dit()
    folder = tmp_path_factory.mktemp("written") / "out"
    stock = convert.to_diffusers(model, folder)
    return model, folder, stock


@torch.no_grad()
def test_ditkit_to_diffusers_folder_computes_what_ditkit_computes(written):
    model, folder, _ = written
    model = copy.deepcopy(model)
    net = diffusers.DiTTransformer2DModel.from_pretrained(str(folder)).eval()
    assert net.config.norm_eps == 1e-6 and net.config.num_embeds_ada_norm == 10
    assert convert.match_dit_timesteps(net) == TINY["depth"]  # one timestep projection per block
    x, t, y = inputs(model.config)
    reference = model.double()(x.double(), t, y)  # float64 ditkit: an independent evaluation of the same net
    assert_roundoff(diffusers_out(net, x, t, y), reference)
    assert_roundoff(model.float()(x, t, y), reference)


@torch.no_grad()
def test_stock_diffusers_differs_from_ditkit_only_by_its_timestep_frequencies(written):
    model, folder, measured = written
    model = copy.deepcopy(model)
    net = diffusers.DiTTransformer2DModel.from_pretrained(str(folder)).eval()
    x, t, y = inputs(model.config)
    stock = diffusers_out(net, x, t, y)
    plain = model(x, t, y)
    # The difference is real (so the CLI's note is not noise), and to_diffusers measured one of that size ...
    assert (stock - plain).norm() / plain.norm() > 1e-2
    assert measured["rel_rms"] > 1e-2 and measured["max_abs"] > 0
    # ... and it is all explained by f_i = 10000^(-i/127) instead of 10000^(-i/128).
    with_time_frequencies(model, 127.0)
    assert_roundoff(stock, model(x, t, y))


def test_round_trip_is_exact(written, tmp_path):
    other = random_dit(seed=2, learn_sigma=False, class_dropout_prob=0.0, in_channels=3)
    convert.to_diffusers(other, tmp_path / "other")
    for model, folder in [written[:2], (other, tmp_path / "other")]:
        back = ditkit.load_model(folder)
        assert back.config == model.config
        for key, tensor in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], tensor), key


def test_model_without_null_label_gets_a_zero_row_in_diffusers(tmp_path):
    model = random_dit(class_dropout_prob=0.0)
    sd = convert.to_diffusers_state_dict(model.state_dict(), model.config)
    table = sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"]
    assert table.shape == (11, 64)
    assert torch.equal(table[:10], model.y_embedder.embedding_table.weight)
    assert not table[10].any()


def test_only_adaln_zero_models_convert(tmp_path, capsys):
    model = ditkit.DiT(DiTConfig(**TINY, conditioning="in-context"))
    ditkit.save_model(model, tmp_path / "ic.safetensors")
    code = main(["convert", "--to", "diffusers", str(tmp_path / "ic.safetensors"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "adaLN-Zero" in err and "in-context" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- diffusers → ditkit


def diffusers_dit(norm_eps: float = 1e-5, seed: int = 4):
    """A DiT with diffusers' own (default) initialisation, embedders tied across blocks as in converted files."""
    torch.manual_seed(seed)
    net = diffusers.DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=norm_eps,
    ).eval()
    with torch.no_grad():
        for block in net.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(net.transformer_blocks[0].norm1.emb.state_dict())
    return net


@torch.no_grad()
def test_diffusers_dit_converted_to_ditkit_matches_diffusers(tmp_path):
    net = diffusers_dit()  # stock settings: norm_eps 1e-5, timestep shift 1
    net.save_pretrained(str(tmp_path / "dit"))
    model = ditkit.load_model(tmp_path / "dit")
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.num_classes, cfg.learn_sigma) == (3, 64, 4, 10, True)
    x, t, y = inputs(cfg)
    stock = diffusers_out(net, x, t, y)
    assert (stock - model(x, t, y)).norm() / stock.norm() > 1e-3  # the port is not the original DiT
    # With diffusers set to DiT's frequencies and epsilon, the two agree to round-off ...
    convert.match_dit_timesteps(net)
    for block in net.transformer_blocks:
        block.norm3.eps = 1e-6
    assert_roundoff(diffusers_out(net, x, t, y), model.double()(x.double(), t, y))
    # ... and ditkit given diffusers' frequencies and epsilon reproduces stock diffusers: nothing else differs.
    model = model.float()
    with_time_frequencies(model, 127.0)
    for block in model.blocks:
        block.norm2.eps = 1e-5
    assert_roundoff(model(x, t, y), stock)


def test_pipeline_folder_and_bin_weights_load(tmp_path):
    net = diffusers_dit(norm_eps=1e-6)
    net.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    net.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    a = ditkit.load_model(tmp_path / "pipe")
    b = ditkit.load_model(tmp_path / "bin")  # read with weights_only, like every .pt
    for key, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], tensor), key


def test_fused_qkv_reads_like_separate_projections():
    net = diffusers_dit()
    config = convert.config_from_diffusers(dict(net.config))
    separate = net.state_dict()
    fused = dict(separate)
    for i in range(3):
        p = f"transformer_blocks.{i}.attn1."
        for name in ("weight", "bias"):
            fused[p + f"to_qkv.{name}"] = torch.cat([fused.pop(p + f"to_{c}.{name}") for c in "qkv"])
    a = convert.from_diffusers_state_dict(separate, config)
    b = convert.from_diffusers_state_dict(fused, config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_embedders_trained_apart_are_refused_unless_asked(tmp_path, capsys):
    net = diffusers_dit()
    with torch.no_grad():
        net.transformer_blocks[2].norm1.emb.timestep_embedder.linear_2.bias.add_(0.5)
    net.save_pretrained(str(tmp_path / "dit"))
    code = main(["convert", "--to", "ditkit", str(tmp_path / "dit"), str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "block 2" in err and "--use-first-embedder" in err
    args = ["convert", "--to", "ditkit", str(tmp_path / "dit"), str(tmp_path / "m.safetensors")]
    assert main([*args, "--use-first-embedder"]) == 0
    model = ditkit.load_model(tmp_path / "m.safetensors")
    first = net.transformer_blocks[0].norm1.emb.timestep_embedder
    assert torch.equal(model.t_embedder.mlp[2].bias, first.linear_2.bias)


# ----------------------------------------------------------------------------------------------- command line


def test_cli_writes_a_full_pipeline_and_reads_it_back(tmp_path, capsys):
    model = random_dit(seed=5)
    ditkit.save_model(model, tmp_path / "m.safetensors")
    tiny_vae(tmp_path / "vae")
    (tmp_path / "labels.txt").write_text("\n".join(f"class{i}, alias{i}" for i in range(10)) + "\n")
    code = main(
        [
            "convert", "--to", "diffusers", str(tmp_path / "m.safetensors"), str(tmp_path / "pipe"),
            "--vae", str(tmp_path / "vae"), "--labels", str(tmp_path / "labels.txt"),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "DiTPipeline" in out and "relative RMS" in out and "null label 1000" in out

    pipe = diffusers.DiTPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert pipe.get_label_ids(["alias7", "class2"]) == [7, 2]
    sched = pipe.scheduler
    assert type(sched).__name__ == "DDIMScheduler" and sched.config.num_train_timesteps == 1000
    assert not sched.config.clip_sample and sched.config.prediction_type == "epsilon"
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # the paper's linear schedule
    torch.testing.assert_close(sched.betas.double(), betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sched.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7)
    images = pipe(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert convert.match_dit_timesteps(pipe) == TINY["depth"]
    x, t, y = inputs(model.config)
    assert_roundoff(diffusers_out(pipe.transformer, x, t, y), copy.deepcopy(model).double()(x.double(), t, y))

    # The pipeline folder goes back to ditkit exactly, through the CLI.
    assert main(["convert", "--to", "ditkit", str(tmp_path / "pipe"), str(tmp_path / "back.safetensors")]) == 0
    assert "timestep frequencies" in capsys.readouterr().out
    back = ditkit.load_model(tmp_path / "back.safetensors")
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_cli_refuses_bad_input_with_one_line(tmp_path, capsys):
    model = random_dit()
    ditkit.save_model(model, tmp_path / "m.safetensors")
    src = str(tmp_path / "m.safetensors")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    (tmp_path / "bad.json").write_text(json.dumps({"0": "a", "12": "b"}))
    (tmp_path / "gap.txt").write_text("a\n\nc\n")
    nope, gap = str(tmp_path / "nope"), str(tmp_path / "gap.txt")
    cases = [
        (["--to", "diffusers", src, str(tmp_path / "taken")], "--overwrite"),
        (["--to", "diffusers", src, str(tmp_path / "o"), "--labels", str(tmp_path / "bad.json")], "--vae"),
        (["--to", "ditkit", src, str(tmp_path / "o.safetensors")], "not a folder"),
        (["--to", "diffusers", src, str(tmp_path / "o"), "--vae", str(tmp_path / "nope")], "AutoencoderKL"),
        (["--to", "diffusers", src, str(tmp_path / "o"), "--vae", nope, "--labels", gap], "line 2"),
        (["--to", "ditkit", str(tmp_path / "taken"), str(tmp_path / "o.safetensors")], "not a diffusers DiT"),
    ]
    for argv, words in cases:
        assert main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("ditkit convert: error:") and "\n" not in err and words in err, err
    tiny_vae(tmp_path / "vae")
    argv = [src, str(tmp_path / "o"), "--vae", str(tmp_path / "vae"), "--labels", str(tmp_path / "bad.json")]
    assert main(["convert", "--to", "diffusers", *argv]) == 2
    assert "ids 0..9" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@torch.no_grad()
def test_pipeline_ddim_scheduler_reproduces_ditkit_ddim_sampling():
    """diffusers' DDIM as `ddim_scheduler()` configures it, 10 steps, against ditkit's official-style ddim10."""
    from ditkit.diffusion import create_diffusion

    model = random_dit(seed=6)
    with torch.no_grad():  # smaller weights keep ε moderate, so DDIM's 1/√ᾱ does not blow round-off up
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.mul_(0.2)
    net = convert.to_diffusers_transformer(model)
    convert.match_dit_timesteps(net)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    y = torch.tensor([3, 8])
    ours = create_diffusion("ddim10").ddim_sample_loop(
        model, noise.shape, noise=noise, clip_denoised=False, model_kwargs=dict(y=y)
    )
    sched = convert.ddim_scheduler()
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == list(range(900, -1, -100))  # the set of the official "ddim10"
    x = noise.clone()
    for t in sched.timesteps:
        eps = diffusers_out(net, x, t.expand(2), y)[:, :4]  # the pipeline drops the learned variance
        x = sched.step(eps, t, x).prev_sample
    assert_roundoff(x, ours)
