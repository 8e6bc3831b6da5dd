"""The table of objectives: the seam between a recipe's process and the code that trains and samples it.

An objective is one module (`ditkit.diffusion.objective`, `ditkit.transport.objective`) and one entry here. The
entry names its recipe process class, its builder `build(recipe) -> Objective` (training loss and samplers, see
`ditkit.objective.Objective`), the `ditkit train` flags it owns, how those flags become its process, its
sampler table (name -> default steps) and the cheap sampler that in-training grids and the demo use. Every list
of objectives or samplers in ditkit (`--objective`, `--sampler`, their help, the demo's choices) is read from
here. `register_objective` adds one from outside the package as well.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ditkit.diffusion import objective as diffusion
from ditkit.objective import Objective
from ditkit.recipe import PROCESSES, DiffusionProcess, FlowProcess, MeanFlowProcess, Recipe
from ditkit.runtime.errors import UserError
from ditkit.transport import meanflow
from ditkit.transport import objective as flow

__all__ = ["OBJECTIVES", "Objective", "ObjectiveEntry", "objective_for", "register_objective", "sampler_names"]


@dataclass(frozen=True)
class ObjectiveEntry:
    """One objective: its process class, builder, flags, samplers and preview sampler.

    `flags`: `TrainOptions` field -> the value meaning "not given"; a given one on another objective is refused.
    `process_from_flags(opts)`: the checked recipe process. `samplers()`: name -> default steps (first: default).
    `preview`: (sampler, steps) for in-training grids and the demo (about 20 network evaluations).
    """

    name: str
    process: type
    build: Callable[[Recipe], Objective]
    process_from_flags: Callable[[Any], Any]
    samplers: Callable[[], Mapping[str, int]]
    preview: tuple[str, int]
    help: str
    flags: Mapping[str, Any] = field(default_factory=dict)
    folds_guidance: bool = False  # guidance is trained into the model: its samplers run unguided by default
    model_config: Mapping[str, Any] = field(default_factory=dict)  # DiTConfig fields the objective needs


OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(entry: ObjectiveEntry) -> None:
    """Add an objective (and its process to the recipe's table, so its checkpoints read back)."""
    if entry.name in OBJECTIVES:
        raise ValueError(f"an objective named {entry.name!r} exists already")
    OBJECTIVES[entry.name] = entry
    PROCESSES[entry.name] = entry.process


register_objective(ObjectiveEntry(
    "diffusion", DiffusionProcess, diffusion.build, diffusion.process_from_flags, diffusion.default_steps,
    preview=("dpm-solver", 20), help="the authors' Gaussian diffusion (ε and learned Σ)",
    flags={"noise_schedule": "linear"}))
register_objective(ObjectiveEntry(
    "flow", FlowProcess, flow.build, flow.process_from_flags, lambda: flow.FLOW_SAMPLERS,
    preview=("heun", 10), help="SiT's flow matching (stochastic interpolants)",
    flags={name: None for name in flow.FLAGS}))
register_objective(ObjectiveEntry(
    "meanflow", MeanFlowProcess, meanflow.build, lambda opts: meanflow.process_from_options(opts, flow.FLAGS),
    lambda: meanflow.MEANFLOW_SAMPLERS, preview=("meanflow", 2),
    help="MeanFlow's average velocity, sampled in 1 or a few steps (docs/meanflow.md)", flags={"meanflow": None},
    folds_guidance=True, model_config={"interval_time": True}))


def entry_for(kind: str) -> ObjectiveEntry:
    """The table's entry for a process kind (one line when this ditkit has none)."""
    entry = OBJECTIVES.get(kind)
    if entry is None:
        raise UserError(f"this ditkit cannot train or sample a {kind!r} process yet; known: {', '.join(OBJECTIVES)}")
    return entry


def objective_for(recipe: Recipe) -> Objective:
    """The objective of `recipe.process` (one line when this ditkit has none for its kind)."""
    return entry_for(recipe.process.kind).build(recipe)


def process_from_flags(opts: Any) -> Any:
    """The recipe's process from `ditkit train`'s flags: one line for a flag another objective owns."""
    entry = entry_for(opts.objective)
    for other in OBJECTIVES.values():
        if other.name == entry.name:
            continue
        for name, unset in other.flags.items():
            if name not in entry.flags and getattr(opts, name, unset) != unset:
                raise UserError(f"--{name.replace('_', '-')} is a {other.name} setting; add --objective {other.name} "
                                f"(or drop it for --objective {entry.name})")
    return entry.process_from_flags(opts)


def sampler_names() -> tuple[str, ...]:
    """Every sampler name of every objective (the `--sampler` choices)."""
    return tuple(dict.fromkeys(name for entry in OBJECTIVES.values() for name in entry.samplers()))


def sampler_help() -> str:
    """The default steps of every sampler, by objective (the `--num-steps` help)."""
    return "; ".join(f"{e.name}: " + ", ".join(f"{s} {n}" for s, n in e.samplers().items())
                     for e in OBJECTIVES.values())
