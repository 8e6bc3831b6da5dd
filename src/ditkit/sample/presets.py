"""The papers' evaluation protocols as named presets: `ditkit sample --preset NAME`.

A preset sets every sampling setting that moves the reported FID (sampler, steps, guidance scale, guided
channels, guidance interval, time shift, number of samples, label distribution, seed, VAE, precision) exactly as
the authors' evaluation script did, and names its source (a paper table, or a file:line of the authors' code at
the commit given). Flags given explicitly win over the preset; each such override is printed and recorded in
the sample folder's settings.json, so that `ditkit evaluate` can warn that the protocol is no longer the paper's.

Time conventions: ditkit's flow time runs from noise (t = 0) to data (t = 1), as SiT's code. REPA's sampler runs
t from 1 (noise) to 0 (data), so its "guidance where t ≤ 0.7" is ditkit's interval [0.3, 1]. LightningDiT's
`timestep_shift` s maps t ↦ s·t / (1 + (s − 1)·t) on SiT's time; that is SD3's shift of the noise level by 1/s,
so its 0.3 is ditkit's `--time-shift` 1/0.3.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ditkit.runtime.errors import UserError

DIT = "facebookresearch/DiT@ed81ce2"
SIT = "willisma/SiT@947f95b"
REPA = "sihyun-yu/REPA@67f7145"
LDIT = "hustvl/LightningDiT@2725fed"
SD_VAE_EMA = "stabilityai/sd-vae-ft-ema"

# The flags a preset sets, by their argparse dest; the sampling fields of `Preset` carry the same names.
FIELDS = ("sampler", "num_steps", "cfg_scale", "guide_channels", "guidance_interval", "time_shift", "num_samples",
          "seed", "vae", "precision")


@dataclass(frozen=True)
class Preset:
    """One paper's evaluation protocol: what it samples with, what it expects the checkpoint to be, its figure."""

    name: str
    title: str
    # the checkpoint it applies to
    process: str  # "diffusion" | "flow"
    geometry: tuple[int, int, int]  # (depth, hidden size, patch size) of the model
    image_size: int  # pixels
    in_channels: int
    num_classes: int
    # the sampling settings (None: left to ditkit's default / the checkpoint)
    sampler: str
    num_steps: int
    cfg_scale: float
    guide_channels: str  # "3" or "all", as --guide-channels takes it
    guidance_interval: tuple[float, float] | None
    time_shift: float
    num_samples: int
    seed: int
    vae: str | None
    precision: str | None
    labels: str = "uniform"  # every authors' script draws torch.randint(0, num_classes) per sample
    reported: dict[str, float] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    # model-config switches the architecture needs, (attribute, value): LightningDiT's, as issue 26's knobs name them
    requires: tuple[tuple[str, Any], ...] = ()
    note: str = ""

    def settings(self) -> dict[str, Any]:
        """The flag values this preset sets (argparse dests → values as the parser would hold them)."""
        out = {name: getattr(self, name) for name in FIELDS}
        out["guidance_interval"] = list(self.guidance_interval) if self.guidance_interval else None
        return out


