"""`ditkit demo --text`: train a small text-to-image DiT on the colour digits, prompt it, and score it.

The data set (data/colour_digits.py) captions each digit with its colours ("a red seven on a blue
background"); some digit-colour pairs are never shown in training. The model is PixArt-α's block (adaLN-single,
cross-attention to the caption tokens) with a word encoder trained with it (no pretrained text encoder can be
fetched here; the real path uses the frozen T5/CLIP of ditkit.encoders.text). After training it samples prompted images
with DPM-Solver++ and classifier-free guidance through the null caption, and prints, for the training
combinations and for the held-out ones, how often the digits classifier reads the prompted digit and how often
the foreground and background colours are the prompted ones. RESULTS/grid.png shows one row per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ditkit.data import colour_digits as cd
from ditkit.models import build_model
from ditkit.models.config import DiTConfig
from ditkit.runtime.errors import UserError

# Chosen on this 2-core CPU by short runs scored every 250-500 steps (benchmarks/RESULTS.md, "Text demo"): the
# 8×8 digits with 2×2 patches (16 image tokens), 7 caption tokens of 64 features from WordEncoder (its
# self-attention layer is what let the digit word through), 4 PixArt-α blocks 128 wide with 8 heads of 16 (the
# runs that learnt the digit had 8; 8 heads without the encoder's self-attention did not, 2 was not tried with
# it). v-prediction, not ε: on RGB the ε-model's x̂₀ at high noise turned its errors into saturated colour
# speckle (no readable digit at 2,000 steps); with v the samples are clean shapes and the colours right from
# 500 steps on. lr, batch and EMA are the class-conditional demo's.
DEMO_CONFIG = dict(depth=4, hidden_size=128, num_heads=8, patch_size=2, input_size=8, in_channels=3,
                   conditioning="text", caption_channels=64, max_tokens=cd.MAX_WORDS, class_dropout_prob=0.1)
DEMO_BATCH = 64
DEMO_LR = 1e-3
DEMO_EMA = 0.99
DEMO_PREDICTION = "v"
DEMO_STEPS = 3000
DEMO_CFG = 3.0
# What a stored demo model was trained with: weights trained otherwise are not reused.
RECIPE = f"{sorted(DEMO_CONFIG.items())} lr {DEMO_LR} batch {DEMO_BATCH} ema {DEMO_EMA} {DEMO_PREDICTION} encoder v2"
WEIGHTS = "text_demo.safetensors"


class WordEncoder(nn.Module):
    """The demo's text encoder: a learned vector per word plus one per position (word order carries which
    colour is the ink and which the background), then one self-attention layer, trained with the model.

    The self-attention layer is what makes it a text encoder rather than a bag of words: as T5's or CLIP's
    outputs, every token then carries the whole caption. Without it (measured, benchmarks/RESULTS.md "Text
    demo") the DiT's cross-attention settled on the two colour words, read the digit word with the uniform
    weight 1/7, and the samples were well-formed digits of random classes in the right colours: swapping the
    digit word moved the prediction 10-25× less than swapping a colour word.
    """

    def __init__(self, vocab: int, max_tokens: int, channels: int, heads: int = 4):
        super().__init__()
        self.words = nn.Embedding(vocab, channels)
        self.positions = nn.Parameter(torch.randn(max_tokens, channels) * 0.02)
        nn.init.normal_(self.words.weight, std=1.0 / channels**0.5)
        self.mix = nn.TransformerEncoderLayer(channels, heads, 2 * channels, dropout=0.0, batch_first=True,
                                              norm_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.words(ids) + self.positions[: ids.shape[1]])


class EncodedTextModel(nn.Module):
    """A text DiT with its word encoder in front: `model(x, t, ids, mask, force_drop_ids)` as the DiT's."""

    def __init__(self, config: DiTConfig, vocab: int):
        super().__init__()
        self.encoder = WordEncoder(vocab, config.max_tokens, config.caption_channels)
        self.dit = build_model(config)

    @property
    def config(self) -> DiTConfig:
        return self.dit.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.dit(x, t, self.encoder(y), mask, force_drop_ids)


def train_text_model(steps: int, seed: int, log_every: int = 250) -> EncodedTextModel:
    """Train the demo model from scratch (AdamW, EMA, caption dropout 0.1); returns the EMA weights."""
    import copy

    from ditkit.diffusion import create_diffusion
    from ditkit.train.step import TrainStep

    torch.manual_seed(seed)
    model = EncodedTextModel(DiTConfig(**DEMO_CONFIG), len(cd.VOCAB))
    ema = copy.deepcopy(model)  # not optimised; update_ema matches its parameters by requires_grad
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=DEMO_LR, weight_decay=0.0)
    step_fn = TrainStep(model, model, ema, opt, create_diffusion("", prediction=DEMO_PREDICTION),
                        device=torch.device("cpu"), precision="fp32", global_batch=DEMO_BATCH, seed=seed,
                        ema_decay=DEMO_EMA, class_dropout_prob=DEMO_CONFIG["class_dropout_prob"])
    data = cd.ColourDigits("train", held_out=False, seed=0)
    gen = torch.Generator().manual_seed(seed)
    start, running = time.perf_counter(), 0.0
    model.train()
    for step in range(steps):
        images, captions, _ = data.batch(DEMO_BATCH, gen)
        ids, _ = cd.tokenize(captions)  # every caption has all 7 words: no padding, so no mask is needed
        out = step_fn(images, ids, step)
        running += float(out.terms[0])
        if (step + 1) % log_every == 0:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"  step {step + 1}/{steps}  loss {running / log_every:.4f}  {rate:.1f} steps/s", file=sys.stderr)
            running = 0.0
    return ema.eval()


