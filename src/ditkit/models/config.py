"""DiT configurations: the paper's 12 named models and the settings every model carries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ditkit.runtime.errors import UserError
from ditkit.runtime.validate import model_limits

# The class-conditional blocks of the DiT paper's ablation, then PixArt-α's text block.
CLASS_CONDITIONINGS = ("adaln-zero", "adaln", "cross-attention", "in-context")
CONDITIONINGS = (*CLASS_CONDITIONINGS, "text")
# Settings only a text model ("text": PixArt-α's block) has; left out of a class model's stored config, so
# class-conditional checkpoints store exactly what they did before text models existed.
TEXT_FIELDS = ("caption_channels", "max_tokens", "interpolation_scale")

# Paper Table 1: name -> (depth, hidden size, heads). Patch sizes 2, 4, 8 give the 12 models.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (8, 4, 2)
# The modern recipe's switches (LightningDiT; layers in models/knobs.py), each default the paper's DiT. Left out of
# a stored config at their defaults, so every model without them stores exactly what it did before they existed.
KNOB_DEFAULTS: dict[str, Any] = {"norm": "layernorm", "qk_norm": "none", "rope": False, "mlp": "gelu"}
KNOB_CHOICES: dict[str, tuple[str, ...]] = {
    "norm": ("layernorm", "rmsnorm"), "qk_norm": ("none", "rmsnorm", "layernorm"), "mlp": ("gelu", "swiglu"),
}
MODEL_NAMES: tuple[str, ...] = tuple(f"DiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES)


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to build a DiT; stored with ditkit checkpoints.

    `input_size` is the side of the (latent) input, e.g. 32 for 256×256 images through the SD-VAE.
    `num_classes` labels 0..num_classes-1; label `num_classes` is the null label used for guidance.
    Text models (`conditioning="text"`, PixArt-α) read captions of at most `max_tokens` tokens of
    `caption_channels` features (T5-XXL: 4096, 120 tokens; `num_classes` is unused) and drop them to the null
    caption with probability `class_dropout_prob`; `interpolation_scale` divides the positions of the sin-cos
    table (PixArt-α's "lewei scale": 1 at 256 and 512 pixels, 2 at 1024).
    """

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    mlp_ratio: float = 4.0
    conditioning: str = "adaln-zero"
    caption_channels: int = 4096
    max_tokens: int = 120
    interpolation_scale: float = 1.0
    norm: str = "layernorm"
    qk_norm: str = "none"
    rope: bool = False
    mlp: str = "gelu"
    # A second timestep embedder (`r_embedder.*`) for the interval t − r of a MeanFlow model; left out of the
    # stored config when off, so every other checkpoint stores (and loads strictly) what it did before.
    interval_time: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def name(self) -> str:
        """The paper's name when depth/width/heads match one of its sizes, else a descriptive one."""
        for size, dims in SIZES.items():
            if dims == (self.depth, self.hidden_size, self.num_heads):
                return f"DiT-{size}/{self.patch_size}"
        return f"DiT-d{self.depth}w{self.hidden_size}h{self.num_heads}/{self.patch_size}"

    def validate(self) -> None:
        """Raise UserError with one line naming the first bad setting."""
        for field in (
            "depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes",
            "caption_channels", "max_tokens",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model config: {field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise UserError(f"model config: hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos)")
        if self.input_size % self.patch_size:
            raise UserError(
                f"model config: input_size {self.input_size} is not divisible by patch_size {self.patch_size}; "
                f"choose an input size that is a multiple of {self.patch_size}"
            )
        if not 0.0 <= float(self.class_dropout_prob) < 1.0:
            raise UserError(f"model config: class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if not float(self.mlp_ratio) > 0:
            raise UserError(f"model config: mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.conditioning not in CONDITIONINGS:
            raise UserError(
                f"model config: unknown conditioning {self.conditioning!r}; choose one of {', '.join(CONDITIONINGS)}"
            )
        if not float(self.interpolation_scale) > 0:
            raise UserError(f"model config: interpolation_scale must be positive, got {self.interpolation_scale}")
        if self.conditioning != "text" and float(self.interpolation_scale) != 1.0:
            raise UserError("model config: interpolation_scale applies to text models (conditioning text) only")
        self._validate_knobs()
        model_limits(self)  # upper bounds and the model's size, before anything is built from it

    @property
    def knobs(self) -> dict[str, Any]:
        """The modern recipe's switches that differ from the paper's DiT (empty for the paper's models)."""
        return {k: getattr(self, k) for k, v in KNOB_DEFAULTS.items() if getattr(self, k) != v}

    def _validate_knobs(self) -> None:
        for name, choices in KNOB_CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(
                    f"model config: unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}"
                )
        if not isinstance(self.rope, bool):
            raise UserError(f"model config: rope must be true or false, got {self.rope!r}")
        if self.knobs and self.conditioning not in ("adaln-zero", "adaln"):
            raise UserError(f"model config: the layer switches ({', '.join(self.knobs)}) need an adaLN model, not "
                            f"conditioning {self.conditioning}; drop them or use --conditioning adaln-zero")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise UserError(f"model config: rope needs a head width divisible by 4, got "
                            f"{self.hidden_size // self.num_heads}; change hidden_size or num_heads")

    @property
    def is_text(self) -> bool:
        return self.conditioning == "text"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.is_text:
            for name in TEXT_FIELDS:
                del data[name]
        for name, default in KNOB_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        if not self.interval_time:
            del data["interval_time"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        """Build from a stored dict, refusing unknown keys and wrong types with one clear line."""
        if not isinstance(data, dict):
            raise UserError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"model config: unknown key(s) {', '.join(unknown)}")
        clean: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(cls, key)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise UserError(f"model config: {key} must be true or false, got {value!r}")
            elif isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise UserError(f"model config: {key} must be an integer, got {value!r}")
            elif isinstance(default, float):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise UserError(f"model config: {key} must be a number, got {value!r}")
                value = float(value)
            elif isinstance(default, str) and not isinstance(value, str):
                raise UserError(f"model config: {key} must be a string, got {value!r}")
            clean[key] = value
        return cls(**clean)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DiTConfig:
        """Config of a paper model (`DiT-XL/2` ...) with optional overrides (input_size, num_classes, ...)."""
        if name not in MODEL_NAMES:
            raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
        size, patch = name[len("DiT-") :].split("/")
        depth, hidden, heads = SIZES[size]
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise UserError(f"create_model: unknown option(s) {', '.join(bad)}")
        base.update(overrides)
        return cls(**base)