_DIT_COMMON = dict(
    process="diffusion", geometry=(28, 1152, 2), in_channels=4, num_classes=1000, sampler="ddpm", num_steps=250,
    cfg_scale=1.5, guide_channels="3", guidance_interval=None, time_shift=1.0, num_samples=50_000, seed=0,
    vae=SD_VAE_EMA, precision="tf32",
)
_DIT_SOURCES = (
    f"{DIT} sample_ddp.py:152 (--vae ema), :155 (--num-fid-samples 50_000), :158 (--cfg-scale 1.5), "
    ":159 (--num-sampling-steps 250), :160 (--global-seed 0), :161 (--tf32 on), :111 (labels torch.randint)",
    f"{DIT} models.py:262 (guidance on eps channels [:3])",
)
_SIT_COMMON = dict(
    process="flow", geometry=(28, 1152, 2), image_size=256, in_channels=4, num_classes=1000, cfg_scale=1.5,
    guide_channels="3", guidance_interval=None, time_shift=1.0, num_samples=50_000, seed=0, vae=SD_VAE_EMA,
    precision="tf32",
)
_SIT_SOURCES = (
    f"{SIT} sample_ddp.py:210 (--vae ema), :213 (--num-fid-samples 50_000), :218 (--global-seed 0), "
    ":219 (--tf32 on), :160 (labels torch.randint)",
    f"{SIT} models.py:261 (guidance on channels [:3])",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="dit-xl-2-256", title="DiT-XL/2 256×256, FID-50K 2.27", image_size=256, **_DIT_COMMON,
        reported={"fid": 2.27, "inception_score": 278.24},
        sources=(f"{DIT} README.md:65 (FID 2.27, IS 278.24)", *_DIT_SOURCES),
        note="the README (:139) reports 2.21 for the PyTorch port sampled in FP32"),
    Preset(
        name="dit-xl-2-512", title="DiT-XL/2 512×512, FID-50K 3.04", image_size=512, **_DIT_COMMON,
        reported={"fid": 3.04, "inception_score": 240.82},
        sources=(f"{DIT} README.md:66 (FID 3.04, IS 240.82)", *_DIT_SOURCES)),
    Preset(
        name="sit-xl-2-sde", title="SiT-XL/2 256×256, SDE (Euler–Maruyama 250), FID-50K 2.06", sampler="sde-euler",
        num_steps=250, **_SIT_COMMON, reported={"fid": 2.06},
        sources=(f"{SIT} README.md:55 (FID 2.06)", f"{SIT} sample_ddp.py:216-217 (--num-sampling-steps 250); "
                 "train_utils.py:24-31 (SDE: Euler, diffusion form sigma, norm 1, last step Mean of 0.04)",
                 "willisma/SiT issue #31 (the paper's figures use the SDE, not the ODE)", *_SIT_SOURCES),
        note="SiT's sample_ddp.py defaults to --cfg-scale 1.0 (:216); the 2.06 row is guided at 1.5"),
    Preset(
        name="sit-xl-2-ode", title="SiT-XL/2 256×256, ODE (Heun 125 steps = 250 NFE), FID-50K 2.15", sampler="heun",
        num_steps=125, **_SIT_COMMON, reported={"fid": 2.15},
        sources=("SiT paper (arXiv 2401.08740) Table 9: SiT-XL cfg 1.5 ODE 2.15, SDE 2.06",
                 "willisma/SiT issue #18 (the authors: Heun ODE, 125 steps, 250 NFE, cfg 1.5)", *_SIT_SOURCES)),
    Preset(
        name="repa-sit-xl-2", title="REPA SiT-XL/2 256×256, SDE 250, cfg 1.8 for t ≤ 0.7, FID-50K 1.42",
        process="flow", geometry=(28, 1152, 2), image_size=256, in_channels=4, num_classes=1000,
        sampler="sde-euler", num_steps=250, cfg_scale=1.8, guide_channels="all", guidance_interval=(0.3, 1.0),
        time_shift=1.0, num_samples=50_000, seed=0, vae=SD_VAE_EMA, precision="tf32", reported={"fid": 1.42},
        sources=(f"{REPA} README.md:22 (FID 1.42), :124-135 (--mode sde --num-steps 250 --cfg-scale 1.8 "
                 "--guidance-high 0.7)",
                 f"{REPA} generate.py:174 (--global-seed 0), :177 (--tf32 on), :193 (--vae ema), "
                 ":197 (--num-fid-samples 50_000), :122 (labels torch.randint)",
                 f"{REPA} samplers.py:122-123 (t from 1 to 0.04, then 0), :131 (guided where t ≤ 0.7), "
                 ":150-151 (guidance on every channel)"),
        note="REPA's t = 1 is noise: its t ≤ 0.7 is ditkit's flow t ≥ 0.3"),
    Preset(
        name="lightningdit-xl-1", title="LightningDiT-XL/1 + VA-VAE 256×256, 800 epochs, FID-50K 1.35",
        process="flow", geometry=(28, 1152, 1), image_size=256, in_channels=32, num_classes=1000,
        sampler="euler", num_steps=249, cfg_scale=6.7, guide_channels="3", guidance_interval=(0.125, 1.0),
        time_shift=1 / 0.3, num_samples=50_000, seed=0, vae=None, precision=None, reported={"fid": 1.35},
        requires=(("norm", "rmsnorm"), ("rope", True), ("mlp", "swiglu")),
        sources=(f"{LDIT} README.md:90 (FID 1.35 with cfg)",
                 f"{LDIT} configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml:59-60 (ODE euler), "
                 ":65 (250 grid points), :66 (cfg 6.7), :74 (50,000), :75 (cfg_interval_start 0.125), "
                 ":76 (timestep_shift 0.3), :37 (seed 0), :19 (VA-VAE f16d32)",
                 f"{LDIT} transport/integrators.py:94-101 (the grid and its shift), "
                 "models/lightningdit.py:432 (guidance on channels [:3]), :437-439 (no guidance for t < 0.125), "
                 "inference.py:203 (labels torch.randint)"),
        note="250 grid points are 249 Euler steps; the VA-VAE is the checkpoint's own (pass --vae)"),
)}


# ----------------------------------------------------------------------------------------------- the flags


class _Default:
    """Marks a parser default, so that a flag given explicitly (even with the default's value) is told apart."""


class _DefaultFloat(float, _Default):
    pass


class _DefaultInt(int, _Default):
    pass


class _DefaultStr(str, _Default):
    pass


def _marked(value: Any) -> Any:
    for kind, marker in ((bool, None), (float, _DefaultFloat), (int, _DefaultInt), (str, _DefaultStr)):
        if isinstance(value, kind):
            return value if marker is None else marker(value)
    return value  # None stays None: not given


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, and the defaults of the flags a preset sets marked as defaults (call after they are added)."""
    names = ", ".join(PRESETS)
    parser.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                        help=f"a paper's evaluation protocol ({names}); flags given explicitly override it "
                        "(printed, and recorded in settings.json); see docs/protocols_and_caching.md")
    parser.set_defaults(**{name: _marked(parser.get_default(name)) for name in FIELDS})


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the flag `name` (a dest) was given on the command line."""
    value = getattr(args, name, None)
    return value is not None and not isinstance(value, _Default)


