"""The instruction tokenizer: byte-level, built locally (no hub download), saved with `save_pretrained`.

Every UTF-8 byte is one token (ids 0-255) plus ``<pad>``, ``<s>`` and ``</s>``; instructions are short, so a
learned vocabulary buys nothing at this scale. A bigger language model brings its own tokenizer from a
local directory instead (`VLAConfig.tokenizer_path`).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 259 ids, made from scratch offline."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right"
    )


def _byte_of(char: str) -> int:
    """Invert GPT-2's byte-to-unicode map used by the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """A tokenizer saved in a local directory (never fetched from a hub)."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return tokenizer
