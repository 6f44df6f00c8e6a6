"""Deterministic toy tokenizer: about one token per short word or punctuation mark, lossless round trip.

Token ids carry their own text, so any process decodes any id without a shared vocabulary:
- 0, 1, 2 are the specials `<unk>`, `<s>` (BOS) and `</s>` (EOS), as in Llama tokenizers;
- 3 .. 3+0x10FFFF is one Unicode character (digits, punctuation, newlines, non-ASCII text...);
- above that, a "word chunk": an optional leading space, then 1-6 ASCII letters, all lowercase or
  with only the first letter uppercase. The letters are packed in base 27 with two flag bits.
Words longer than six letters split into several chunks, as a real BPE splits rare words, so the
count per English word is close to 1 and the count per digit is 1 (as Llama's tokenizer does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIALS = {UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
_CHAR_BASE = 3
_WORD_BASE = _CHAR_BASE + 0x110000
_MAX_LETTERS = 6
_RADIX = 27
_PACKED = _RADIX**_MAX_LETTERS  # letters of one chunk, 1..26 per digit, 0 = none
VOCAB_LIMIT = _WORD_BASE + 4 * _PACKED  # ids are in [0, VOCAB_LIMIT); < 2**31

# A chunk: optional single space, then either a capital and up to 5 lowercase letters, or 1-6
# lowercase letters. Anything else is one character per token.
_CHUNK = re.compile(r"( ?)([A-Z][a-z]{0,5}|[a-z]{1,6})")


def _pack(letters: str) -> int:
    code = 0
    for ch in letters:
        code = code * _RADIX + (ord(ch) - 96)
    return code


def _unpack(code: int) -> str:
    out = []
    while code:
        code, digit = divmod(code, _RADIX)
        if digit:  # a zero digit only appears in ids we did not produce; skip it
            out.append(chr(96 + digit))
    return "".join(reversed(out))


def encode(text: str) -> list[int]:
    """Token ids of `text` (no BOS added)."""
    ids: list[int] = []
    pos, end = 0, len(text)
    match = _CHUNK.match
    while pos < end:
        m = match(text, pos)
        if m is not None:
            space, word = m.group(1), m.group(2)
            cap = word[0].isupper()
            flags = (2 if cap else 0) + (1 if space else 0)
            ids.append(_WORD_BASE + flags * _PACKED + _pack(word.lower()))
            pos = m.end()
        else:
            ids.append(_CHAR_BASE + ord(text[pos]))
            pos += 1
    return ids


def token_text(token_id: int) -> str:
    """The text of one token id; raises ValueError outside the vocabulary."""
    if token_id < 0 or token_id >= VOCAB_LIMIT:
        raise ValueError(f"token id {token_id} is out of vocabulary (0..{VOCAB_LIMIT - 1})")
    if token_id < _CHAR_BASE:
        return _SPECIALS[token_id]
    if token_id < _WORD_BASE:
        cp = token_id - _CHAR_BASE
        return "\ufffd" if 0xD800 <= cp <= 0xDFFF else chr(cp)
    flags, code = divmod(token_id - _WORD_BASE, _PACKED)
    word = _unpack(code)
    if flags & 2:
        word = word[:1].upper() + word[1:]
    return (" " if flags & 1 else "") + word


def decode(ids: Iterable[int]) -> str:
    return "".join(token_text(i) for i in ids)


def count(text: str) -> int:
    return len(encode(text))
