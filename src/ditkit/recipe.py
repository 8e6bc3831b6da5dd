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

from ditkit.models.config import DiTConfig
from ditkit.runtime import validate
from ditkit.runtime.errors import UserError
from ditkit.training_methods import TrainingMethods

RECIPE_VERSION = 2  # 2: flow t_mean/t_std/cosine_weight, latents mean/std, the sampling part, model knobs
# Fields of version 2, written only when they differ from their defaults: a recipe that uses none of them is
# written as version 1, byte for byte as before, and older ditkits still read it.
V2_PROCESS_DEFAULTS: dict[str, Any] = {"t_mean": 0.0, "t_std": 1.0, "cosine_weight": 0.0}
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
    t_mean: float = 0.0  # lognormal: t = sigmoid(N(t_mean, t_std²)) (LightningDiT: 0, 1)
    t_std: float = 1.0
    cosine_weight: float = 0.0  # velocity: + weight · mean(1 − cos(v̂, u_t)) over channels (LightningDiT: 1)

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
        _number(self.t_mean, "process.t_mean")
        _number(self.t_std, "process.t_std", low=0.0, open_low=True)
        _number(self.cosine_weight, "process.cosine_weight", low=0.0)
        if self.t_sampling != "lognormal" and (self.t_mean, self.t_std) != (0.0, 1.0):
            raise UserError(
                "recipe: process.t_mean / t_std apply to t_sampling lognormal only; add --t-sampling lognormal"
            )
        if self.cosine_weight and self.prediction != "velocity":
            raise UserError("recipe: process.cosine_weight (the velocity-direction loss) needs prediction velocity")


@dataclass(frozen=True)
class MeanFlowProcess:
    """MeanFlow (Geng et al. 2025): a network u(z, r, t) of the average velocity over [r, t] on the linear path
    z_t = (1 − t)·x + t·ε (t = 1 is noise), trained with u = v − (t − r)·du/dt. Defaults: the paper's ImageNet
    settings (zhuyu-cs/MeanFlow's flags): (r, t) logit-normal(−0.4, 1.0), 25 % of rows with r ≠ t, adaptive
    weight 1/(‖Δ‖² + 1e-3)^1; guidance folded into the target, ṽ = ω·v + κ·u(c) + (1 − ω − κ)·u(∅) for
    t in [guidance_low, guidance_high] (ω 1, κ 0: no guidance). The class dropout is the model's."""

    kind: ClassVar[str] = "meanflow"
    time_mu: float = -0.4
    time_sigma: float = 1.0
    ratio_r_neq_t: float = 0.25
    adaptive_p: float = 1.0
    adaptive_eps: float = 1e-3
    omega: float = 1.0
    kappa: float = 0.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UserError(f"recipe: process.{f.name} must be a finite number, got {value!r}")
        if not (self.time_sigma > 0 and self.adaptive_eps > 0 and self.adaptive_p >= 0):
            raise UserError("recipe: process.time_sigma and adaptive_eps must be > 0 and adaptive_p >= 0")
        if not 0 <= self.ratio_r_neq_t <= 1:
            raise UserError(f"recipe: process.ratio_r_neq_t must be in [0, 1], got {self.ratio_r_neq_t}")
        if not 0 <= self.guidance_low <= self.guidance_high <= 1:
            raise UserError("recipe: process.guidance_low <= guidance_high must lie in [0, 1]")


PROCESSES: dict[str, type] = {"diffusion": DiffusionProcess, "flow": FlowProcess, "meanflow": MeanFlowProcess}
Process = DiffusionProcess | FlowProcess | MeanFlowProcess


