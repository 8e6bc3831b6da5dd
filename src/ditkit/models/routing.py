"""The DiT block loop of a training forward with TREAD's token routing and REPA's tap on a block's output.

TREAD (Krause et al., 2025; github CompVis/tread): before block `start`, each sample keeps a random
`T − ⌊rate·T⌋` of its T tokens; only those run blocks `start`…`end` (inclusive); after block `end` they are
scattered back among the others, which carry their value from before block `start` unchanged. The kept count is
fixed, so the blocks see one static shape (compiled blocks and the fused kernels run as usual). The choice comes
from scores the training step draws from its (seed, step) generator, so a resumed run routes the same tokens.

REPA's tap: the hidden states after block `tap_depth` (1-based: REPA's `encoder_depth`) go through the model's
projector; when the tap falls inside a route only the kept tokens exist there, and `tap_ids` says which they
are (the alignment loss compares them with the same tokens of the encoder's features).

It runs only in training mode (`DiT.forward` reads `model.training_path` then); sampling runs every token
through every block, exactly the plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ditkit.training_methods import Routing


def kept_count(num_tokens: int, rate: float) -> int:
    """Tokens that run the routed blocks: T − ⌊rate·T⌋ (TREAD's `get_mask`)."""
    return num_tokens - int(num_tokens * rate)


def keep_ids(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """N×K indices of the kept tokens: the K lowest scores of each row (scores N×T, e.g. uniform draws)."""
    return torch.argsort(scores, dim=1)[:, : kept_count(scores.shape[1], rate)]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (N×K) of each sample's tokens x (N×T×D) → N×K×D."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`full` (N×T×D) with rows `ids` replaced by `kept` (N×K×D); out of place."""
    return full.scatter(1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1]), kept)


@dataclass
class TrainingPath:
    """What a training forward does beyond the plain loop. Set `scores` (N×T) before each forward to fix the
    routing (else fresh `torch.rand` draws, as TREAD's own code); read `tapped` / `tap_ids` after it."""

    routing: Routing | None = None
    tap_depth: int | None = None
    scores: torch.Tensor | None = None
    tapped: torch.Tensor | None = None
    tap_ids: torch.Tensor | None = None

    def run(self, model: Any, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """tokens (N×T×D) through `model.blocks` with conditioning c, routing and tapping as configured."""
        self.tapped, self.tap_ids = None, None
        route = self.routing if self.routing is not None and self.routing.rate > 0 else None
        saved, ids = None, None
        for i, block in enumerate(model.blocks):
            if route is not None and i == route.start:
                scores = self.scores
                if scores is None:
                    scores = torch.rand(tokens.shape[:2], device=tokens.device)
                ids = keep_ids(scores.to(tokens.device), route.rate)
                saved, tokens = tokens, gather_tokens(tokens, ids)
            tokens = model._run_block(block, tokens, c)
            if self.tap_depth is not None and i + 1 == self.tap_depth:
                self.tapped = model.projectors[0](tokens)
                self.tap_ids = ids if saved is not None else None
            if saved is not None and i == route.end:
                tokens, saved = scatter_tokens(saved, ids, tokens), None
        return tokens
