"""The `ditkit` command line: one sub-command per pipeline stage.

Each verb lives in the module of its stage, which provides `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their verb runs, so `ditkit flops` does not pay for importing diffusers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ditkit.runtime.errors import UserError

# verb -> (module, one-line help). Keep in pipeline order.
VERBS: dict[str, tuple[str, str]] = {
    "flops": ("ditkit.models.flops", "parameters and Gflops of the DiT configs (paper convention)"),
    "extract": ("ditkit.data.extract", "encode an image folder once into a latent store (SD-VAE)"),
    "train": ("ditkit.train", "train a DiT (one CPU/GPU, or many GPUs under torchrun)"),
    "demo": ("ditkit.apps.demo", "train a small DiT on the built-in digits, sample a grid, print its quality"),
    "sample": ("ditkit.sample", "sample images from a checkpoint: a labelled grid, or an ADM .npz over GPUs"),
    "serve": ("ditkit.apps.serve",
              "a local web page (Gradio) to try models: classes or prompts, sampler, guidance, seed"),
    "evaluate": ("ditkit.metrics.evaluate", "FID, sFID, IS, precision/recall of samples, or the digits yardstick"),
    "convert": ("ditkit.weights.convert", "convert checkpoints to and from Hugging Face diffusers folders"),
    "scaling": ("ditkit.apps.scaling", "train several DiT configs on the digits; metric vs steps and vs Gflops (PNG)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, import just that verb's module (the others are listed, not loaded)."""
    parser = argparse.ArgumentParser(prog="ditkit", description="Diffusion Transformers: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        if only is not None and verb != only:
            sub.add_parser(verb, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=verb if verb in VERBS else None)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UserError as err:
        print(f"ditkit {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditkit {args.verb}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:  # under torchrun: another rank died or froze (one line, exit 1); else re-raised
        from ditkit.runtime.distributed import describe_peer_failure

        line = describe_peer_failure(err, args.verb)
        if line is None:
            raise
        print(f"ditkit {args.verb}: error: {line}", file=sys.stderr)
        # Exit now, skipping destructors: tearing down a process group whose collective never completed can
        # deadlock (gloo's worker thread waits for the GIL while the main thread joins it), so the process
        # would print its line and then hang instead of exiting.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    raise SystemExit(main())
