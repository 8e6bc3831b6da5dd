"""`ditkit.encoders.vae_decoder` against diffusers' AutoencoderKL decode on the same (random, tiny) weights, in
float64."""

from __future__ import annotations

from functools import partial

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ditkit.encoders.autoencoder import load_vae  # noqa: E402
from ditkit.encoders.vae_decoder import _RENAMED, load_decoder  # noqa: E402
from helpers import vae as vae_helpers  # noqa: E402

# 3 levels (8, 16, 16): 4× downsampling; every weight perturbed, the zero-initialised layers random too.
tiny_vae = partial(vae_helpers.tiny_vae, perturb="all", block_out_channels=(8, 16, 16))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("config", [{}, {"mid_block_add_attention": False}, {"use_post_quant_conv": False}])
def test_decoder_matches_diffusers_in_float64(tmp_path, config):
    vae = tiny_vae(**config)
    vae.save_pretrained(tmp_path / "vae")
    ours = load_decoder(tmp_path / "vae", torch.float64)
    assert ours is not None
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = vae.double().decode(z).sample
        got = ours.decode(z).sample
    assert got.shape == ref.shape == (2, 3, 32, 32)
    assert float((got - ref).abs().max()) < 1e-10


def test_old_attention_names_load_and_unknown_layouts_fall_back(tmp_path):
    from safetensors.torch import load_file, save_file

    vae = tiny_vae(seed=1)
    vae.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    back = {new: old for old, new in _RENAMED.items()}
    renamed = {}
    for key, value in tensors.items():  # the names diffusers < 0.14 wrote
        for new, old in back.items():
            key = key.replace(new, old) if ".attentions." in key else key
        renamed[key] = value
    save_file(renamed, str(path))
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(load_decoder(tmp_path / "vae", torch.float64).decode(z).sample,
                              vae.double().decode(z).sample, atol=1e-10)
    path.unlink()  # no safetensors file: diffusers loads it (and can encode)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
    assert load_decoder(tmp_path / "vae") is None
    assert hasattr(load_vae(str(tmp_path / "vae"), decode_only=True).model, "encode")


def test_decode_only_vae_through_the_wrapper_scales_and_refuses_to_encode(tmp_path):
    from ditkit.runtime.errors import UserError

    vae = tiny_vae(seed=2)
    vae.save_pretrained(tmp_path / "vae")
    ours, full = load_vae(str(tmp_path / "vae"), decode_only=True), load_vae(str(tmp_path / "vae"))
    assert not hasattr(ours.model, "encode") and (ours.scale, ours.downsample) == (full.scale, full.downsample)
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(ours.decode(z), full.decode(z), atol=1e-5)
    with pytest.raises(UserError, match="decoding only"):
        ours.encode(torch.zeros(1, 3, 32, 32))


def test_every_decoder_layer_runs_on_contiguous_maps(tmp_path):
    # The mid block's attention ends in a channels-last view; kept, every later layer ran channels-last, 19%
    # slower on an H200 (benchmarks/RESULTS.md). Every 4-d output must be plainly contiguous.
    tiny_vae(seed=3).save_pretrained(tmp_path / "vae")
    ours = load_decoder(tmp_path / "vae")
    layouts = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            layouts.append((type(module).__name__, output.is_contiguous()))

    for module in ours.modules():
        module.register_forward_hook(record)
    with torch.no_grad():
        ours.decode(torch.randn(2, 4, 8, 8))
    assert len(layouts) > 20 and all(ok for _, ok in layouts), [name for name, ok in layouts if not ok]
