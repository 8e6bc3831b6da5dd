"""The recipe: how a model was made and how it must be sampled, recorded once and read back everywhere.

A recipe has four parts, each a small frozen dataclass:

- `model`: the network (`DiTConfig`: size, patch, input shape, classes, learned variance, conditioning block);
- `process`: the generative process the network was trained for (`DiffusionProcess` — the authors' Gaussian
  diffusion — or `FlowProcess` — SiT's interpolants), with everything a sampler needs to invert it;
- `latents`: the space the network works in (`LatentSpace`: pixels, or a VAE's latents with its scale/shift);
- `conditioning`: what the network is conditioned on (`Conditioning`: class labels and their names, or text).

It is written into every checkpoint (safetensors metadata key `recipe`), every latent store manifest (the
`latents` and `conditioning` parts, the only ones a store knows) and every sample folder's settings, and read
back by train (resume, grids, evaluation), sample, evaluate, convert and scaling. Nothing here imports torch or
the rest of ditkit beyond the model config, so every stage can depend on it.

Adding an objective = one `*Process` class registered in `PROCESSES`; adding a conditioning kind = a value of
`CONDITIONING_KINDS` plus its fields on `Conditioning`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ditkit.errors import UserError
from ditkit.models.config import DiTConfig

RECIPE_VERSION = 1
METADATA_KEY = "recipe"  # the safetensors metadata key (beside the older "config" key, kept for old readers)
SD_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE the DiT authors sample their releases through
SD_VAE_SCALE = 0.18215  # the SD-VAE latent scale the DiT paper uses


# ----------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class DiffusionProcess:
    """The authors' Gaussian diffusion (guided-diffusion): `create_diffusion`'s training-time settings.

    The learned variance is the model's `learn_sigma` (recorded once, in the model config).
    """

    kind: ClassVar[str] = "diffusion"
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"  # "linear" | "cosine"
    prediction: str = "epsilon"  # "epsilon" | "x0" | "v"

    SCHEDULES: ClassVar[tuple[str, ...]] = ("linear", "cosine")
    PREDICTIONS: ClassVar[tuple[str, ...]] = ("epsilon", "x0", "v")

    def validate(self) -> None:
        _positive_int(self.diffusion_steps, "process.diffusion_steps")
        _choice(self.noise_schedule, self.SCHEDULES, "process.noise_schedule")
        _choice(self.prediction, self.PREDICTIONS, "process.prediction")


@dataclass(frozen=True)
class FlowProcess:
    """SiT's stochastic interpolants (`create_transport`'s settings) plus the training-time t distribution."""

    kind: ClassVar[str] = "flow"
    path_type: str = "Linear"  # "Linear" | "GVP" | "VP"
    prediction: str = "velocity"  # "velocity" | "noise" | "score"
    loss_weight: str | None = None  # None | "velocity" | "likelihood"
    train_eps: float | None = None
    sample_eps: float | None = None
    t_sampling: str = "uniform"  # "uniform" | "lognormal" (SD3 / LightningDiT)

    PATHS: ClassVar[tuple[str, ...]] = ("Linear", "GVP", "VP")
    PREDICTIONS: ClassVar[tuple[str, ...]] = ("velocity", "noise", "score")
    LOSS_WEIGHTS: ClassVar[tuple[str | None, ...]] = (None, "velocity", "likelihood")
    T_SAMPLINGS: ClassVar[tuple[str, ...]] = ("uniform", "lognormal")

    def validate(self) -> None:
        _choice(self.path_type, self.PATHS, "process.path_type")
        _choice(self.prediction, self.PREDICTIONS, "process.prediction")
        _choice(self.loss_weight, self.LOSS_WEIGHTS, "process.loss_weight")
        _choice(self.t_sampling, self.T_SAMPLINGS, "process.t_sampling")
        for name in ("train_eps", "sample_eps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"recipe: process.{name} must be a finite number >= 0 or null, got {value!r}")


PROCESSES: dict[str, type] = {"diffusion": DiffusionProcess, "flow": FlowProcess}
Process = DiffusionProcess | FlowProcess


@dataclass(frozen=True)
class LatentSpace:
    """Pixels (`vae` None, `downsample` 1) or the latents of a VAE named by a Hugging Face id or a local path.

    Latents fed to the model are `(encode(x) - shift) * scale`, as diffusers' SD/SD3 pipelines use them.
    The latent channels and side are the model's `in_channels` / `input_size` (recorded once, there).
    """

    vae: str | None = None
    scale: float = 1.0
    shift: float = 0.0
    downsample: int = 1

    @property
    def is_pixels(self) -> bool:
        return self.vae is None

    def validate(self) -> None:
        _positive_int(self.downsample, "latents.downsample")
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UserError(f"recipe: latents.{name} must be a finite number, got {value!r}")
        if self.vae is None and self.downsample != 1:
            raise UserError("recipe: pixel space (latents.vae null) must have latents.downsample 1")
        if self.vae is not None and (not isinstance(self.vae, str) or not self.vae):
            raise UserError(f"recipe: latents.vae must be a VAE name or path, got {self.vae!r}")

    @classmethod
    def sd_vae(cls, name: str = SD_VAE) -> LatentSpace:
        """The SD-VAE space of the DiT paper: ×0.18215, factor 8."""
        return cls(vae=name, scale=SD_VAE_SCALE, shift=0.0, downsample=8)


CONDITIONING_KINDS = ("class", "text", "none")


@dataclass(frozen=True)
class Conditioning:
    """What the model is conditioned on.

    "class": labels 0..num_classes-1 (the model config's `num_classes`; label num_classes is the null label
    used for guidance); `classes` optionally names them (the image folder's sub-folder names, in label order),
    so the label map never changes meaning between extract, train and sample.
    "text": captions encoded by `text_encoder` (a transformers model id or path) into at most `max_tokens`.
    "none": unconditional.
    """

    kind: str = "class"
    classes: tuple[str, ...] | None = None
    text_encoder: str | None = None
    max_tokens: int | None = None

    def validate(self) -> None:
        _choice(self.kind, CONDITIONING_KINDS, "conditioning.kind")
        if self.classes is not None and not all(isinstance(c, str) for c in self.classes):
            raise UserError("recipe: conditioning.classes must be a list of class names")
        if self.max_tokens is not None:
            _positive_int(self.max_tokens, "conditioning.max_tokens")


# ----------------------------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Recipe:
    """How a model was made and must be sampled. `Recipe.from_dict(r.to_dict()) == r`; see the module doc."""

    model: DiTConfig
    process: Process = field(default_factory=DiffusionProcess)
    latents: LatentSpace = field(default_factory=LatentSpace)
    conditioning: Conditioning = field(default_factory=Conditioning)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # --- facts derived from the parts (never stored twice)

    @property
    def image_size(self) -> int:
        """The side of the images the model makes, in pixels."""
        return self.model.input_size * self.latents.downsample

    @property
    def objective(self) -> str:
        return self.process.kind

    @property
    def null_label(self) -> int:
        return self.model.num_classes

    def validate(self) -> None:
        """Raise UserError naming the first bad field; checks across parts too."""
        if not isinstance(self.model, DiTConfig):
            raise UserError(f"recipe: model must be a DiTConfig, got {type(self.model).__name__}")
        if type(self.process) not in PROCESSES.values():
            raise UserError(f"recipe: unknown process {type(self.process).__name__}")
        self.process.validate()
        self.latents.validate()
        self.conditioning.validate()
        classes = self.conditioning.classes
        if classes is not None and len(classes) > self.model.num_classes:
            raise UserError(
                f"recipe: {len(classes)} class names but the model has num_classes {self.model.num_classes}"
            )

    # --- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        process = {"kind": self.process.kind, **dataclasses.asdict(self.process)}
        conditioning = dataclasses.asdict(self.conditioning)
        if conditioning["classes"] is not None:
            conditioning["classes"] = list(conditioning["classes"])
        return {
            "version": self.version,
            "model": self.model.to_dict(),
            "process": process,
            "latents": dataclasses.asdict(self.latents),
            "conditioning": conditioning,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Read a stored recipe; unknown keys, wrong types and newer versions get one line each."""
        if not isinstance(data, dict):
            raise UserError(f"recipe must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if not isinstance(version, int) or version < 1:
            raise UserError(f"recipe: version must be a positive integer, got {version!r}")
        if version > RECIPE_VERSION:
            raise UserError(
                f"recipe version {version} was written by a newer ditkit (this one reads up to "
                f"{RECIPE_VERSION}); upgrade ditkit"
            )
        _known_keys(data, {"version", "model", "process", "latents", "conditioning"}, "recipe")
        process = dict(data.get("process") or {"kind": "diffusion"})
        kind = process.pop("kind", "diffusion")
        if kind not in PROCESSES:
            raise UserError(f"recipe: unknown process kind {kind!r}; choose one of {', '.join(PROCESSES)}")
        conditioning = dict(data.get("conditioning") or {})
        if conditioning.get("classes") is not None:
            conditioning["classes"] = tuple(conditioning["classes"])
        return cls(
            model=DiTConfig.from_dict(data.get("model")),
            process=_build(PROCESSES[kind], process, "process"),
            latents=_build(LatentSpace, dict(data.get("latents") or {}), "latents"),
            conditioning=_build(Conditioning, conditioning, "conditioning"),
            version=RECIPE_VERSION,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "recipe") -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"{where}: the stored recipe is not valid JSON") from None
        return cls.from_dict(data)

    # --- changes

    def replace(self, **parts: Any) -> Recipe:
        """A copy with whole parts replaced (`model=`, `process=`, `latents=`, `conditioning=`)."""
        return dataclasses.replace(self, **parts)

    def get(self, path: str) -> Any:
        """A field by its dotted path, e.g. `process.noise_schedule`, `latents.vae`, `model.num_classes`."""
        part, name = _split(path)
        return getattr(getattr(self, part), name)

    def override(self, path: str, value: Any, flag: str | None = None, *, conflict: bool = False) -> Recipe:
        """A copy with one field changed by a command-line flag.

        `conflict=True` marks a field the weights depend on (model size, classes, the objective...): a value
        that differs from the recorded one is refused with one line naming the flag, both values and the fix.
        Otherwise the flag wins (e.g. a VAE found at another local path).
        """
        part, name = _split(path)
        current = getattr(getattr(self, part), name)
        if value is None or value == current:
            return self
        if conflict:
            raise UserError(
                f"{flag or path} {value!r} conflicts with the checkpoint's recipe ({path} = {current!r}); "
                "drop the flag to use the recorded value"
            )
        new_part = dataclasses.replace(getattr(self, part), **{name: value})
        return dataclasses.replace(self, **{part: new_part})


def infer_recipe(model: DiTConfig, latents: LatentSpace | None = None, **process: Any) -> Recipe:
    """The recipe of a checkpoint that stores none (official `.pt`, train.py dicts, older ditkit files,
    diffusers folders): the authors' defaults — linear-β diffusion over 1000 steps, ε prediction — and the
    SD-VAE space for 4-channel models (pixels otherwise), unless `latents` says better."""
    if latents is None:
        latents = LatentSpace.sd_vae() if model.in_channels == 4 else LatentSpace()
    conditioning = Conditioning()
    if getattr(model, "is_text", False):  # PixArt-α-style captions (T5 features)
        conditioning = Conditioning(kind="text", max_tokens=model.max_tokens)
    return Recipe(model=model, process=DiffusionProcess(**process), latents=latents, conditioning=conditioning)


def parts_to_dict(latents: LatentSpace, conditioning: Conditioning) -> dict[str, Any]:
    """The two parts a latent store knows (its `manifest.json` key `recipe`), serialised as in a recipe."""
    cond = dataclasses.asdict(conditioning)
    if cond["classes"] is not None:
        cond["classes"] = list(cond["classes"])
    return {"version": RECIPE_VERSION, "latents": dataclasses.asdict(latents), "conditioning": cond}


def parts_from_dict(data: Any, where: str = "recipe") -> tuple[LatentSpace, Conditioning]:
    """Read back what `parts_to_dict` wrote (one line for anything malformed)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: the stored recipe part must be a JSON object")
    _known_keys(data, {"version", "latents", "conditioning"}, where)
    conditioning = dict(data.get("conditioning") or {})
    if conditioning.get("classes") is not None:
        conditioning["classes"] = tuple(conditioning["classes"])
    latents = _build(LatentSpace, dict(data.get("latents") or {}), "latents")
    cond = _build(Conditioning, conditioning, "conditioning")
    latents.validate()
    cond.validate()
    return latents, cond


# ----------------------------------------------------------------------------------------------- helpers


def _split(path: str) -> tuple[str, str]:
    part, _, name = path.partition(".")
    if part not in ("model", "process", "latents", "conditioning") or not name:
        raise ValueError(f"not a recipe field path: {path!r}")
    return part, name


def _known_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    _known_keys(data, names, f"recipe {where}")
    try:
        return cls(**data)
    except TypeError as err:  # a field of the wrong kind that the dataclass itself rejects
        raise UserError(f"recipe {where}: {err}") from None


def _positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"recipe: {name} must be a positive integer, got {value!r}")


def _choice(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise UserError(f"recipe: unknown {name} {value!r}; choose one of {shown}")
