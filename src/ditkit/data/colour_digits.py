"""A built-in captioned data set: the digits drawn in a foreground colour on a background colour.

Each image is one of scikit-learn's 8×8 digits, its ink in one colour of `COLOURS` and its background in
another, captioned e.g. "a red seven on a blue background": a text model must read three words of the caption
(and their order) to get it right. Some (digit, foreground colour) pairs never occur in training (`HELD_OUT`:
each digit has one colour it is never drawn in), so prompting for them tests whether the model composes what
it read rather than recalling whole captions.

Images are RGB in [-1, 1]: pixel = background + ink · (foreground − background), ink the digit's value in
[0, 1]. `read_image` inverts that (colours by nearest palette entry, the ink by projection) so that samples
are scored with the digits classifier on the recovered ink.
"""

from __future__ import annotations

import torch

from ditkit.data.digits import load_digits_split

# Corners of the RGB cube, well apart from each other (in [-1, 1] per channel).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (-1.0, -1.0, -1.0),
}
COLOUR_NAMES = tuple(COLOURS)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Digit d is never drawn in colour (d mod 6) during training: 10 of the 60 digit-colour pairs.
HELD_OUT: frozenset[tuple[int, int]] = frozenset((d, d % len(COLOURS)) for d in range(10))
TEMPLATE = "a {fg} {digit} on a {bg} background"
VOCAB = ("<pad>", "a", "on", "background", *COLOUR_NAMES, *DIGIT_WORDS)
MAX_WORDS = 7


def palette() -> torch.Tensor:
    """The colours as a K×3 tensor in [-1, 1], in `COLOUR_NAMES` order."""
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32)


def caption(digit: int, fg: int, bg: int) -> str:
    """The caption of one image, e.g. caption(7, 0, 2) == "a red seven on a blue background"."""
    return TEMPLATE.format(fg=COLOUR_NAMES[fg], digit=DIGIT_WORDS[digit], bg=COLOUR_NAMES[bg])


def combinations(held_out: bool) -> list[tuple[int, int, int]]:
    """Every (digit, fg, bg) with fg ≠ bg: those of the held-out pairs (`held_out=True`) or all the others."""
    k = len(COLOURS)
    return [
        (d, f, b) for d in range(10) for f in range(k) for b in range(k)
        if f != b and ((d, f) in HELD_OUT) == held_out
    ]


def tokenize(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids (N×MAX_WORDS, int64) and mask (N×MAX_WORDS, bool) of captions in the data set's vocabulary."""
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = torch.zeros(len(captions), MAX_WORDS, dtype=torch.long)
    mask = torch.zeros(len(captions), MAX_WORDS, dtype=torch.bool)
    for row, text in enumerate(captions):
        words = text.lower().split()
        unknown = [w for w in words if w not in index]
        if unknown or len(words) > MAX_WORDS:
            raise ValueError(f"caption {text!r}: unknown words {unknown} or more than {MAX_WORDS} words")
        ids[row, : len(words)] = torch.tensor([index[w] for w in words])
        mask[row, : len(words)] = True
    return ids, mask


def paint(ink: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """RGB images N×3×S×S from ink N×1×S×S in [0, 1] and colour indices fg, bg (N)."""
    colours = palette().to(ink.device)
    f, b = colours[fg][:, :, None, None], colours[bg][:, :, None, None]
    return b + ink * (f - b)


class ColourDigits:
    """The training (or test) split's digits with random colour pairs drawn from the allowed combinations."""

    def __init__(self, split: str = "train", held_out: bool = False, seed: int = 0):
        images, labels = load_digits_split(8, split, seed)
        self.ink = (images + 1.0) / 2.0  # N×1×8×8 in [0, 1]
        self.labels = labels
        self.combos = torch.tensor(combinations(held_out))
        self.by_digit = [torch.nonzero(labels == d).flatten() for d in range(10)]

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """(images N×3×8×8 in [-1, 1], captions, combos N×3 of digit/fg/bg) drawn uniformly over combos."""
        combos = self.combos[torch.randint(len(self.combos), (n,), generator=generator)]
        rows = torch.stack([
            self.by_digit[d][torch.randint(len(self.by_digit[d]), (1,), generator=generator)][0]
            for d in combos[:, 0].tolist()
        ])
        images = paint(self.ink[rows], combos[:, 1], combos[:, 2])
        return images, [caption(*c) for c in combos.tolist()], combos


def read_image(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fg index N, bg index N, ink N×1×S×S in [-1, 1]) read back from RGB images in [-1, 1].

    The background is the palette colour nearest the median border pixel (digits leave the border blank); the
    foreground the one nearest the mean of the 8 pixels farthest from it; the ink the projection of each pixel
    onto the background → foreground line, as the digits classifier expects it (−1 background, +1 ink).
    """
    n = images.shape[0]
    colours = palette().to(images.device)
    pixels = images.flatten(2).transpose(1, 2)  # N×P×3
    side = images.shape[-1]
    border = torch.zeros(side, side, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    bg_value = pixels[:, border.flatten().to(images.device)].median(dim=1).values
    bg = torch.cdist(bg_value[:, None], colours[None].expand(n, -1, -1))[:, 0].argmin(dim=1)
    far = (pixels - colours[bg][:, None]).norm(dim=2).topk(8, dim=1).indices
    fg_value = torch.gather(pixels, 1, far[..., None].expand(-1, -1, 3)).mean(dim=1)
    dist = torch.cdist(fg_value[:, None], colours[None].expand(n, -1, -1))[:, 0]
    dist[torch.arange(n), bg] = float("inf")  # the ink is another colour than the background
    fg = dist.argmin(dim=1)
    direction = colours[fg] - colours[bg]
    ink = ((pixels - colours[bg][:, None]) * direction[:, None]).sum(2) / direction.square().sum(1, keepdim=True)
    ink = ink.clamp(0, 1).reshape(n, 1, side, side)
    return fg, bg, ink * 2.0 - 1.0
