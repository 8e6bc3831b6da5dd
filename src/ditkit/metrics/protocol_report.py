"""What `ditkit evaluate` says besides the numbers: the samples' protocol, the reference batch, and warnings.

The protocol is read from the settings.json that `ditkit sample --num-samples` writes beside its .npz (none for
a folder of images from elsewhere: then it says so). The reference batch is named with its image count and
resolution; samples and reference of different resolutions are refused (FID across resolutions measures the
resize, not the model). A protocol that differs from its paper preset (the one it was sampled with, else the one
whose checkpoint kind it matches) in a setting that moves FID is named in a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ditkit.runtime.errors import UserError
from ditkit.sample.presets import PRESETS, Preset, for_settings


def find_settings(samples: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
    """settings.json beside an .npz (or inside a folder) of samples, read; (None, None) when there is none."""
    path = Path(samples)
    candidates = [path / "settings.json"] if path.is_dir() else [path.parent / "settings.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                return candidate, None
            return candidate, data if isinstance(data, dict) else None
    return None, None


def check_resolutions(samples: Any, reference: Any) -> None:
    """One line when the samples and the reference batch have different image sizes (both known)."""
    a, b = samples.resolution, reference.resolution
    if a is not None and b is not None and tuple(a) != tuple(b):
        raise UserError(f"the samples are {a[0]}×{a[1]} but the reference batch {Path(reference.source).name} is "
                        f"{b[0]}×{b[1]}; use the reference batch of the samples' resolution (ADM's "
                        f"VIRTUAL_imagenet{a[0]}_labeled.npz for ImageNet)")


def _sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """The recorded values, named as a preset's fields."""
    protocol = settings.get("protocol") or {}
    interval = settings.get("interval")
    return {
        "sampler": settings.get("sampler"),
        "num_steps": settings.get("num_steps"),
        "cfg_scale": settings.get("cfg_scale"),
        "guide_channels": None if settings.get("guide_channels") is None else str(settings["guide_channels"]),
        "guidance_interval": None if not interval else [float(v) for v in interval],
        "time_shift": settings.get("time_shift", 1.0),
        "num_samples": protocol.get("num_samples"),
        "seed": settings.get("seed"),
        "vae": settings.get("vae"),
        "precision": settings.get("precision"),
    }


def describe(settings: dict[str, Any], count: int = 0) -> list[str]:
    """The protocol as a few lines; `count` is the number of images evaluated (the file's, which wins over the
    recorded number: a folder extended to more samples keeps its smaller .npz too)."""
    s, protocol = _sampling(settings), settings.get("protocol") or {}
    model = settings.get("model") or {}
    kind = ((settings.get("recipe") or {}).get("process") or {}).get("kind", "?")
    size = protocol.get("image_size")
    cfg = s["cfg_scale"]
    guidance = "no guidance" if cfg in (None, 1, 1.0) else f"cfg {cfg:g} on {s['guide_channels']} channels"
    if s["guidance_interval"] and cfg not in (None, 1, 1.0):
        guidance += f" for t in [{s['guidance_interval'][0]:g}, {s['guidance_interval'][1]:g}]"
    name = _model_name(model)
    lines = [
        f"model {name} ({kind}){f', {size}×{size} px' if size else ''}, weights fingerprint {settings.get('weights')}",
        f"sampler {s['sampler']}, {s['num_steps']} steps, {guidance}, time shift {s['time_shift']:g}, "
        f"cache {settings.get('cache') or 'off'}",
        f"{count or protocol.get('num_samples', '?')} samples, labels {protocol.get('labels', 'not recorded')}, "
        f"seed {s['seed']}" + (f" (settings.json records a run of {protocol['num_samples']})"
                               if count and protocol.get("num_samples") not in (None, count) else ""),
        f"precision {s['precision']}, VAE {s['vae'] or 'none (pixels)'}"
        + (f" (decoder {protocol['decoder_dtype']})" if protocol.get("decoder_dtype") else ""),
    ]
    if protocol.get("preset"):
        overrides = protocol.get("preset_overrides") or []
        lines.append(f"preset {protocol['preset']}" + (f", overridden: {'; '.join(overrides)}" if overrides else ""))
    return lines


