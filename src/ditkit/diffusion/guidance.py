"""Classifier-free guidance, kept importable under its earlier name: the formula lives in `ditkit.models.guidance`
(models use it in `forward_with_cfg`, the samplers through `guided`; the models' layer is below both)."""

from ditkit.models.guidance import cfg_halves, cfg_mix, guided, guided_captions

__all__ = ["cfg_halves", "cfg_mix", "guided", "guided_captions"]
