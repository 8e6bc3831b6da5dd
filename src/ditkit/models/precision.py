"""The numeric precision of a run, decided once: what `--precision fp32|tf32|bf16|fp8` means, written here only.

- fp32: float32 everywhere, TF32 off (for bit-level comparisons);
- tf32: float32 tensors, TF32 tensor-core matmuls and convolutions on CUDA;
- bf16: bf16 autocast over fp32 master weights (TF32 for what autocast leaves in float32);
- fp8: bf16 autocast, and the DiT blocks' four linears as FP8 GEMMs (CUDA, compute capability 8.9 or newer).

`Precision.resolve(flag, device)` gives the value (default bf16 on a GPU, fp32 elsewhere) and checks it once;
the value gives the autocast context, the TF32 switches and the dtype of inference-only weights (the VAE).
`prepare(model, precision, training=..., compile=..., fused=...)` readies a model for a run in one step: the
kernel path of its layers (fused GPU kernels or the plain PyTorch code), FP8 for the block linears and compiled
blocks. The path is the layers' own state, not a process-wide switch; the attention backend is measured later,
by the code that knows the batch (`DiT.choose_attention`), and stored on the attention modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ditkit.runtime.errors import UserError

PRECISIONS = ("fp32", "tf32", "bf16", "fp8")
FP8_CAPABILITY = (8, 9)  # Ada / Hopper: FP8 tensor cores


@dataclass(frozen=True)
class Precision:
    """One of `PRECISIONS` on one device type; build it with `resolve`."""

    name: str
    device_type: str = "cpu"

    @classmethod
    def resolve(cls, flag: str | None, device: torch.device) -> Precision:
        """The flag's precision (None: bf16 on CUDA, fp32 elsewhere), checked for this device in one line."""
        name = flag or ("bf16" if device.type == "cuda" else "fp32")
        if name not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        if name == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY):
            raise UserError("--precision fp8 needs a CUDA GPU with FP8 matrix units (Ada/Hopper or newer); use bf16")
        return cls(name, device.type)

    @property
    def low(self) -> bool:
        """bf16 autocast is on (bf16, and fp8 whose other ops run in bf16)."""
        return self.name in ("bf16", "fp8")

    @property
    def tf32(self) -> bool:
        """TF32 tensor cores for float32 matmuls and convolutions."""
        return self.name != "fp32"

    @property
    def fp8(self) -> bool:
        return self.name == "fp8"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device type for bf16 and fp8; nothing for fp32 and tf32."""
        if self.low:
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_tf32(self) -> None:
        """Switch CUDA's TF32 matmuls and convolutions on or off to match (a process-wide torch setting)."""
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the blocks' matmuls and attention run in: bf16 under autocast, else float32."""
        return torch.bfloat16 if self.low else torch.float32

    @property
    def inference_dtype(self) -> torch.dtype:
        """The dtype of weights used only for inference (the VAE decoder): bf16 weights decoded 1.3× faster
        than bf16 autocast on a GPU (benchmarks/RESULTS.md, issue 13); float32 elsewhere."""
        return torch.bfloat16 if self.low and self.device_type == "cuda" else torch.float32

    def without_fp8(self) -> Precision:
        """The precision of a copy of the model without FP8 linears (the EMA): bf16 for fp8, else the same."""
        return Precision("bf16", self.device_type) if self.fp8 else self


def prepare(model: torch.nn.Module, precision: Precision, *, training: bool,
            compile: bool | Mapping[str, Any] = False, fused: bool = True) -> torch.nn.Module:
    """Ready `model` (already on its device) for training or sampling at `precision`, in place; returns it.

    - `fused`: every layer with a kernel path (`fused` attribute: DiT blocks, final layer, MLPs, the DiT's
      attention choice) takes the fused GPU kernels where the tensor suits them (off: the plain PyTorch code,
      for comparisons);
    - fp8: the block linears as `kernels.fp8.Float8Linear`. Training: tensorwise scales with autograd.
      Sampling: weights quantised once by rows, the activations' row scales made inside the LayerNorm kernels
      (the tensorwise path quantised every operand on every call and sampled 2× slower, benchmarks/RESULTS.md,
      issue 13);
    - `compile`: each block compiled (`ditkit.runtime.fast.compile_blocks`), after FP8 so the graphs hold its products;
      a mapping gives compile_blocks' keyword arguments (the benchmarks' backends and modes).
    """
    for module in model.modules():
        if isinstance(getattr(module, "fused", None), bool):
            module.fused = fused
    if precision.fp8:
        from ditkit.models.kernels.fp8 import enable_fp8

        enable_fp8(model, rowwise=not training)
    if compile:
        from ditkit.runtime.fast import compile_blocks

        compile_blocks(model, **(compile if isinstance(compile, Mapping) else {}))
    return model
