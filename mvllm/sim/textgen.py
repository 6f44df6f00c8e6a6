"""Deterministic output text, like greedy decoding: each token is a function of the seed, the choice
index and the context before it (prompt + tokens so far), so a continuation of a partial answer
yields exactly the rest of the uninterrupted answer.

Each generated token is one piece of text that the toy tokenizer also counts as exactly one token
(a word of at most six letters with its leading space, or a punctuation mark), so usage counts and
`/tokenize` of the output agree.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

# Short, common words (<= 6 letters each, so each is a single token).
_WORDS = (
    "the of and to in is it that for you was with on as have be at one this from by hot word but "
    "what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made "
    "live where after back little only round man year came show every good me give our under name "
    "very through just form great think say help low line differ turn cause much mean before move "
    "right boy old too same tell does set three want air well also play small end put home read "
    "hand port large spell add even land here must big high such follow act why ask men change went "
    "light kind off need house try us again animal point mother world near build self earth father "
    "head stand own page should found answer school grow study still learn plant cover food sun "
    "four state keep eye never last let though tree cross farm hard start might story saw far sea "
    "draw left late run while press close night real life few north open seem"
).split()
_WORDS = tuple(w for w in _WORDS if len(w) <= 6)
_PUNCT_AFTER = (",", ",", ";", ":")


@dataclass(frozen=True)
class Completion:
    """The planned output of one choice: token pieces, final text, why it ended."""

    pieces: tuple[str, ...]  # text of each generated token, already cut at a stop string
    text: str
    finish_reason: str  # "stop" | "length"
    stop_reason: str | None  # the stop string that ended it, else None


def stable_rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def natural_length(seed: int, prompt: str, index: int, default_max: int) -> int:
    """How many tokens the simulated model writes before its end-of-sequence token:
    uniform in [ceil(default_max / 2), default_max], fixed by seed, prompt and choice index."""
    low = max(1, (default_max + 1) // 2)
    return stable_rng("len", seed, prompt, index).randint(low, max(low, default_max))


# The simulated chat template's generation prompt (protocol.render_chat): an answer starts after it.
ANSWER_MARK = "assistant:"
_SENTENCE_END = 1 / 9  # chance of "." after a word that does not open a sentence (mean ~9 words)
_PUNCT_RATE = 0.06  # chance of ",", ";" or ":" after a word


def generate_pieces(seed: int, prompt: str, index: int, n_tokens: int, salt: str = "") -> list[str]:
    """The first `n_tokens` pieces of context_pieces after the context `prompt`."""
    return list(itertools.islice(context_pieces(seed, prompt, index, salt), n_tokens))


def context_pieces(seed: int, context: str, index: int, salt: str = "") -> Iterator[str]:
    """Token pieces the way greedy decoding makes them: each one is a function of (seed, salt,
    choice index) and the whole text before it, the context plus the pieces so far. So a request
    whose context already holds the first K pieces of an answer continues it with piece K+1.
    The context is hashed once; each piece then costs one hash of a copy (a rolling state)."""
    state = hashlib.blake2b(f"ctx\x1f{seed}\x1f{salt}\x1f".encode(), digest_size=16)
    state.update(context.encode("utf-8", "surrogatepass"))
    tag = b"\x00" + str(index).encode()
    last = context[-1:]
    at_mark = not context or context.endswith(ANSWER_MARK)
    opens_sentence = _trailing_word(context)[:1].isupper()
    while True:
        probe = state.copy()
        probe.update(tag)
        r = int.from_bytes(probe.digest(), "big")
        u = (r & 0xFFFFFFFF) / 2**32
        after_word = last.isalpha()
        if after_word and not opens_sentence and u < _SENTENCE_END:
            piece = "."
        elif after_word and u < _SENTENCE_END + _PUNCT_RATE:
            piece = _PUNCT_AFTER[(r >> 32) % len(_PUNCT_AFTER)]
        else:
            word = _WORDS[(r >> 40) % len(_WORDS)]
            capital = at_mark or last in ("", ".", "\n")
            if capital:
                word = word.capitalize()
            piece = word if at_mark or last in ("", " ", "\n") else " " + word
            opens_sentence = capital
        yield piece
        state.update(piece.encode())
        last = piece[-1]
        at_mark = False


def _trailing_word(text: str) -> str:
    i = len(text)
    while i > 0 and text[i - 1].isalpha():
        i -= 1
    return text[i:]


class LazyCompletion:
    """The output of one choice, made token by token as the engine asks for it, with stop strings
    applied exactly as plan_completion applies them to the whole output. Work and memory grow with
    the tokens generated, never with what a request merely asks for (n, max_tokens)."""

    def __init__(self, pieces: Iterator[str], target: int, stop: list[str], finish_if_complete: str) -> None:
        self.target = target  # tokens it ends after; shrinks to the token that completes a stop string
        self.finish_reason = finish_if_complete
        self.stop_reason: str | None = None
        self._source = pieces
        self._stops = [s for s in stop if s]
        # A stop string that starts within a token ends at most this many characters after it:
        # a token's text is final once that much text follows it (vLLM holds back as much).
        self._lookahead = max((len(s) for s in self._stops), default=1) - 1
        self._raw: list[str] = []
        self._ends: list[int] = []  # end offset of each raw piece in the output text
        self._tail = ""  # the last _lookahead characters, where a stop string may begin
        self._cut: int | None = None  # offset of the stop string that ended the output

    def piece(self, j: int) -> str:
        """The text token `j` (0-based, < target) shows: cut before a stop string."""
        while len(self._raw) < self.target and (
            len(self._raw) <= j or (self._stops and self._ends[-1] < self._ends[j] + self._lookahead)
        ):
            self._extend()
        raw = self._raw[j]
        if self._cut is None or self._ends[j] <= self._cut:
            return raw
        return raw[: max(0, self._cut - (self._ends[j] - len(raw)))]

    def _extend(self) -> None:
        p = next(self._source)
        start = self._ends[-1] if self._ends else 0
        self._raw.append(p)
        self._ends.append(start + len(p))
        if not self._stops:
            return
        window = self._tail + p
        best: tuple[int, str] | None = None  # (end in window, stop string): the earliest end wins
        for s in self._stops:
            at = window.find(s)
            if at >= 0 and (best is None or at + len(s) < best[0]):
                best = (at + len(s), s)
        if best is not None:
            end, s = best
            self._cut = start - len(self._tail) + end - len(s)
            self.target = len(self._raw)
            self.finish_reason, self.stop_reason = "stop", s
        self._tail = window[-self._lookahead:] if self._lookahead else ""


def plan_completion(pieces: list[str], stop: list[str], finish_if_complete: str) -> Completion:
    """Apply stop strings to generated pieces the way vLLM does: the output ends at the token that
    completes the earliest stop string, and the text is cut before that string (stop string not
    included). Without a match, the finish reason is `finish_if_complete`."""
    text = "".join(pieces)
    best: tuple[int, str] | None = None
    for s in stop:
        if not s:
            continue
        at = text.find(s)
        if at >= 0 and (best is None or at + len(s) < best[0] + len(best[1])):
            best = (at, s)
    if best is None:
        return Completion(tuple(pieces), text, finish_if_complete, None)
    cut_at, stop_str = best
    stop_end = cut_at + len(stop_str)
    kept: list[str] = []
    pos = 0
    for piece in pieces:  # keep tokens up to the one that completes the stop string
        start, pos = pos, pos + len(piece)
        kept.append(piece[: max(0, cut_at - start)] if pos > cut_at else piece)
        if pos >= stop_end:
            break
    return Completion(tuple(kept), text[:cut_at], "stop", stop_str)
