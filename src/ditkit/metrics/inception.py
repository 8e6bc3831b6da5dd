"""Inception-V3 features for FID, sFID, IS and precision/recall, as ADM / pytorch-fid define them.

The network is torch-fidelity's `FeatureExtractorInceptionV3`, the maintained PyTorch port of the TensorFlow
FID Inception graph (bit-compatible resizing and normalisation). Importing the `torch_fidelity` package pulls
in torchvision, which ditkit does not need; so only the one module that defines the network is loaded (it
needs torch alone), and `pip install --no-deps torch-fidelity` is enough. Weights are never downloaded: they
come from a local file, read with `weights_only=True`.

Every feature network maps uint8 images N×3×H×W (0..255, any size) to a dict of float32 arrays:
  "pool":    N×2048 pool_3 features (FID, precision/recall)
  "spatial": N×2023 the first 7 channels of mixed_6/conv (17×17×7, flattened in ADM's NHWC order; sFID)
  "logits":  N×1008 logits without the classifier bias (Inception Score, as ADM's graph computes it)
and carries a `fingerprint` string that identifies it (weights included) for the reference-statistics cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from ditkit.runtime.errors import UserError

WEIGHTS_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels: 17·17·7 = 2023 features
_FIDELITY_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
_MISSING_WEIGHTS = (
    "Inception-V3 weights are needed for FID/sFID/IS/precision/recall and cannot be downloaded here: pass "
    f"--inception-weights PATH to {WEIGHTS_FILE_NAME} (the pytorch-fid / torch-fidelity FID weights), "
    "or use --metric digits"
)


# ----------------------------------------------------------------------------------------------- import


@contextlib.contextmanager
def _package_without_init(name: str, folder: str) -> Iterator[None]:
    """Make `name` importable as a bare package whose `__init__` is not run, and forget it afterwards.

    The placeholder and the submodules loaded through it leave `sys.modules` on exit, so a later
    `import torch_fidelity` by the user gets the real package; the modules we hold stay valid.
    """
    placeholder = types.ModuleType(name)
    placeholder.__path__ = [folder]
    sys.modules[name] = placeholder
    try:
        yield
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def import_fidelity_inception() -> types.ModuleType:
    """torch-fidelity's Inception module, without importing the package (and so without torchvision)."""
    if "torch_fidelity" in sys.modules:  # the user imported the full package already: use it
        return importlib.import_module(_FIDELITY_MODULE)
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "FID/sFID/IS/precision/recall need torch-fidelity's Inception network: "
            "pip install 'ditkit[eval]' "
            "(or pip install --no-deps torch-fidelity to skip torchvision)"
        )
    with _package_without_init("torch_fidelity", list(spec.submodule_search_locations)[0]):
        return importlib.import_module(_FIDELITY_MODULE)


# ----------------------------------------------------------------------------------------------- network


class FidelityInception(nn.Module):
    """torch-fidelity's FID Inception-V3 with the three outputs ditkit's evaluation reads (see module doc)."""

    def __init__(self, extractor: nn.Module, fingerprint: str):
        super().__init__()
        self.extractor = extractor
        self.fingerprint = fingerprint
        self._spatial: torch.Tensor | None = None
        # mixed_6/conv of the TensorFlow graph is Mixed_6d's 1×1 branch (after its batch norm and ReLU).
        extractor.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.extractor(images)
        spatial, self._spatial = self._spatial, None
        spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)  # NHWC order, as ADM flattens
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from ditkit.runtime.io import read_safetensors, safe_torch_load

    if path.suffix == ".safetensors":
        state, _ = read_safetensors(path)
    else:
        state = safe_torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not an Inception-V3 state_dict; expected {WEIGHTS_FILE_NAME}")
    return state


def load_inception(weights_path: str | Path | None, device: str | torch.device = "cpu") -> FidelityInception:
    """The FID Inception-V3 with weights from a local `.pth` state_dict or `.safetensors`, in eval mode."""
    if weights_path is None:
        raise UserError(_MISSING_WEIGHTS)
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Inception weights not found: {path}; pass --inception-weights PATH to {WEIGHTS_FILE_NAME}"
        )
    state = _read_weights(path)
    module = import_fidelity_inception()
    if not hasattr(module, "load_state_dict_from_url") or not hasattr(module, "FeatureExtractorInceptionV3"):
        raise UserError(
            "this torch-fidelity version is not supported; pip install --no-deps 'torch-fidelity>=0.4'"
        )
    # The constructor fetches its weights through this module-level function; hand it the file read above
    # (torch-fidelity's own path option would unpickle with weights_only=False, which ditkit never does).
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        extractor = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    except RuntimeError as err:
        key = re.search(r'"([^"]+)"', str(err))
        detail = f" (first mismatch: {key.group(1)})" if key else ""
        raise UserError(
            f"{path} does not fit the FID Inception-V3{detail}; expected {WEIGHTS_FILE_NAME}"
        ) from None
    finally:
        module.load_state_dict_from_url = original
    net = FidelityInception(extractor, fingerprint=f"fid-inception-v3:{_file_digest(path)}")
    return net.to(device).eval()


def save_random_weights(path: str | Path, seed: int = 0) -> None:
    """Write a state_dict of the FID Inception with random weights (the constructor's weight loading skipped),
    for checking the evaluation pipeline end to end where the published weights are not available."""
    module = import_fidelity_inception()

    class Unloaded(module.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *a, **k: None
    try:
        torch.manual_seed(seed)
        net = Unloaded("random", ["2048", "logits_unbiased"])
    finally:
        module.load_state_dict_from_url = original
    # He-normal convolutions keep the activation scale through the 90-odd ReLU layers (PyTorch's default init
    # shrinks it to ~1e-8 by the pool layer, where every distance would be 0).
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            torch.nn.init.normal_(m.weight, std=(2.0 / fan_in) ** 0.5)
    torch.save(net.state_dict(), path)
