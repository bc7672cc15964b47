"""The character tokenizer survives save_pretrained / AutoTokenizer."""

from __future__ import annotations

import pytest

from sharpening.tasks.chars import SPECIAL_TOKENS, build_char_tokenizer


def test_ids_and_specials():
    tok = build_char_tokenizer("xyz")
    assert [tok.convert_ids_to_tokens(i) for i in range(6)] == [*SPECIAL_TOKENS, "x", "y", "z"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("zyx").input_ids == [1, 5, 4, 3]
    assert tok("zy", add_special_tokens=False).input_ids == [5, 4]
    assert len(tok) == 6
    assert tok.padding_side == "left"


def test_round_trip_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    chars = "abcd= +0123"
    tok = build_char_tokenizer(chars)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "ab c=12+3"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.decode(tok(text).input_ids + [2], skip_special_tokens=True) == text
    assert loaded.decode(tok(text).input_ids) == "<s>" + text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.padding_side == "left"
    assert loaded.get_vocab() == tok.get_vocab()
    batch = loaded(["a", "abc"], padding=True)
    assert batch.input_ids == [[0, 0, 1, 3], [1, 3, 4, 5]]
    assert batch.attention_mask == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_unknown_character_is_an_error():
    tok = build_char_tokenizer("ab")
    # tokenizers raises a bare Exception for a token outside a WordLevel vocabulary without an unk token
    with pytest.raises(Exception, match=r"Missing \[UNK\] token"):
        tok("abz")


@pytest.mark.parametrize("chars", ["", "aba"])
def test_bad_alphabets(chars):
    with pytest.raises(ValueError, match="non-empty and distinct"):
        build_char_tokenizer(chars)
