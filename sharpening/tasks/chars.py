"""A character-level tokenizer (one token per character) for tiny built-in models.

Built with the ``tokenizers`` library and wrapped as a ``transformers.PreTrainedTokenizerFast``, so it
saves with ``save_pretrained`` and loads back with ``AutoTokenizer.from_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
"""Special tokens, in id order: <pad>=0, <s>=1, </s>=2; characters take ids 3, 4, ..."""


def build_char_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """A tokenizer with one id per character of ``chars`` (after the special tokens).

    Every character of the input is its own token (characters outside ``chars`` are errors at encode
    time), ``<s>`` is prepended to each single sequence, decoding joins tokens without spaces, and
    padding is on the left (as generation with a batch of prompts needs).

    >>> tok = build_char_tokenizer("abcd=")
    >>> tok("ab=")["input_ids"]
    [1, 3, 4, 7]
    >>> tok.decode([1, 3, 4, 7, 2], skip_special_tokens=True)
    'ab='
    """
    if len(set(chars)) != len(chars) or not chars:
        raise ValueError(f"build_char_tokenizer: chars must be non-empty and distinct, got {chars!r}")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
