"""The tiny world's tokenizer and model: round trips and hub-style save/load."""

import pytest
import torch

from minigrpo.models import count_parameters
from minigrpo.tiny import VOCAB, build_model, build_tokenizer, load_tiny, save_tiny


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokenizer_round_trip():
    tokenizer = build_tokenizer()
    assert len(tokenizer) == len(VOCAB) == 16
    ids = tokenizer("12+345=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len("12+345=")  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12+345="


def test_tokenizer_pads_left():
    tokenizer = build_tokenizer()
    batch = tokenizer(["1+2=", "10+20="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert batch["input_ids"][1, 0] == tokenizer.bos_token_id


def test_model_size_and_seeded_init():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3)
    assert 1.0e6 < count_parameters(model)[1] < 1.1e6
    assert model.config.tie_word_embeddings
    again = build_model(tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_save_and_load_like_a_hub_model(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    save_tiny(model, tokenizer, tmp_path)
    loaded, loaded_tokenizer = load_tiny(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))
    assert loaded_tokenizer("7+8=")["input_ids"] == tokenizer("7+8=")["input_ids"]
    assert loaded_tokenizer.decode([5, 6, 2], skip_special_tokens=True) == "12"
    assert loaded_tokenizer.padding_side == "left"
    x = tokenizer(["3+4="], return_tensors="pt")
    assert torch.equal(model(**x).logits, loaded(**x).logits)
