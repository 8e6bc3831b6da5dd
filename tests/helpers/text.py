"""Tiny random T5 / CLIP text encoders with word-level tokenizers, built in the tests (nothing downloaded)."""

from __future__ import annotations

import torch

WORDS = ["<pad>", "</s>", "<s>", "<unk>", "a", "red", "seven", "on", "blue", "background", "cube"]


def tiny_tokenizer(bos: bool):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    # T5 ends a caption with </s>; CLIP wraps it in <s> ... </s>.
    single = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = TemplateProcessing(single=single, special_tokens=[("<s>", 2), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


def save_t5(folder):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1)
    T5EncoderModel(cfg).save_pretrained(str(folder))
    tiny_tokenizer(bos=False).save_pretrained(str(folder))


def save_clip(folder):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=20, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1)
    CLIPTextModel(cfg).save_pretrained(str(folder))
    tiny_tokenizer(bos=True).save_pretrained(str(folder))
