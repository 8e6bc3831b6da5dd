"""`ditkit serve`: a local web page (Gradio) to try ditkit models: pick classes or type prompts, set the sampler,
guidance and seed, and see the samples.

    ditkit serve                                  # the demo models `make demo` left in results/
    ditkit serve --ckpt run/checkpoints/0100000 --ckpt SiT.safetensors --port 7860

Every request runs `ditkit sample`'s own code: its flags are parsed by the sample parser, the sampler is the one
`load_for_sampling` built for the checkpoint with those settings, and the images are written by `sample_grid` (or
`prompt_grid`), so the page shows exactly the pixels the downloadable command line writes (same seed, same
device). One request samples at a time (one queue for every model on the page); bad input gets a one-line
message in the page. Nothing leaves the machine: Gradio's analytics are off, no share link, system fonts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditkit.objectives import entry_for
from ditkit.runtime.errors import UserError
from ditkit.runtime.seeding import MAX_SEED
from ditkit.sample.options import TRAINING_TIMESTEPS
from ditkit.sample.pipeline import SamplingPipeline

DEMO_RUNS = ("results/demo", "results/demo-flow", "results/demo_text")
MAKE_DEMOS = ("no models to serve: pass --ckpt PATH, or make the demo models first: `make demo` (results/demo), "
              "`ditkit demo --objective flow` (results/demo-flow), `ditkit demo --text` (results/demo_text)")
MAX_STEPS = 1000  # the page's cap on sampling steps (a CLI run may take more)
KEPT_REQUESTS = 8  # request folders kept on disk (the page shows the latest; older ones are removed)
# The page's CSS: tiny (8×8) samples are shown as sharp squares, not blurred by the browser's scaling.
PAGE_CSS = ".ditkit-gallery img { image-rendering: pixelated; }"


# ----------------------------------------------------------------------------------------------- the models


@dataclass
class Defaults:
    """The settings a model's page opens with."""

    sampler: str
    num_steps: int
    cfg_scale: float
    guide_channels: str = "3"


@dataclass
class Served:
    """One model on the page: its loaded sampler (base settings), what its controls offer, and how the same
    images are made with `ditkit sample` (`flags`: the loading flags; `ckpt` None: no command reproduces it)."""

    name: str
    base: SamplingPipeline
    defaults: Defaults
    class_names: list[str] | None = None  # class models: label k's name
    encoder: Any | None = None  # text models: prompts -> (features, mask)
    ckpt: str | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.base.recipe.process.kind

    @property
    def is_text(self) -> bool:
        return self.encoder is not None

    @property
    def samplers(self) -> tuple[str, ...]:
        return self.base.objective.samplers

    def default_steps(self, sampler: str) -> int:
        return int(self.base.objective.default_steps.get(sampler, 0))

    def has_null_label(self) -> bool:
        model = self.base.model
        return model.config.is_text or model.y_embedder.embedding_table.num_embeddings > model.config.num_classes


def newest_checkpoint(path: Path) -> Path:
    """A run folder (RESULTS with checkpoints/STEP/) as its newest complete checkpoint; other paths as given."""
    from ditkit.train.checkpoint import list_checkpoints

    if path.is_dir() and (path / "checkpoints").is_dir():
        done = [p for p in list_checkpoints(path / "checkpoints") if (p / "ema.safetensors").is_file()]
        if not done:
            raise UserError(f"{path} holds no finished checkpoint yet (checkpoints/STEP/ema.safetensors)")
        return done[-1]
    return path


def demo_paths(root: Path = Path(".")) -> list[Path]:
    """The demo models present under `root` (class, flow, text), in that order."""
    from ditkit.apps import demo_text
    found = []
    for run in DEMO_RUNS:
        folder = root / run
        if (folder / demo_text.WEIGHTS).is_file():
            found.append(folder / demo_text.WEIGHTS)
        elif (folder / "checkpoints").is_dir():
            try:
                found.append(newest_checkpoint(folder))
            except UserError:  # a demo still training its first checkpoint: not served
                continue
    return found


def imagenet_names() -> list[str] | None:
    """ImageNet-1k's class names in label order: the list Gradio ships with its examples (none is fetched)."""
    try:
        import gradio
    except ImportError:
        return None
    path = Path(gradio.__file__).parent / "media_assets" / "data" / "imagenet_labels.json"
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and len(names) == 1000 else None


