"""Shared builders for the tests, each written once (conftest.py exposes fixtures over them).

- models: tiny DiTs (`tiny_dit` and its presets), the `TINY` training overrides
- vae: tiny random AutoencoderKLs, saved or in memory
- images: generated images and an ImageFolder with odd sizes, modes and a corrupt file
- text: tiny T5 / CLIP text encoders with word-level tokenizers
- training: TrainOptions for tiny runs, training scripts for subprocesses, the SIGKILL-resume harness
- cli: `ditkit sample` argument parsing and in-process CLI runs
- inception: TinyInception, a random-weight stand-in for the FID Inception network
- references: closed-form Gaussian models (exact denoisers, flows) the samplers are checked against
- gpu_machine: run a benchmark script as on the GPU machine (without the packages it lacks)

Test modules import from here, never from one another (tests/test_structure.py checks it).
"""
