"""REPA (ditkit.train.align, ditkit.encoders.features, ditkit.train.methods): against REPA's own code (a fixture made by
running their SILoss and SiT, see tests/fixtures/README.md), a float64 re-derivation, the recipe, the encoders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ditkit.models import DiT, DiTConfig
from ditkit.models.routing import TrainingPath
from ditkit.recipe import Recipe
from ditkit.runtime.errors import UserError
from ditkit.train.align import alignment_loss, attach_projector, build_projector, load_repa_checkpoint
from ditkit.training_methods import Alignment, Routing, TrainingMethods

FIXTURE = Path(__file__).parent / "fixtures" / "repa_siloss.safetensors"


def _fixture_model() -> tuple[DiT, dict[str, torch.Tensor]]:
    """ditkit's DiT + projector with the weights of REPA's tiny SiT in the fixture, loaded strictly."""
    data = load_file(FIXTURE)
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                       mlp_ratio=2.0, num_classes=10, learn_sigma=False)
    model = attach_projector(DiT(config), Alignment(encoder="fixture", feature_dim=16, projector_dim=48, depth=2))
    weights = {k.removeprefix("weights."): v.float() for k, v in data.items() if k.startswith("weights.")}
    weights["pos_embed"] = data["pos_embed"]
    model.load_state_dict(weights, strict=True)  # REPA's key names, projectors.0.{0,2,4} included
    return model, data


def test_fixture_is_small_and_says_how_it_was_made():
    assert FIXTURE.stat().st_size < 200_000
    with safe_open(FIXTURE, "pt") as f:
        assert "SILoss" in f.metadata()["made_by"]


def test_ditkit_matches_repa_siloss_on_their_model_features_and_draws():
    """REPA's SILoss (their loss.py, linear path, v prediction) on their SiT; ditkit's DiT with the same weights,
    REPA's time convention (x_t = (1−t)x + t·ε, target ε − x) and ditkit's alignment loss: equal to round-off."""
    model, d = _fixture_model()
    model.train()  # the training path runs in training mode; labels kept (REPA's model ran in eval mode)
    model.training_path = TrainingPath(tap_depth=2)
    x, t, noise, zs = d["x"].float(), d["t"], d["noise"], d["zs"].float()
    t4 = t.view(-1, 1, 1, 1)
    out = model(((1 - t4) * x + t4 * noise), t, d["y"], force_drop_ids=torch.zeros_like(d["y"]))
    denoising = ((out - (noise - x)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(denoising, d["denoising_loss"], rtol=1e-5, atol=1e-6)
    # float32 round-off: two blocks whose attention sums in another order (SDPA here, a matmul-softmax there)
    scale = float(d["zs_tilde"].abs().max())
    torch.testing.assert_close(model.training_path.tapped, d["zs_tilde"], rtol=1e-5, atol=2e-6 * scale)
    proj = alignment_loss(model.training_path.tapped, zs).mean()
    torch.testing.assert_close(proj.reshape(1), d["proj_loss"], rtol=1e-5, atol=1e-7)


def test_ditkit_flow_objective_is_repas_loss_under_the_time_flip():
    """ditkit's flow objective (SiT's convention: t = 0 noise) trains the same loss as REPA's SILoss (t = 1 noise):
    with s = 1 − t and a model that returns −v(x, 1 − s), the per-sample losses agree."""
    from ditkit.objectives import objective_for
    from ditkit.recipe import FlowProcess

    model, d = _fixture_model()
    model.eval()
    recipe = Recipe(model=model.config, process=FlowProcess())
    training = objective_for(recipe).training
    x, t, noise = d["x"].float(), d["t"], d["noise"]

    def flipped(x_t, s, y):
        return -model(x_t, 1 - s, y)

    s = 1 - t
    terms = training.transport.training_losses(flipped, x, {"y": d["y"]}, t=s, x0=noise)
    torch.testing.assert_close(terms["loss"], d["denoising_loss"], rtol=1e-5, atol=1e-6)


def test_projector_and_cosine_loss_match_a_float64_derivation():
    torch.manual_seed(0)
    projector = build_projector(12, 20, 7)
    h, target = torch.randn(3, 5, 12), torch.randn(3, 5, 7)
    loss = alignment_loss(projector(h), target)
    w = [projector[i].weight.double() for i in (0, 2, 4)]
    b = [projector[i].bias.double() for i in (0, 2, 4)]

    def silu(v):
        return v / (1 + torch.exp(-v))

    z = silu(h.double() @ w[0].T + b[0])
    z = silu(z @ w[1].T + b[1])
    z = z @ w[2].T + b[2]
    cos = (z * target.double()).sum(-1) / (z.norm(dim=-1) * target.double().norm(dim=-1))
    expected = -cos.mean(dim=1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(loss >= -1 - 1e-6) and torch.all(loss <= 1 + 1e-6)
    aligned = alignment_loss(target * 3.0, target)  # same direction: −1 exactly (scale-free)
    torch.testing.assert_close(aligned, torch.full((3,), -1.0))


def test_repa_checkpoint_loads_strictly_and_a_wrong_one_gets_one_line(tmp_path):
    d = load_file(FIXTURE)
    weights = {k.removeprefix("weights."): v.float() for k, v in d.items() if k.startswith("weights.")}
    weights["pos_embed"] = d["pos_embed"]
    torch.save({"ema": weights, "model": weights}, tmp_path / "repa.pt")
    model = load_repa_checkpoint(tmp_path / "repa.pt", feature_dim=16, projector_dim=48)
    assert not model.config.learn_sigma and model.config.depth == 3
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(UserError, match="not a REPA SiT checkpoint"):
        load_repa_checkpoint(tmp_path / "repa.pt", feature_dim=768, projector_dim=48)


def test_recipe_records_the_methods_and_old_recipes_read_as_plain():
    config = DiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    methods = TrainingMethods(Alignment("digits-mae", 64, depth=2, projector_dim=32), Routing(0.5, 1, 2))
    recipe = Recipe(model=config, training=methods)
    assert Recipe.from_json(recipe.to_json()) == recipe
    plain = Recipe(model=config)
    assert "training" not in plain.to_dict()  # plain recipes keep their bytes
    assert Recipe.from_dict(plain.to_dict()).training == TrainingMethods()
    with pytest.raises(UserError, match="--repa-depth 9"):
        Recipe(model=config, training=TrainingMethods(Alignment("digits-mae", 64, depth=9)))
    with pytest.raises(UserError, match="--tread-start"):
        Recipe(model=config, training=TrainingMethods(routing=Routing(0.5, 3, 4)))


def test_resume_with_other_settings_is_refused_in_one_line():
    from ditkit.train.loop import check_resumed_recipe

    config = DiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    stored = Recipe(model=config, training=TrainingMethods(Alignment("digits-mae", 64, depth=2)))
    asked = Recipe(model=config, training=TrainingMethods(Alignment("digits-mae", 64, depth=3)))
    with pytest.raises(UserError, match="--repa-") as err:
        check_resumed_recipe(stored.to_json(), asked, Path("ckpt"))
    assert "\n" not in str(err.value)
    check_resumed_recipe(stored.to_json(), stored, Path("ckpt"))
    with pytest.raises(UserError, match="--tread-"):
        check_resumed_recipe(Recipe(model=config).to_json(),
                             Recipe(model=config, training=TrainingMethods(routing=Routing(0.5, 1, 2))), Path("c"))


def test_sampling_a_repa_checkpoint_drops_the_projector(tmp_path):
    import ditkit
    from ditkit.weights.checkpoints import save_model

    config = DiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    model = attach_projector(DiT(config), Alignment("digits-mae", 16, depth=1, projector_dim=8))
    save_model(model, tmp_path / "m.safetensors")
    loaded = ditkit.load_model(tmp_path / "m.safetensors")
    assert not hasattr(loaded, "projectors")
    plain = {k: v for k, v in model.state_dict().items() if not k.startswith("projectors.")}
    assert loaded.state_dict().keys() == plain.keys()


def test_transformers_encoder_from_a_local_folder_and_one_line_when_missing(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ditkit.encoders.features import load_encoder, to_grid

    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=28, patch_size=14)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dino")
    encoder = load_encoder(str(tmp_path / "dino"))
    encoder.image_size = 28  # DINOv2-B takes 224; the tiny one 28 (a 2×2 patch grid)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    features = encoder(images)
    assert features.shape == (3, 4, 16) and encoder.feature_dim == 16
    assert to_grid(features, 4).shape == (3, 16, 16)
    with pytest.raises(UserError, match="no such model") as err:
        load_encoder(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)


def test_train_step_adds_the_weighted_alignment_term():
    """TrainStep's loss with REPA = the objective's loss + coeff · mean alignment loss, recomputed independently."""
    from ditkit.diffusion import create_diffusion
    from ditkit.train.methods import MethodHooks
    from ditkit.train.step import TrainStep

    config = DiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    methods = TrainingMethods(Alignment("fixed", 8, depth=2, coeff=0.5, projector_dim=16))
    torch.manual_seed(0)
    hooks = MethodHooks(methods)
    model = hooks.attach(DiT(config))
    for p in model.parameters():  # nonzero gates, so the tapped state depends on the blocks
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    ema = hooks.attach(DiT(config))
    ema.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, targets = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.randn(4, 16, 8)
    diffusion = create_diffusion("")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(model, model, ema, opt, diffusion, device=torch.device("cpu"), precision="fp32",
                     global_batch=4, seed=3, methods=hooks)
    out = step(x, y, 0, targets=targets)
    model.load_state_dict(before)
    model.train()
    model.training_path = TrainingPath(tap_depth=2)
    from ditkit.train.step import draw_step_randomness

    t, noise, drop = draw_step_randomness(3, 0, 4, (1, 8, 8), diffusion.num_timesteps, 0.1, torch.device("cpu"))
    terms = diffusion.training_losses(model, x, t, model_kwargs={"y": y, "force_drop_ids": drop}, noise=noise)
    expected = terms["loss"].mean() + 0.5 * alignment_loss(model.training_path.tapped, targets).mean()
    assert math.isclose(float(out.terms[0]), float(expected.detach()), rel_tol=1e-6)