def _model_name(model: dict[str, Any]) -> str:
    """The paper's name of a recorded model config (DiT-XL/2), or a descriptive one."""
    from ditkit.models.config import DiTConfig

    try:
        return DiTConfig.from_dict(model).name
    except (UserError, TypeError, ValueError, KeyError, AttributeError):
        return f"d{model.get('depth')}w{model.get('hidden_size')}/{model.get('patch_size')}"


# The settings that move FID when they differ from the paper's, and why (the warning's reason).
_MOVES_FID = {
    "sampler": "another sampler", "num_steps": "another step count", "cfg_scale": "another guidance scale",
    "guide_channels": "guidance on other channels", "guidance_interval": "another guidance interval",
    "time_shift": "another time shift", "vae": "another VAE", "precision": "another precision",
}


def deviations(settings: dict[str, Any], count: int) -> tuple[Preset | None, list[str]]:
    """(the preset compared with, what differs from it that moves FID), from the settings and the image count."""
    preset = for_settings(settings)
    if preset is None:
        return None, []
    recorded, wanted = _sampling(settings), preset.settings()
    found = []
    for key, reason in _MOVES_FID.items():
        mine, theirs = recorded.get(key), wanted.get(key)
        if theirs is None:
            continue
        if _same(mine, theirs):
            continue
        found.append(f"{key} {_show(mine)} (preset {_show(theirs)}: {reason})")
    if count and count != preset.num_samples:
        found.append(f"{count} samples (preset {preset.num_samples}: FID is biased upwards for fewer)")
    if settings.get("cache"):
        found.append(f"cache {settings['cache']} (the paper ran every block at every step)")
    return preset, found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return str(a) == str(b)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{float(v):g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def report(samples_path: str, samples: Any, reference: Any | None) -> dict[str, Any]:
    """What evaluate records with the numbers: protocol, settings file, reference batch, warnings."""
    settings_path, settings = find_settings(samples_path)
    out: dict[str, Any] = {"settings_file": None if settings_path is None else str(settings_path)}
    out["samples_resolution"] = list(samples.resolution) if samples.resolution else None
    if reference is not None:
        out["reference"] = {"path": reference.source, "count": reference.count,
                            "resolution": list(reference.resolution) if reference.resolution else None}
    if settings is None:
        out["protocol"], out["warnings"] = None, []
        return out
    preset, warnings = deviations(settings, samples.count)
    out["protocol"] = {**_sampling(settings), **(settings.get("protocol") or {}), "cache": settings.get("cache")}
    out["protocol"]["num_samples"] = samples.count or out["protocol"].get("num_samples")
    out["protocol_lines"] = describe(settings, samples.count)
    out["preset_compared"] = None if preset is None else preset.name
    out["preset_reported"] = None if preset is None else dict(preset.reported)
    out["warnings"] = warnings
    return out


def print_report(info: dict[str, Any], file: Any) -> None:
    """The report as text lines (after the numbers)."""
    ref = info.get("reference")
    if ref is not None:
        res = ref["resolution"]
        what = f"{ref['count']} images, {res[0]}×{res[1]}" if ref["count"] and res else \
            "statistics only (mu/sigma): its resolution is not recorded"
        print(f"Reference batch: {ref['path']} ({what})", file=file)
    if info.get("protocol_lines"):
        print(f"Protocol ({info['settings_file']}):", file=file)
        for line in info["protocol_lines"]:
            print(f"  {line}", file=file)
    elif info.get("settings_file") is None:
        print("Protocol: not recorded (no settings.json beside the samples; sample with `ditkit sample "
              "--num-samples` to record it)", file=file)
    if info.get("preset_compared") and not info["warnings"]:
        reported = PRESETS[info["preset_compared"]].reported.get("fid")
        print(f"  matches preset {info['preset_compared']} (paper FID {reported})", file=file)
