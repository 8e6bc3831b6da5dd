"""`ditkit sample`: images from a DiT checkpoint, as a labelled grid or as an ADM `.npz` for evaluation.

    from ditkit.sample import SamplingPipeline, sample_grid
    pipe = SamplingPipeline(model=ditkit.load_model(path), vae=None, sampler="dpm-solver", num_steps=20,
                            cfg_scale=4.0)
    sample_grid(pipe, labels=[0, 1, 2], per_label=4, seed=0, out=Path("samples"), save_images=False)

`pipeline` (the SamplingPipeline and how it is loaded from a checkpoint; `Sampler` is its old name), `grid` (PNG),
`npz` (resumable ADM batches over GPUs), `options` (SampleOptions: every flag's default once), `cli` (the verb).
"""

from ditkit.sample.cli import OFFICIAL_LABELS, add_arguments, run
from ditkit.sample.grid import make_grid, sample_grid
from ditkit.sample.npz import sample_npz, shard_labels, shard_path
from ditkit.sample.pipeline import DEFAULT_STEPS, Sampler, SamplingPipeline, load_for_sampling

__all__ = [
    "DEFAULT_STEPS",
    "OFFICIAL_LABELS",
    "Sampler",
    "SamplingPipeline",
    "add_arguments",
    "load_for_sampling",
    "make_grid",
    "run",
    "sample_grid",
    "sample_npz",
    "shard_labels",
    "shard_path",
]