@torch.no_grad()
def prompted_samples(model: EncodedTextModel, prompts: list[str], cfg_scale: float, seed: int,
                     batch: int = 250) -> torch.Tensor:
    """RGB samples N×3×8×8 in [-1, 1] for `prompts` (DPM-Solver++ 20 steps, guided by the null caption)."""
    from ditkit.diffusion import samplers
    from ditkit.models.guidance import guided_captions

    denoiser = guided_captions(model, cfg_scale, channels="all")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = cd.tokenize(prompts[i : i + batch])
        noise = torch.randn(len(ids), 3, 8, 8, generator=gen)
        out.append(samplers.sample(denoiser, noise, sampler="dpm-solver", num_steps=20, clip_denoised=True,
                                   model_kwargs={"y": ids, "mask": mask}, generator=gen,
                                   prediction=DEMO_PREDICTION))
    return torch.cat(out).clamp(-1, 1)


def score(samples: torch.Tensor, combos: torch.Tensor) -> dict[str, float]:
    """Digit accuracy (digits classifier on the recovered ink) and fg/bg colour accuracy of samples."""
    from ditkit.metrics.digits_classifier import get_digits_classifier

    fg, bg, ink = cd.read_image(samples)
    classifier = get_digits_classifier(8, verbose=False).eval()  # batch norm: its running statistics
    with torch.no_grad():
        digits = classifier(ink).argmax(dim=1)
    digit_ok = digits == combos[:, 0]
    fg_ok, bg_ok = fg == combos[:, 1], bg == combos[:, 2]
    return {
        "digit": round(digit_ok.float().mean().item(), 4),
        "foreground": round(fg_ok.float().mean().item(), 4),
        "background": round(bg_ok.float().mean().item(), 4),
        "colour": round((fg_ok & bg_ok).float().mean().item(), 4),
        "all": round((digit_ok & fg_ok & bg_ok).float().mean().item(), 4),
    }


def evaluation_prompts(held_out: bool, num: int) -> tuple[list[str], torch.Tensor]:
    """`num` prompts cycling over the (held-out or training) combinations, and their (digit, fg, bg)."""
    combos = torch.tensor(cd.combinations(held_out))
    combos = combos[torch.arange(num) % len(combos)]
    return [cd.caption(*c) for c in combos.tolist()], combos


def grid_prompts() -> list[tuple[int, int, int]]:
    """One prompt per row: each digit once, in colours that cycle, the held-out pair of every digit among them."""
    rows = []
    for d in range(10):
        fg = d % len(cd.COLOURS)  # the held-out colour of digit d
        bg = (fg + 2 + d % 3) % len(cd.COLOURS)
        rows.append((d, fg, bg))
        fg2 = (fg + 1) % len(cd.COLOURS)
        rows.append((d, fg2, (fg2 + 3) % len(cd.COLOURS)))
    return rows