def _is_digits_run(ckpt: Path) -> bool:
    """Whether the run folder above a checkpoint trained on the built-in digits (its options.json)."""
    for folder in list(ckpt.resolve().parents)[:3]:
        options = folder / "options.json"
        if options.is_file():
            try:
                return json.loads(options.read_text(encoding="utf-8")).get("data_path") == "digits"
            except (OSError, ValueError):
                return False
    return False


def class_names(recipe: Any, ckpt: Path) -> list[str]:
    """What the class picker shows for each label: "digit k" for a run on the built-in digits, else "k: NAME"
    with the recipe's label map or, for 1000 classes, ImageNet's names, else "class k"."""
    n = recipe.model.num_classes
    if n == 10 and _is_digits_run(ckpt):
        return [f"digit {k}" for k in range(10)]
    names = list(recipe.conditioning.classes or ()) or (imagenet_names() if n == 1000 else None) or []
    return [f"{k}: {names[k]}" if k < len(names) and names[k] != str(k) else f"class {k}" for k in range(n)]


def sample_namespace(ckpt: str, flags: list[str], argv: list[str] = ()) -> argparse.Namespace:
    """`ditkit sample`'s arguments for `--ckpt CKPT FLAGS ARGV`, parsed by its own parser (defaults included)."""
    from ditkit.sample.cli import add_arguments

    parser = argparse.ArgumentParser(prog="ditkit sample", add_help=False, exit_on_error=False)
    add_arguments(parser)
    try:
        return parser.parse_args(["--ckpt", ckpt, *flags, *argv])
    except (argparse.ArgumentError, SystemExit) as err:
        raise UserError(f"bad settings: {err}") from None


def _cheapest(objective: Any) -> tuple[str, int]:
    """The sampler with the fewest network evaluations at its default steps (adaptive ones excluded)."""
    costs = {s: objective.evaluations(s, n, 1.0, None) for s, n in objective.default_steps.items()}
    name = min((s for s in costs if costs[s] > 0), key=lambda s: costs[s])
    return name, int(objective.default_steps[name])


def load_served(path: Path, args: argparse.Namespace, device: torch.device, demo: bool) -> Served:
    """Load one checkpoint as `ditkit sample` would (the text demo's weights as `ditkit demo --text` does)."""
    from ditkit.apps import demo_text
    from ditkit.apps.demo import DEMO_CFG
    from ditkit.sample.pipeline import load_for_sampling

    if path.name == demo_text.WEIGHTS:
        return load_text_demo(path, device)
    flags = [f for name, value in (("--vae", args.vae), ("--text-encoder", args.text_encoder),
                                   ("--device", args.device)) if value for f in (name, value)]
    ckpt = str(newest_checkpoint(path))
    ns = sample_namespace(ckpt, flags, ["--no-progress"])
    base = load_for_sampling(ns, device)
    sampler, steps = _cheapest(base.objective)
    entry = entry_for(base.recipe.process.kind)
    if demo:  # the demo's own settings (demo.py): the objective's preview sampler (DPM-Solver++ 20, Heun 10, ...)
        sampler, steps = entry.preview
    cfg = DEMO_CFG if demo and not entry.folds_guidance else base.cfg_scale
    defaults = Defaults(sampler, steps, cfg, "all" if demo else "3")
    name = f"{Path(ckpt).parent.parent.name}/{Path(ckpt).name}" if demo else ckpt
    if base.model.config.is_text:
        from ditkit.sample.prompts import load_encoder_for

        return Served(name, base, defaults, encoder=load_encoder_for(base, ns), ckpt=ckpt, flags=flags)
    return Served(name, base, defaults, class_names=class_names(base.recipe, Path(ckpt)), ckpt=ckpt, flags=flags)


