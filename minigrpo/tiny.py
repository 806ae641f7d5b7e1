"""The tiny world's model and tokenizer, built offline from a config.

A character-level tokenizer over the 16 symbols ``<pad> <bos> <eos> <unk> 0-9 + =`` and a
~1M-parameter causal transformer (Llama architecture: d=128, 4 layers, 4 heads, tied
embeddings).  Both are ordinary Hugging Face objects: they ``save_pretrained`` to a folder and
come back with ``from_pretrained``, exactly like a hub model, so the code that trains them
later drives a real instruct model unchanged.

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    save_tiny(model, tokenizer, "runs/tiny")
    model, tokenizer = load_tiny("runs/tiny")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers.utils import logging as hf_logging
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
SYMBOLS = tuple("0123456789+=")
VOCAB = SPECIAL_TOKENS + SYMBOLS  # 16 tokens; ids in this order


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: each character one token, ``<bos>`` prepended, left padding.

    Decoding fuses the characters back into a string (no spaces), so
    ``decode(encode("12+34="), skip_special_tokens=True) == "12+34="``.
    """
    vocab = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


@dataclass
class TinyModelConfig:
    """Shape of the tiny causal LM (defaults: 1.05M parameters)."""

    hidden_size: int = 128
    """d, the residual-stream width"""
    num_layers: int = 4
    """transformer blocks"""
    num_heads: int = 4
    """attention heads per block (head size d / heads)"""
    intermediate_size: int = 512
    """width of the SwiGLU MLP, typically 4·d"""
    max_positions: int = 64
    """longest sequence (prompt + completion) the rotary embedding is set up for"""


def build_model(
    tokenizer: PreTrainedTokenizerFast, config: TinyModelConfig | None = None, seed: int = 0
) -> LlamaForCausalLM:
    """A freshly initialised Llama-style causal LM sized for ``tokenizer``'s vocabulary.

    Initialisation is seeded by ``seed`` alone (the global torch RNG is left as it was).
    Llama rather than Qwen2: ``AutoTokenizer`` forces a byte-level Qwen2 tokenizer onto any
    folder whose config says ``qwen2``, which would replace the character tokenizer on reload.
    """
    config = config or TinyModelConfig()
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


@contextlib.contextmanager
def quiet_progress():
    """Silence transformers' own progress bars (weight loading/saving) inside the block."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_tiny(model, tokenizer, path: str | Path) -> None:
    """Write model and tokenizer to ``path`` with ``save_pretrained``, like a hub checkpoint."""
    with quiet_progress():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)


def load_tiny(path: str | Path):
    """Load ``(model, tokenizer)`` from a folder with the ``Auto*`` classes, as for a hub model."""
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer

