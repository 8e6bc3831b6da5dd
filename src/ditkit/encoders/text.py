"""Frozen text encoders through `transformers`: T5 (PixArt-α's, 120 tokens) and CLIP's text tower (77 tokens).

    encoder = load_text_encoder("PixArt-alpha/PixArt-XL-2-512x512", device="cuda")   # its text_encoder/ folder
    features, mask = encoder.encode(["a red cube on a blue table"])                   # N×120×4096, N×120

Loading is offline, as the VAE's: a local folder (the encoder itself, or a pipeline folder with
`text_encoder/` and `tokenizer/` inside) or a Hugging Face id already in the local cache; anything missing is one
line saying what and how to get it. The encoder is frozen (eval, no gradients) and runs in bf16 on GPUs
(float32 on the CPU). Captions are padded to `max_tokens` with a mask marking the real tokens (T5's end-of-text
token included), so the diffusion model can ignore the padding.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ditkit.encoders.autoencoder import hub_cache_dir
from ditkit.runtime.errors import UserError

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"  # the T5 encoder PixArt-α uses (4096 features)
DEFAULT_TOKENS = {"t5": 120, "clip": 77}  # PixArt-α's caption length; CLIP's position table
KINDS = ("t5", "clip")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide loading chatter (legacy-tokenizer notices, deprecation warnings) so that real errors stand out."""
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(level)


class TextEncoder:
    """A frozen transformers text model and its tokenizer: captions → (features N×L×C, mask N×L bool)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, kind: str, max_tokens: int, name: str):
        if kind not in KINDS:
            raise ValueError(f"unknown text encoder kind {kind!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_tokens = max_tokens
        self.name = name

    @property
    def channels(self) -> int:
        """Features per token (T5-XXL 4096, CLIP ViT-L/14 768)."""
        return int(self.model.config.hidden_size if self.kind == "clip" else self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask (N×max_tokens each); longer captions are cut at max_tokens."""
        if isinstance(captions, str):
            raise TypeError("encode a list of captions, not one string")
        out = self.tokenizer(list(captions), padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(features float32 N×max_tokens×C, mask bool N×max_tokens) of `captions`, on the encoder's device."""
        feats, masks = [], []
        for i in range(0, len(captions), batch_size):
            ids, mask = self.tokenize(captions[i : i + batch_size])
            ids, mask = ids.to(self.device), mask.to(self.device)
            # T5 reads the mask (padding attends to nothing); CLIP is causal, so padding never reaches real tokens.
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            feats.append(hidden.float())
            masks.append(mask)
        return torch.cat(feats), torch.cat(masks)

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, {self.kind}, {self.max_tokens} tokens × {self.channels})"


def _layouts(path_or_id: str) -> tuple[str, list[tuple[dict[str, str], dict[str, str]]]]:
    """(name, [(model kwargs, tokenizer kwargs), ...] to try): the encoder itself, or a pipeline with
    `text_encoder/` and `tokenizer/` sub-folders (PixArt-α's repositories are laid out so)."""
    path = Path(path_or_id).expanduser()
    pipeline = ({"subfolder": "text_encoder"}, {"subfolder": "tokenizer"})
    if path.is_dir():
        return str(path), [pipeline if (path / "text_encoder" / "config.json").is_file() else ({}, {})]
    return path_or_id, [({}, {}), pipeline]


def _first_config(transformers: Any, name: str, layouts: list) -> tuple[Any, dict[str, str], dict[str, str]]:
    """The config of the first layout that has one (the error of the last one when none has)."""
    for k, (model_kw, tok_kw) in enumerate(layouts):
        try:
            with _quiet_transformers():
                config = transformers.AutoConfig.from_pretrained(name, local_files_only=True, **model_kw)
            return config, model_kw, tok_kw
        except OSError:
            if k == len(layouts) - 1:
                raise
    raise ValueError("no layouts to try")


def _kind_of(config: Any) -> str:
    model_type = getattr(config, "model_type", "")
    if model_type in ("t5", "umt5", "mt5"):
        return "t5"
    if model_type in ("clip_text_model", "clip"):
        return "clip"
    raise UserError(f"text encoder: model type {model_type!r} is neither T5 nor CLIP")


def load_text_encoder(
    path_or_id: str = DEFAULT_T5, max_tokens: int | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> TextEncoder:
    """Load a T5 or CLIP text encoder and its tokenizer offline; a one-line UserError when absent.

    `max_tokens` defaults to 120 for T5 (PixArt-α) and 77 for CLIP; `dtype` to bf16 on CUDA, float32 elsewhere.
    """
    try:
        import transformers
    except ImportError:
        raise UserError("text encoders need transformers: pip install 'ditkit[text]'") from None
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name, layouts = _layouts(path_or_id)
    try:
        config, model_kw, tok_kw = _first_config(transformers, name, layouts)
        kind = _kind_of(config)
        cls = transformers.T5EncoderModel if kind == "t5" else transformers.CLIPTextModel
        with _quiet_transformers():
            model = cls.from_pretrained(name, local_files_only=True, torch_dtype=dtype, **model_kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True, **tok_kw)
    except (OSError, ValueError) as err:
        if Path(name).exists():
            where = f"the folder {name} holds no loadable T5/CLIP text encoder with its tokenizer"
        else:
            where = f"{path_or_id!r} is not a local folder and is not in the Hugging Face cache {hub_cache_dir()}"
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load the text encoder: {where} ({first}); on a machine with internet run "
            f"`huggingface-cli download {path_or_id}`, copy its ~/.cache/huggingface here (or set HF_HOME), or "
            "pass --text-encoder FOLDER"
        ) from None
    tokens = max_tokens or DEFAULT_TOKENS[kind]
    return TextEncoder(model.to(device), tokenizer, kind, tokens, str(path_or_id))