class DemoWords:
    """The text demo's encoder for the page: prompts in the colour digits' words -> (word ids, mask)."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from ditkit.data import colour_digits as cd

        try:
            return cd.tokenize(prompts)
        except ValueError:
            words = " ".join(w for w in cd.VOCAB if w != "<pad>")
            raise UserError(f"the text demo knows only these words (at most {cd.MAX_WORDS} a prompt): {words}; "
                            f"e.g. \"{cd.caption(7, 0, 2)}\"") from None


def load_text_demo(path: Path, device: torch.device) -> Served:
    """The text demo model (its word encoder inside), sampled as `ditkit demo --text` samples it."""
    from safetensors.torch import load_file

    from ditkit.apps import demo_text
    from ditkit.data import colour_digits as cd
    from ditkit.models.config import DiTConfig
    from ditkit.recipe import LatentSpace, infer_recipe

    config = DiTConfig(**demo_text.DEMO_CONFIG)
    model = demo_text.EncodedTextModel(config, len(cd.VOCAB))
    try:
        model.load_state_dict(load_file(str(path), device="cpu"))
    except (OSError, RuntimeError) as err:
        raise UserError(f"{path}: not the text demo's weights ({err}); run `ditkit demo --text` again") from None
    recipe = infer_recipe(config, LatentSpace(), prediction=demo_text.DEMO_PREDICTION)
    base = SamplingPipeline(model=model.eval().to(device), vae=None, device=device, recipe=recipe)
    return Served(f"{path.parent.name} (text demo)", base, Defaults("dpm-solver", 20, demo_text.DEMO_CFG, "all"),
                  encoder=DemoWords())


def load_all(args: argparse.Namespace, device: torch.device) -> list[Served]:
    """The models to serve: --ckpt's, else the demo models in results/ (one line saying how to make them)."""
    paths = [Path(p) for p in args.ckpt or []]
    demo = not paths
    if demo:
        paths = demo_paths()
        if not paths:
            raise UserError(MAKE_DEMOS)
    for p in paths:
        if not p.exists():
            raise UserError(f"--ckpt {p}: no such file or folder")
    return [load_served(p, args, device, demo) for p in paths]


# ----------------------------------------------------------------------------------------------- a request


@dataclass
class Request:
    """What the page asks for; `sample_flags()` says it as `ditkit sample` flags."""

    classes: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative: str | None = None
    sampler: str = "ddpm"
    num_steps: int = 250
    cfg_scale: float = 1.0
    guide_channels: str = "3"
    interval: tuple[float, float] | None = None
    time_shift: float = 1.0
    seed: int = 0
    per_label: int = 1

    def sample_flags(self) -> list[str]:
        """The request as `ditkit sample` flags (the ones a checkpoint's loading needs are added by the caller)."""
        argv = ["--per-label", str(self.per_label), "--sampler", self.sampler, "--num-steps", str(self.num_steps),
                "--cfg-scale", f"{self.cfg_scale:g}", "--guide-channels", self.guide_channels,
                "--seed", str(self.seed)]
        if self.interval is not None:
            argv += ["--guidance-interval", f"{self.interval[0]:g}", f"{self.interval[1]:g}"]
        if self.time_shift != 1.0:
            argv += ["--time-shift", f"{self.time_shift:g}"]
        if self.prompts:
            argv += [f for p in self.prompts for f in ("--prompt", p)]
            argv += ["--negative-prompt", self.negative] if self.negative else []
        else:
            argv += ["--class-labels", *map(str, self.classes)]
        return argv


def _number(value: Any, name: str, integer: bool = False) -> float:
    """A page field as a finite number (an integer when asked), or one line naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (integer and number != int(number)):
        raise UserError(f"{name} must be a finite {'whole ' if integer else ''}number, got {value!r}")
    return number


def check_request(served: Served, req: Request, max_images: int) -> None:
    """The request's values against what the model and the page allow: one line for the first bad one."""
    if not 0 <= req.seed <= MAX_SEED:
        raise UserError(f"seed must be in 0..{MAX_SEED}, got {req.seed}")
    if req.per_label < 1:
        raise UserError(f"images per {'prompt' if served.is_text else 'class'} must be at least 1, got {req.per_label}")
    rows = len(req.prompts) if served.is_text else len(req.classes)
    if rows == 0:
        raise UserError("type a prompt (one a line)" if served.is_text else "pick at least one class")
    if rows * req.per_label > max_images:
        raise UserError(f"{rows} × {req.per_label} = {rows * req.per_label} images; this page makes at most "
                        f"{max_images} a request (ditkit serve --max-images)")
    n = served.base.model.config.num_classes
    bad = [y for y in req.classes if not 0 <= y < n]
    if bad:
        raise UserError(f"class label {bad[0]} is out of range: this model has classes 0..{n - 1}")
    served.base.objective.check_sampler(req.sampler, req.num_steps)  # the sampler's name and its step count
    if req.num_steps > MAX_STEPS:
        raise UserError(f"steps must be at most {MAX_STEPS} on this page, got {req.num_steps}")
    if not 0 <= req.cfg_scale <= 100:
        raise UserError(f"guidance scale must be in 0..100 (1 = no guidance), got {req.cfg_scale:g}")
    if req.cfg_scale != 1.0 and not served.has_null_label():
        raise UserError("this model was trained without label dropout, so it has no null label; set guidance to 1")
    if req.interval is not None:
        top = 1.0 if served.kind == "flow" else TRAINING_TIMESTEPS - 1
        lo, hi = req.interval
        if not 0 <= lo <= hi <= top:
            raise UserError(f"the guidance interval takes two times in 0..{top:g}, low <= high; got {lo:g} {hi:g}")
    if req.time_shift != 1.0 and (served.kind != "flow" or not req.time_shift > 0):
        raise UserError(f"time shift {req.time_shift:g} applies to flow models only and must be > 0")


