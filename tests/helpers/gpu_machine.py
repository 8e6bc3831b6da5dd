"""Run a benchmark script as on the GPU machine, which has torch and numpy but none of the packages below."""

from __future__ import annotations

from pathlib import Path

MISSING_ON_GPU_MACHINE = ("safetensors", "diffusers", "sklearn", "tqdm", "PIL", "tensorboard", "scipy",
                          "huggingface_hub")


def without_gpu_machine_missing_packages(script: Path) -> str:
    """Python source that makes importing those packages fail (a plain find_spec still answers) and then runs
    `script` as __main__ with the remaining command-line arguments, its folder first on sys.path as `python
    script` has it (benchmarks import their harness from there)."""
    return f"""
import importlib.abc, importlib.machinery, runpy, sys
class Missing(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError("not installed: " + module.__name__)
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU_MACHINE!r}:
            return importlib.machinery.ModuleSpec(name, Missing())
        return None
sys.meta_path.insert(0, Finder())
sys.argv[0] = {str(script)!r}
sys.path.insert(0, {str(script.parent)!r})  # as `python script.py` does: the script's folder first
runpy.run_path(sys.argv[0], run_name="__main__")
"""