@dataclass(frozen=True)
class LatentSpace:
    """Pixels (`vae` None, `downsample` 1) or the latents of a VAE named by a Hugging Face id or a local path.

    Latents fed to the model are `(encode(x) - shift) * scale`, as diffusers' SD/SD3 pipelines use them, and
    then, when channel statistics are given (`mean`, `std`: of those scaled latents, as a latent store's manifest
    holds them; LightningDiT's latent_norm), `(· - mean_c) / std_c` per channel.
    The latent channels and side are the model's `in_channels` / `input_size` (recorded once, there).
    """

    vae: str | None = None
    scale: float = 1.0
    shift: float = 0.0
    downsample: int = 1
    mean: tuple[float, ...] | None = None  # per-channel statistics of the scaled latents (see above)
    std: tuple[float, ...] | None = None

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
        if (self.mean is None) != (self.std is None):
            raise UserError("recipe: latents.mean and latents.std go together; give both or neither")
        if self.mean is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                raise UserError("recipe: latents.mean and latents.std must have one value per latent channel each")
            for k, (m, s) in enumerate(zip(self.mean, self.std)):
                _number(m, f"latents.mean[{k}]")
                _number(s, f"latents.std[{k}]", low=0.0, open_low=True)

    def normalize(self, x: Any) -> Any:
        """Scaled VAE latents N×C×h×w (a tensor) → the model's units (identity without channel statistics)."""
        if self.mean is None:
            return x
        return (x - x.new_tensor(self.mean).view(1, -1, 1, 1)) / x.new_tensor(self.std).view(1, -1, 1, 1)

    def denormalize(self, x: Any) -> Any:
        """The model's units → scaled VAE latents, what the VAE's `decode` takes (inverse of `normalize`)."""
        if self.mean is None:
            return x
        return x * x.new_tensor(self.std).view(1, -1, 1, 1) + x.new_tensor(self.mean).view(1, -1, 1, 1)

    @classmethod
    def sd_vae(cls, name: str = SD_VAE) -> LatentSpace:
        """The SD-VAE space of the DiT paper: ×0.18215, factor 8."""
        return cls(vae=name, scale=SD_VAE_SCALE, shift=0.0, downsample=8)