def command_line(served: Served, req: Request, out: str = "samples") -> str | None:
    """The `ditkit sample` command that writes these images (None where no checkpoint reproduces them)."""
    if served.ckpt is None:
        return None
    argv = ["ditkit", "sample", "--ckpt", served.ckpt, *served.flags, *req.sample_flags(), "--save-images",
            "--out", out]
    return shlex.join(argv)


def configured(served: Served, req: Request) -> SamplingPipeline:
    """The sampler for a request: for a checkpoint, `ditkit sample`'s own one for these flags (its parser and
    `load_for_sampling`'s settings), on the loaded model."""
    if served.ckpt is None:
        return dataclasses.replace(served.base, sampler=req.sampler, num_steps=req.num_steps, cfg_scale=req.cfg_scale,
                                   guide_channels="all" if req.guide_channels == "all" else int(req.guide_channels),
                                   interval=req.interval, time_shift=req.time_shift, progress=True)
    ns = sample_namespace(served.ckpt, served.flags, req.sample_flags())
    return dataclasses.replace(
        served.base, sampler=ns.sampler, num_steps=ns.num_steps,
        cfg_scale=served.base.cfg_scale if ns.cfg_scale is None else float(ns.cfg_scale),
        guide_channels="all" if ns.guide_channels == "all" else int(ns.guide_channels),
        interval=tuple(ns.guidance_interval) if ns.guidance_interval else served.base.interval, eta=ns.eta,
        time_shift=served.base.time_shift if ns.time_shift is None else float(ns.time_shift),  # recipe defaults
        progress=True, negative=None)


def generate(served: Served, req: Request, out: Path) -> tuple[Path, list[Path]]:
    """Sample the request into OUT (grid.png, images/*.png) with `ditkit sample`'s writers; returns the grid and
    the images in grid order."""
    from ditkit.sample.grid import sample_grid
    from ditkit.sample.prompts import prompt_grid, with_negative

    sampler = configured(served, req)
    if served.is_text:
        with_negative(sampler, served.encoder, req.negative)
        grid = prompt_grid(sampler, served.encoder, req.prompts, req.per_label, req.seed, out, save_images=True)
    else:
        grid = sample_grid(sampler, req.classes, req.per_label, req.seed, out, save_images=True)
    return grid, sorted((out / "images").glob("*.png"))


# ----------------------------------------------------------------------------------------------- the page


def _request_from_page(served: Served, values: dict[str, Any]) -> Request:
    """The page's field values as a Request (numbers checked to be numbers; ranges by `check_request`)."""
    seed = values["seed"]
    if values["randomise"]:
        seed = random.SystemRandom().randint(0, MAX_SEED)
    interval = None
    if values["use_interval"]:
        interval = (_number(values["lo"], "interval low"), _number(values["hi"], "interval high"))
    if served.is_text:
        prompts = [line.strip() for line in str(values["prompts"] or "").splitlines() if line.strip()]
        classes: list[int] = []
    else:
        prompts = []
        classes = [int(_number(c, "class", True)) for c in values["classes"] or []]  # the picker's values: labels
    return Request(
        classes=classes, prompts=prompts, negative=(values.get("negative") or "").strip() or None,
        sampler=str(values["sampler"]), num_steps=int(_number(values["steps"], "steps", True)),
        cfg_scale=_number(values["cfg"], "guidance scale"), guide_channels=str(values["channels"]),
        interval=interval, time_shift=_number(values.get("shift", 1.0), "time shift"),
        seed=int(_number(seed, "seed", True)), per_label=int(_number(values["per_label"], "images", True)))