def apply_preset(args: argparse.Namespace) -> list[str]:
    """Fill the flags of `args.preset` that were not given; returns the overridden ones as 'flag value (preset
    value)' lines (empty without a preset). `args` is changed in place."""
    preset = PRESETS.get(getattr(args, "preset", None) or "")
    if preset is None:
        return []
    overrides = []
    for name, value in preset.settings().items():
        if given(args, name):
            mine = getattr(args, name)
            if _normal(mine) != _normal(value):
                overrides.append(f"--{name.replace('_', '-')} {_show(mine)} (preset: {_show(value)})")
        elif value is not None:
            setattr(args, name, value)
    args.preset_overrides = overrides
    return overrides


def describe_preset(name: str, overrides: list[str]) -> str:
    """What `ditkit sample` prints for --preset: the protocol, its source, and the flags that override it."""
    preset = PRESETS[name]
    line = f"preset {name}: {preset.title} ({preset.sources[0]})"
    if overrides:
        line += "\nnote: overriding the preset (the score is then not the paper's protocol): " + "; ".join(overrides)
    return line


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return float(value)
    return None if value is None else str(value)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(f"{float(v):g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------- the checkpoint


def check_fits(preset_name: str | None, config: Any, process: str) -> None:
    """Refuse, in one line, a preset on a checkpoint of another kind (architecture, process, size, channels,
    classes, or a LightningDiT switch the model lacks)."""
    preset = PRESETS.get(preset_name or "")
    if preset is None:
        return
    depth, width, patch = preset.geometry
    found = []
    if (config.depth, config.hidden_size, config.patch_size) != (depth, width, patch):
        found.append(f"a {config.name} (depth {config.depth}, width {config.hidden_size}, patch {config.patch_size})")
    if process != preset.process:
        found.append(f"a {process} model")
    if config.in_channels != preset.in_channels:
        found.append(f"{config.in_channels} input channels")
    if getattr(config, "conditioning", "") == "text" or config.num_classes != preset.num_classes:
        found.append("a text model" if getattr(config, "conditioning", "") == "text"
                     else f"{config.num_classes} classes")
    missing = [f"{name} {value}" for name, value in preset.requires if getattr(config, name, None) != value]
    if missing:
        found.append(f"without {', '.join(missing)}")
    if found:
        raise UserError(f"--preset {preset.name} is for {preset.title.split(',')[0]} ({preset.process}, "
                        f"{preset.in_channels} channels, {preset.num_classes} classes); this checkpoint is "
                        f"{', '.join(found)}: drop --preset or use one of {', '.join(fitting(config, process))}")


def check_checkpoint(preset_name: str | None, found: Any, objective: str | None = None) -> None:
    """`check_fits` on a read checkpoint (`checkpoints.CheckpointFile`), before its VAE is loaded: its stored or
    inferred config, and its process (the recipe's; for a file that records none, --objective or the name's)."""
    if not preset_name:
        return
    from ditkit.weights.checkpoints import checkpoint_recipe, infer_config

    config = found.config or infer_config(found.state_dict)
    process = checkpoint_recipe(found, config).process.kind
    if found.recipe_json is None and objective is not None:
        process = objective
    check_fits(preset_name, config, process)


def check_image_size(preset_name: str | None, image_size: int) -> None:
    """A preset's resolution is part of its protocol: 256 and 512 are different presets."""
    preset = PRESETS.get(preset_name or "")
    if preset is not None and image_size != preset.image_size:
        raise UserError(f"--preset {preset.name} samples {preset.image_size}×{preset.image_size} but this model makes "
                        f"{image_size}×{image_size} images; use the preset of that resolution")


def fitting(config: Any, process: str) -> list[str]:
    """The presets whose checkpoint kind matches (names), or 'none' in a one-element list."""
    names = [p.name for p in PRESETS.values() if p.process == process and p.in_channels == config.in_channels
             and (config.depth, config.hidden_size, config.patch_size) == p.geometry]
    return names or ["none (no paper protocol for this model)"]


def for_settings(settings: dict[str, Any]) -> Preset | None:
    """The preset a sample folder's settings were made with, else the one whose checkpoint kind they match."""
    protocol = settings.get("protocol") or {}
    named = PRESETS.get(protocol.get("preset") or "")
    if named is not None:
        return named
    model, recipe = settings.get("model") or {}, settings.get("recipe") or {}
    process = (recipe.get("process") or {}).get("kind")
    size = protocol.get("image_size")
    for preset in PRESETS.values():
        geometry = (model.get("depth"), model.get("hidden_size"), model.get("patch_size"))
        if (geometry == preset.geometry and process == preset.process and size == preset.image_size
                and model.get("in_channels") == preset.in_channels):
            return preset
    return None


def as_dict(preset: Preset) -> dict[str, Any]:
    """A preset as JSON-ready data (for `ditkit sample --list-presets`-style listings and the docs)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(preset).items()}