@dataclass(frozen=True)
class SamplingDefaults:
    """How the model is best sampled, used by `ditkit sample` where its flag is not given (the flag wins).

    `time_shift`: flow samplers' timestep shift of the grid (SD3's convention, `transport.shifted_grid`: > 1 puts
    more steps at high noise; LightningDiT's `timestep_shift` s is 1/s here). `guidance_interval`: (lo, hi) where
    guidance is on (diffusion: timesteps 0..999; flow: t in 0..1, 1 = data), None = everywhere.
    """

    time_shift: float = 1.0
    guidance_interval: tuple[float, float] | None = None

    def validate(self) -> None:
        _number(self.time_shift, "sampling.time_shift", low=0.0, open_low=True)
        interval = self.guidance_interval
        if interval is not None:
            if len(interval) != 2:
                raise UserError(f"recipe: sampling.guidance_interval must be two numbers, got {interval!r}")
            for v in interval:
                _number(v, "sampling.guidance_interval", low=0.0)
            if interval[0] > interval[1]:
                raise UserError(f"recipe: sampling.guidance_interval needs lo <= hi, got {list(interval)}")


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
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    training: TrainingMethods = field(default_factory=TrainingMethods)  # REPA / TREAD (training_methods.py)

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
        self.sampling.validate()
        self.training.validate(self.model.depth)
        classes = self.conditioning.classes
        if classes is not None and len(classes) > self.model.num_classes:
            raise UserError(
                f"recipe: {len(classes)} class names but the model has num_classes {self.model.num_classes}"
            )

    # --- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        process = {"kind": self.process.kind, **dataclasses.asdict(self.process)}
        for name, default in V2_PROCESS_DEFAULTS.items():
            if process.get(name, default) == default:
                process.pop(name, None)
        conditioning = dataclasses.asdict(self.conditioning)
        if conditioning["classes"] is not None:
            conditioning["classes"] = list(conditioning["classes"])
        out = {
            "version": self.version,
            "model": self.model.to_dict(),
            "process": process,
            "latents": _latents_dict(self.latents),
            "conditioning": conditioning,
        }
        if self.sampling != SamplingDefaults():
            out["sampling"] = _sampling_dict(self.sampling)
        if not self.training.is_plain:  # written only when used: plain recipes keep their bytes
            out["training"] = self.training.to_dict()
        uses_v2 = ("sampling" in out or "training" in out or self.model.knobs or self.latents.mean is not None
                   or any(k in process for k in V2_PROCESS_DEFAULTS))
        out["version"] = min(self.version, RECIPE_VERSION if uses_v2 else 1)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Read a stored recipe; unknown keys, wrong types and newer versions get one line each."""
        if not isinstance(data, dict):
            raise UserError(f"recipe must be a JSON object, got {type(data).__name__}")
        validate.recipe_dict(data, where)  # types and bounds before any part is built
        version = data.get("version")
        if not isinstance(version, int) or version < 1:
            raise UserError(f"recipe: version must be a positive integer, got {version!r}")
        if version > RECIPE_VERSION:
            raise UserError(
                f"recipe version {version} was written by a newer ditkit (this one reads up to "
                f"{RECIPE_VERSION}); upgrade ditkit"
            )
        _known_keys(data, {"version", "model", "process", "latents", "conditioning", "sampling", "training"},
                    "recipe")
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
            latents=_build(LatentSpace, _latents_from(data.get("latents")), "latents"),
            conditioning=_build(Conditioning, conditioning, "conditioning"),
            version=RECIPE_VERSION,
            sampling=_build(SamplingDefaults, _sampling_from(data.get("sampling")), "sampling"),
            training=TrainingMethods.from_dict(data.get("training")),
        )

    @classmethod
    def from_json(cls, text: str, where: str = "recipe") -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"{where}: the stored recipe is not valid JSON") from None
        with validate.naming(where):
            return cls.from_dict(data, where)

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
    version = RECIPE_VERSION if latents.mean is not None else 1  # as Recipe.to_dict: v1 unless a v2 field is used
    return {"version": version, "latents": _latents_dict(latents), "conditioning": cond}


def parts_from_dict(data: Any, where: str = "recipe") -> tuple[LatentSpace, Conditioning]:
    """Read back what `parts_to_dict` wrote (one line for anything malformed)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: the stored recipe part must be a JSON object")
    _known_keys(data, {"version", "latents", "conditioning"}, where)
    validate.recipe_dict({"model": {}, **data}, where)
    conditioning = dict(data.get("conditioning") or {})
    if conditioning.get("classes") is not None:
        conditioning["classes"] = tuple(conditioning["classes"])
    latents = _build(LatentSpace, _latents_from(data.get("latents")), "latents")
    cond = _build(Conditioning, conditioning, "conditioning")
    latents.validate()
    cond.validate()
    return latents, cond


# ----------------------------------------------------------------------------------------------- helpers


def _split(path: str) -> tuple[str, str]:
    part, _, name = path.partition(".")
    if part not in ("model", "process", "latents", "conditioning", "sampling") or not name:
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


def _number(value: Any, name: str, low: float | None = None, open_low: bool = False) -> None:
    """A finite number (not a bool), at least `low` (above it when `open_low`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if open_low else '>='} {low:g}"
        raise UserError(f"recipe: {name} must be a finite number{bound}, got {value!r}")


def _latents_dict(latents: LatentSpace) -> dict[str, Any]:
    """LatentSpace as stored: mean/std as lists, and left out when absent (files read as before they existed)."""
    data = dataclasses.asdict(latents)
    for name in ("mean", "std"):
        if data[name] is None:
            del data[name]
        else:
            data[name] = list(data[name])
    return data


def _latents_from(data: Any) -> dict[str, Any]:
    data = dict(data or {})
    for name in ("mean", "std"):
        if isinstance(data.get(name), list):
            data[name] = tuple(data[name])
    return data


def _sampling_dict(sampling: SamplingDefaults) -> dict[str, Any]:
    data = dataclasses.asdict(sampling)
    if data["guidance_interval"] is not None:
        data["guidance_interval"] = list(data["guidance_interval"])
    return data


def _sampling_from(data: Any) -> dict[str, Any]:
    data = dict(data or {})  # recipes of version 1 have no sampling part: the defaults (no shift, guide everywhere)
    if isinstance(data.get("guidance_interval"), list):
        data["guidance_interval"] = tuple(data["guidance_interval"])
    return data