def save_grid(model: EncodedTextModel, path: Path, cfg_scale: float, seed: int, per_prompt: int = 8) -> None:
    """A PNG grid: one row per prompt (its text on the left, `per_prompt` samples to the right)."""
    from PIL import Image, ImageDraw

    rows = grid_prompts()
    prompts = [cd.caption(*c) for c in rows for _ in range(per_prompt)]
    images = prompted_samples(model, prompts, cfg_scale, seed)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cell, label_w = 32, 300
    grid = Image.new("RGB", (label_w + per_prompt * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, combo in enumerate(rows):
        held = " (held out)" if (combo[0], combo[1]) in cd.HELD_OUT else ""
        draw.text((4, r * cell + 10), cd.caption(*combo) + held, fill="black")
        for c in range(per_prompt):
            tile = Image.fromarray(pixels[r * per_prompt + c]).resize((cell - 2, cell - 2), Image.NEAREST)
            grid.paste(tile, (label_w + c * cell + 1, r * cell + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run_text(args: argparse.Namespace) -> int:
    """Train (or reuse) the text demo model, write the grid and print the figures."""
    from safetensors.torch import load_file, save_file

    steps = DEMO_STEPS if args.steps is None else args.steps
    cfg_scale = DEMO_CFG if args.cfg_scale is None else args.cfg_scale
    if steps < 1 or args.num_samples < 20:
        raise UserError("--steps must be at least 1 and --num-samples at least 20")
    # At most two threads: on the quiet 2-core CPU two trained 10.1 steps/s against one thread's 6.5; more were
    # not measured, and the matrices are tiny.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = Path(args.results_dir or "results/demo_text")
    results.mkdir(parents=True, exist_ok=True)
    weights = results / WEIGHTS
    start = time.perf_counter()
    # Reused only when trained with these settings (the weights of another recipe would load and mislead).
    meta = {"steps": str(steps), "seed": str(args.seed), "recipe": RECIPE}
    model = EncodedTextModel(DiTConfig(**DEMO_CONFIG), len(cd.VOCAB))
    reused = False
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            reused = {k: (f.metadata() or {}).get(k) for k in meta} == meta
    if reused:
        print(f"[1/3] reusing the trained text model {weights}", file=sys.stderr)
        model.load_state_dict(load_file(str(weights)))
        model.eval()
    else:
        print(f"[1/3] training a small text-to-image DiT on the colour digits ({steps} steps, batch "
              f"{DEMO_BATCH}) -> {results}", file=sys.stderr)
        model = train_text_model(steps, args.seed)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        from ditkit.runtime.io import atomic_write

        atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=meta))
    trained = time.perf_counter()
    print(f"[2/3] sampling {args.num_samples} prompted images per set (dpm-solver 20 steps, cfg "
          f"{cfg_scale:g})", file=sys.stderr)
    figures: dict[str, object] = {}
    for name, held in (("trained_combinations", False), ("held_out_combinations", True)):
        prompts, combos = evaluation_prompts(held, args.num_samples)
        figures[name] = score(prompted_samples(model, prompts, cfg_scale, args.seed + held), combos)
    print("[3/3] writing the grid of prompts", file=sys.stderr)
    grid = results / "grid.png"
    save_grid(model, grid, cfg_scale, args.seed)
    done = time.perf_counter()
    figures.update(train_seconds=round(trained - start, 1), total_seconds=round(done - start, 1),
                   steps=steps, reused_training=reused, grid=str(grid))
    (results / "demo_text.json").write_text(json.dumps(figures, indent=2))
    print(f"sample grid: {grid}")
    for name in ("trained_combinations", "held_out_combinations"):
        f = figures[name]
        print(f"{name.replace('_', ' ')}: digit {f['digit']:.3f}  foreground {f['foreground']:.3f}  "
              f"background {f['background']:.3f}  both colours {f['colour']:.3f}  all three {f['all']:.3f}")
    print(f"time: {figures['train_seconds']:.0f} s training, {figures['total_seconds']:.0f} s in all, on cpu")
    if args.json:
        print(json.dumps(figures))
    return 0