class Requests:
    """Per-request output folders under one root (removed at exit); only the newest few are kept."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ditkit-serve-"))
        self.count = 0

    def new(self) -> Path:
        self.count += 1
        old = self.root / f"{self.count - KEPT_REQUESTS:06d}"
        shutil.rmtree(old, ignore_errors=True)
        folder = self.root / f"{self.count:06d}"
        folder.mkdir()
        return folder

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def handler(served: Served, requests: Requests, max_images: int):
    """The page's generate function for one model: (field values...) -> (gallery, grid, files, command, seed)."""
    import gradio as gr

    keys = ["classes", "prompts", "negative", "sampler", "steps", "cfg", "channels", "use_interval", "lo", "hi",
            "shift", "seed", "randomise", "per_label"]

    def run(*values: Any, progress: Any = gr.Progress(track_tqdm=True)) -> tuple:  # noqa: B008 (Gradio's idiom)
        try:
            req = _request_from_page(served, dict(zip(keys, values)))
            check_request(served, req, max_images)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        out = requests.new()
        progress(0, desc="sampling")
        grid, images = generate(served, req, out)
        command = command_line(served, req) or ("the text demo model is not a `ditkit sample` checkpoint: "
                                                "`ditkit demo --text` samples it with these settings")
        (out / "command.txt").write_text(command + "\n", encoding="utf-8")
        captions = _captions(served, req)
        gallery = [(str(p), c) for p, c in zip(images, captions)]
        return gallery, str(grid), [str(grid), str(out / "command.txt")], command, req.seed

    return keys, run


def _captions(served: Served, req: Request) -> list[str]:
    if served.is_text:
        return [p for p in req.prompts for _ in range(req.per_label)]
    names = served.class_names or []
    return [names[y] if y < len(names) else str(y) for y in req.classes for _ in range(req.per_label)]


def describe(served: Served) -> str:
    """The model's line at the top of its tab."""
    config, recipe = served.base.model.config, served.base.recipe
    what = "text" if served.is_text else f"{config.num_classes} classes"
    space = "pixels" if recipe.latents.is_pixels else f"latents of {recipe.latents.vae}"
    params = sum(p.numel() for p in served.base.model.parameters()) / 1e6
    return (f"**{served.name}**: {config.name}, {params:.1f}M parameters, {recipe.process.kind} model, {what}, "
            f"{config.input_size}×{config.input_size} {space}, on {served.base.device}")


