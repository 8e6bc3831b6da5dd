"""Shared test fixtures over tests/helpers, and the `subprocess` marker set from the source.

Select with markers: `pytest -m "not slow"`, `pytest -m "not subprocess"` (tests that start another Python
process: scripts, `python -m ditkit`, torchrun), `pytest -m subprocess`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import markers

# The fixtures import their helper when used, so that collecting tests imports nothing more than the tests do
# (test_metrics_evaluate checks what stays unimported).


def pytest_collection_modifyitems(config, items):
    """Mark `subprocess` every test that starts a Python process (helpers.markers reads which from the source)."""
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in markers.spawning_functions(Path(item.path).resolve()):
            item.add_marker(pytest.mark.subprocess)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and CI's two cores are shared by two test workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    """A fresh tiny DiT (helpers.models.tiny_dit: 2 blocks, 64 wide, 8×8 grey inputs, 10 classes), official init."""
    from helpers.models import tiny_dit

    return tiny_dit()


@pytest.fixture(scope="session")
def sampling_checkpoint(tmp_path_factory) -> Path:
    """helpers.models.sampling_dit saved as a .safetensors file (read-only: share it, do not change it)."""
    path = tmp_path_factory.mktemp("sampling-ckpt") / "tiny.safetensors"
    import ditkit
    from helpers.models import sampling_dit

    ditkit.save_model(sampling_dit(), path)
    return path


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """helpers.vae.make_tiny_vae's folder: an AutoencoderKL with 8× downsampling and 4 latent channels."""
    pytest.importorskip("diffusers")
    from helpers.vae import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """helpers.images.make_image_folder: 3 classes, odd sizes, PNG/JPEG, grey/palette/RGBA, one corrupt file."""
    from helpers.images import make_image_folder

    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory) -> Path:
    """A tiny random T5 encoder with its word-level tokenizer (helpers.text.save_t5)."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("t5")
    from helpers.text import save_t5

    save_t5(folder)
    return folder


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP text encoder with its word-level tokenizer (helpers.text.save_clip)."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip")
    from helpers.text import save_clip

    save_clip(folder)
    return folder


@pytest.fixture
def train_options(tmp_path):
    """`train_options(**kw)`: TrainOptions of the tiny training run (6 steps, checkpoints at 3 and 6) writing into
    tmp_path / "run"; kw overrides any field (helpers.training.options)."""
    from helpers.training import options

    return lambda **kw: options(tmp_path, **kw)


@pytest.fixture
def sample_cli():
    """`sample_cli(*argv)`: `ditkit sample ARGV --no-progress` in this process, returning its exit code."""
    from helpers.cli import run_cli

    return run_cli


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """The environment of child processes: ditkit's source on PYTHONPATH, one OpenMP thread."""
    from helpers.processes import ENV

    return dict(ENV)