def model_tab(gr: Any, served: Served, requests: Requests, max_images: int, index: int = 0) -> None:
    """The controls of one model (what its recipe allows), the outputs, and the generate event. Element ids
    (what tests and scripts find) are the names below, with "-INDEX" from the second tab on."""
    d = served.defaults

    def eid(name: str) -> str:
        return name if index == 0 else f"{name}-{index}"

    gr.Markdown(describe(served))
    with gr.Row():
        with gr.Column(scale=1):
            if served.is_text:
                classes = gr.State([])
                prompts = gr.Textbox(label="prompts (one a line: one grid row each)", lines=3,
                                     value=_example_prompt(served), elem_id=eid("prompts"))
                negative = gr.Textbox(label="negative prompt (guide away from it; empty: the null caption)")
            else:
                choices = list(zip(served.class_names or [], range(served.base.model.config.num_classes)))
                classes = gr.Dropdown(choices, value=list(range(min(len(choices), 4))), multiselect=True,
                                      label="classes (one grid row each)", elem_id=eid("classes"))
                prompts, negative = gr.State(""), gr.State("")
            sampler = gr.Dropdown(list(served.samplers), value=d.sampler, label="sampler", elem_id=eid("sampler"))
            steps = gr.Number(d.num_steps, label="steps", precision=0, elem_id=eid("steps"))
            cfg = gr.Slider(0, 10, value=d.cfg_scale, step=0.1, label="guidance scale (1 = none)", elem_id=eid("cfg"))
            channels = gr.Radio(["3", "all"], value=d.guide_channels, label="guided channels")
            top = 1.0 if served.kind == "flow" else TRAINING_TIMESTEPS - 1
            use_interval = gr.Checkbox(False, label=f"guide only for t in an interval (0..{top:g})")
            with gr.Row():
                lo = gr.Number(0, label="from t")
                hi = gr.Number(top, label="to t")
            shift = gr.Number(1.0, label="time shift (flow)", visible=served.kind == "flow")
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0, elem_id=eid("seed"))
                randomise = gr.Checkbox(False, label="randomise", elem_id=eid("randomise"))
            per_label = gr.Slider(1, 16, value=4, step=1, label="images per row", elem_id=eid("per_label"))
            button = gr.Button("Generate", variant="primary", elem_id=eid("generate"))
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="samples", columns=6, format="png", elem_id=eid("gallery"),
                                 elem_classes=["ditkit-gallery"], object_fit="contain", height=260)
            grid = gr.Image(label="grid", type="filepath", format="png", elem_id=eid("grid"),
                            elem_classes=["ditkit-gallery"])
            command = gr.Textbox(label="the same images with ditkit sample", elem_id=eid("command"), lines=2)
            files = gr.File(label="downloads: grid and command", file_count="multiple", elem_id=eid("files"))
    keys, run = handler(served, requests, max_images)
    fields = dict(classes=classes, prompts=prompts, negative=negative, sampler=sampler, steps=steps, cfg=cfg,
                  channels=channels, use_interval=use_interval, lo=lo, hi=hi, shift=shift, seed=seed,
                  randomise=randomise, per_label=per_label)
    sampler.change(lambda s: served.default_steps(s), inputs=sampler, outputs=steps, queue=False)
    button.click(run, inputs=[fields[k] for k in keys], outputs=[gallery, grid, files, command, seed],
                 concurrency_id="sample", concurrency_limit=1)


def _example_prompt(served: Served) -> str:
    if isinstance(served.encoder, DemoWords):
        from ditkit.data import colour_digits as cd

        return "\n".join([cd.caption(7, 0, 2), cd.caption(3, 4, 1)])
    return "a photo of a cat"


def build_page(models: list[Served], requests: Requests, max_images: int) -> Any:
    """The Gradio Blocks: one tab per model (no tabs for one), one shared queue slot for sampling."""
    import gradio as gr

    with gr.Blocks(title="ditkit serve", analytics_enabled=False) as page:
        gr.Markdown("## ditkit: sample a model\nPick what to draw, set the sampler and the seed, press Generate. "
                    "The command line under the images writes the same pixels with `ditkit sample`.")
        if len(models) == 1:
            model_tab(gr, models[0], requests, max_images)
        else:
            with gr.Tabs():
                for index, served in enumerate(models):
                    with gr.Tab(served.name):
                        model_tab(gr, served, requests, max_images, index)
    page.queue(default_concurrency_limit=1, max_size=32)
    return page


# ----------------------------------------------------------------------------------------------- the verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", action="append", metavar="PATH",
                        help="a checkpoint (any kind `ditkit sample` reads) or a run folder (its newest); "
                        "repeatable; default: the demo models in results/")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU if any, else cpu)")
    parser.add_argument("--vae", help="VAE folder or Hugging Face id (offline cache) for latent models")
    parser.add_argument("--text-encoder", help="text models: T5/CLIP folder or Hugging Face id in the local cache")
    parser.add_argument("--max-images", type=int, default=64, help="images a request may ask for (default 64)")


def _gradio() -> Any:
    """Gradio, with its analytics and version check off before it is imported (one line if it is missing)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise UserError("ditkit serve needs Gradio: pip install 'ditkit[serve]'") from None
    return gradio


def run(args: argparse.Namespace) -> int:
    from ditkit.sample.cli import _device

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {args.max_images}")
    gr = _gradio()
    device = _device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_all(args, device)
    requests = Requests()
    page = build_page(models, requests, args.max_images)
    for served in models:
        print(f"serving {served.name}: {served.base.model.config.name}, {served.kind}", file=sys.stderr)
    # System fonts (no stylesheet to fetch), no share tunnel, no server-side rendering (no Node process).
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    try:
        page.launch(server_name=args.host, server_port=args.port, share=False, show_error=True, ssr_mode=False,
                    theme=theme, css=PAGE_CSS, footer_links=[], quiet=False, inbrowser=False)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({err}); pass another --port") from None
    finally:
        requests.close()
    return 0
