"""Cache-aware routing, pure: a bounded approximate prefix index of recent prompts per model, and the
choice that sends a prompt to the node already holding its prefix unless that node is too loaded.

Algorithm (the shape of SGLang's `cache_aware` policy: approximate tree, cache threshold, balance
override; differences are marked *)
1. The prompt's text (`prompt_text`: chat = the messages' role and text in order, completions = the
   prompt) is cut to its first `max_prefix_chars` characters and split into chunks of `chunk_chars`
   characters (the last one may be shorter). Chunk i is keyed by a hash chained over chunks 0..i and
   the model, so one key stands for one whole prefix: the keys form a radix tree of chunks, stored
   flat. Each key holds the targets (nodes) it was sent to, each with its last-access time.
2. `match` walks the prompt's chain while the keys exist; a target's matched length is the end of
   the deepest key holding it (whole chunks: the index is approximate by up to one chunk, and a
   64-bit hash collision could fake a match, with odds far below a cache miss's cost).
   matched_fraction = matched chars / indexed chars (the prompt's length, at most max_prefix_chars).
3. The affinity node is the eligible candidate with the longest match (ties: lower score). A
   candidate is eligible when its kv_cache_usage < kv_full: a node whose KV cache is that full
   evicts what it holds, so it gets no new affinity traffic (*).
4. Balance (SGLang's rule, over our least-score scores): with `a` the affinity node's score and
   `m` the lowest score among all candidates, the choice is balanced when
       a - m <= balance_abs_threshold   or   a <= balance_rel_threshold * m
   and imbalanced otherwise (both a - m > abs and a > rel * m). (*) SGLang compares the fleet's
   busiest node with its idlest, so one hot node stops affinity for every prompt; we compare the
   node that affinity would load, so only traffic that would pile onto it is diverted.
5. Decision, first that applies:
       no prompt text (empty, token ids, other endpoints) -> reason no_prompt, least score;
       best matched_fraction >= cache_threshold and balanced -> prefix_hit, the affinity node;
       ... but imbalanced -> imbalanced, least score;
       an ineligible node would have matched >= cache_threshold -> kv_full, least score;
       otherwise -> prefix_miss, least score.
   "Least score" is the lowest-scoring candidate (ties: first given). The runner-up is the
   lowest-scoring candidate other than the chosen one. The prompt is then recorded for the chosen
   node (it will hold that prefix once it has prefilled it), as SGLang inserts into the chosen
   worker's tree.
6. Memory: every key's bytes are counted (its entry in the table, the key object, the node object,
   its targets' dict and times; target names are the caller's shared strings). When an insert
   takes the total above max_tree_bytes, least-recently-used keys are evicted until it fits.
   A key is touched after all its descendants on every access, so the LRU end always holds a leaf:
   eviction removes old branches from their tips and never orphans a key. Target entries older
   than entry_ttl are ignored by `match` and swept from the LRU end on insert. `remove_target`
   drops a node that left, drained or lost its cache (restart, sleep, a reset of its
   vllm:prefix_cache_queries counter).

Parameters (`CacheAwareParams`)
    cache_threshold = 0.5          least matched_fraction that earns affinity
    balance_abs_threshold = 0.25   score units (0.25 = a quarter of a node's capacity running)
    balance_rel_threshold = 1.5    ratio of the affinity node's score to the least score
    kv_full = 0.9                  kv_cache_usage at or above which a node gets no affinity
    max_tree_bytes = 32 MiB        bound on the index's memory, all models together
    max_prefix_chars = 16384       characters of a prompt indexed (about 4,000 tokens)
    entry_ttl = 600 s              a target entry older than this is ignored, then swept
    chunk_chars = 64               matching granularity
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024
POLICY_NAME = "cache-aware"
REASONS = ("prefix_hit", "prefix_miss", "kv_full", "imbalanced", "no_prompt")


@dataclass(frozen=True)
class CacheAwareParams:
    cache_threshold: float = 0.5
    balance_abs_threshold: float = 0.25
    balance_rel_threshold: float = 1.5
    kv_full: float = 0.9
    max_tree_bytes: int = 32 * MIB
    max_prefix_chars: int = 16384
    entry_ttl: float = 600.0
    chunk_chars: int = 64


class _Key:
    """One prefix (chunk chain) of the index."""

    __slots__ = ("end", "last", "nbytes", "targets")

    def __init__(self, end: int) -> None:
        self.end = end  # chars of the prompt covered up to and including this chunk
        self.targets: dict[str, float] = {}
        self.last = 0.0
        self.nbytes = 0


# Bytes, measured on this interpreter: a key's node object, its targets dict, its hash key, its
# slot in the OrderedDict (hash table entry + index + the ordered list's link, with the table's
# growth headroom), and per target a dict slot and a float.
_TABLE_ENTRY_BYTES = 120
# Those objects are what tracemalloc counts; the process's RSS grows more for each of them (pymalloc
# pools and arenas, the OrderedDict's link nodes, malloc headers). Measured with 100k-200k
# distinct prompts, RSS growth <= 1.6 x size_bytes at bounds of 1 to 64 MiB, so a memory budget
# for the process is max_tree_bytes = budget / RSS_PER_BYTE (policy.cache_params does that).
RSS_PER_BYTE = 1.6
_KEY_BYTES = (
    sys.getsizeof(_Key(0)) + sys.getsizeof({"x": 0.0}) + sys.getsizeof(2**62) + _TABLE_ENTRY_BYTES
)
_TARGET_BYTES = sys.getsizeof(0.5) + 48


class PrefixIndex:
    """Prefixes of recent prompts per model -> the nodes they were sent to (see the module doc)."""

    def __init__(self, params: CacheAwareParams | None = None) -> None:
        self.params = params or CacheAwareParams()
        self._keys: OrderedDict[int, _Key] = OrderedDict()  # LRU order: oldest first
        self._bytes = 0
        self._memo: tuple[str, str, CacheAwareParams, list[int]] | None = None  # the last prompt's chain

    # --- queries -------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._keys)

    def indexed_chars(self, text: str) -> int:
        return min(len(text), self.params.max_prefix_chars)

    def match(self, model: str, text: str, now: float | None = None) -> dict[str, int]:
        """{target: matched chars} for every target holding a prefix of `text` (entries older than
        entry_ttl at `now` are ignored; `now` None ignores age)."""
        found: dict[str, int] = {}
        horizon = None if now is None else now - self.params.entry_ttl
        for h in self._chain(model, text):
            key = self._keys.get(h)
            if key is None:
                break
            for target, t in key.targets.items():
                if horizon is None or t >= horizon:
                    found[target] = key.end
        return found

    # --- changes -------------------------------------------------------------------------------
    def insert(self, model: str, target: str, text: str, now: float) -> None:
        """Record that `target` was sent `text` (so it holds its prefix)."""
        hashes = self._chain(model, text)
        keys = self._keys
        added = 0
        # Leaf first, root last: each key is touched (moved to the recent end) after its
        # descendants, so a key is always more recent than they are.
        for h, end in zip(reversed(hashes), reversed(self._ends(text)), strict=True):
            key = keys.get(h)
            if key is None:
                key = _Key(end)
                key.nbytes = _KEY_BYTES + _TARGET_BYTES
                keys[h] = key
                added += _KEY_BYTES + _TARGET_BYTES
            else:
                if target not in key.targets:
                    key.nbytes += _TARGET_BYTES
                    added += _TARGET_BYTES
                keys.move_to_end(h)
            key.targets[target] = now
            key.last = now
        self._bytes += added
        self._sweep(now)

    def remove_target(self, target: str) -> int:
        """Forget `target` everywhere (it left or lost its cache); returns the keys it was on."""
        touched = 0
        for h in list(self._keys):
            key = self._keys.get(h)
            if key is None or target not in key.targets:
                continue
            touched += 1
            del key.targets[target]
            key.nbytes -= _TARGET_BYTES
            self._bytes -= _TARGET_BYTES
        # A target on a key is on all its ancestors, so emptied keys form whole subtrees.
        for h in [h for h, k in self._keys.items() if not k.targets]:
            self._drop(h)
        return touched

    def configure(self, params: CacheAwareParams, now: float) -> None:
        """New parameters (a reload): a lower max_tree_bytes or entry_ttl applies at once."""
        self.params = params
        self._sweep(now)

    def clear(self) -> None:
        self._keys.clear()
        self._bytes = 0

    # --- internals -----------------------------------------------------------------------------
    def _ends(self, text: str) -> list[int]:
        n = self.indexed_chars(text)
        c = self.params.chunk_chars
        return [min(start + c, n) for start in range(0, n, c)]

    def _chain(self, model: str, text: str) -> list[int]:
        # A routing decision matches a prompt and then inserts it: the second call reuses the
        # first's chain (the same str object and model; strings are immutable).
        memo = self._memo
        if memo is not None and memo[0] is text and memo[1] == model and memo[2] is self.params:
            return memo[3]
        out = self._compute_chain(model, text)
        self._memo = (text, model, self.params, out)
        return out

    def _compute_chain(self, model: str, text: str) -> list[int]:
        n = self.indexed_chars(text)
        c = self.params.chunk_chars
        cut = text[:n] if n < len(text) else text
        prev = hash(("mvllm-prefix", model))
        out: list[int] = []
        for start in range(0, n, c):
            prev = hash((prev, cut[start : start + c]))
            out.append(prev)
        return out

    def _sweep(self, now: float) -> None:
        """Evict from the LRU end (always a leaf): expired keys, then whatever exceeds max_tree_bytes."""
        horizon = now - self.params.entry_ttl
        while self._keys:
            key = next(iter(self._keys.values()))
            if key.last >= horizon and self._bytes <= self.params.max_tree_bytes:
                break
            self._drop(next(iter(self._keys)))

    def _drop(self, h: int) -> None:
        # Callers drop leaves (eviction) or whole emptied subtrees (remove_target), never orphans.
        self._bytes -= self._keys.pop(h).nbytes


@dataclass(frozen=True)
class CacheCandidate:
    name: str
    score: float  # the least-score score (engine load plus the router's in-flight correction)
    kv_cache_usage: float = 0.0  # vllm:kv_cache_usage_perc, 0..1
    hit_ratio: float | None = None  # vllm:prefix_cache_hits / queries, recent; reported, not used


@dataclass(frozen=True)
class Decision:
    chosen: CacheCandidate | None
    reason: str
    score: float
    runner_up: CacheCandidate | None
    matched_fraction: float

    def explain(self) -> str:
        runner = "-" if self.runner_up is None else f"{self.runner_up.name}:{self.runner_up.score:.3f}"
        return f"policy={POLICY_NAME}; reason={self.reason}; score={self.score:.3f}; runner_up={runner}"


def choose_cache_aware(
    candidates: Sequence[CacheCandidate],
    index: PrefixIndex,
    model: str,
    text: str | None,
    params: CacheAwareParams,
    now: float,
    record: bool = True,
) -> Decision:
    """The cache-aware choice (module doc, step 5); records `text` for the chosen node when `record`."""
    if not candidates:
        return Decision(None, "no_prompt" if not text else "prefix_miss", 0.0, None, 0.0)
    least = min(candidates, key=lambda c: c.score)
    reason = "prefix_miss"
    chosen = least
    fraction = 0.0
    if not text:
        reason = "no_prompt"
    else:
        indexed = index.indexed_chars(text)
        matches = index.match(model, text, now)
        eligible = [c for c in candidates if c.kv_cache_usage < params.kv_full]
        best = max(eligible, key=lambda c: (matches.get(c.name, 0), -c.score), default=None)
        best_chars = matches.get(best.name, 0) if best is not None else 0
        fraction = best_chars / indexed if indexed else 0.0
        full_chars = max((matches.get(c.name, 0) for c in candidates), default=0)
        if best is not None and best_chars > 0 and fraction >= params.cache_threshold:
            if _balanced(best.score, least.score, params):
                reason, chosen = "prefix_hit", best
            else:
                reason = "imbalanced"
        elif indexed and full_chars / indexed >= params.cache_threshold:
            reason = "kv_full"
        if chosen is not best:
            fraction = matches.get(chosen.name, 0) / indexed if indexed else 0.0
        if record:
            index.insert(model, chosen.name, text, now)
    others = [c for c in candidates if c is not chosen]
    runner_up = min(others, key=lambda c: c.score) if others else None
    return Decision(chosen, reason, chosen.score, runner_up, fraction)


def _balanced(affinity: float, least: float, params: CacheAwareParams) -> bool:
    return affinity - least <= params.balance_abs_threshold or affinity <= params.balance_rel_threshold * least


def prompt_text(doc: Mapping[str, Any], path: str) -> str | None:
    """The text a request's prefix is matched on, or None (token ids, no prompt, other endpoints).

    Chat: each message as "role\\ncontent\\n", content's text parts in order (images and other
    parts skipped), in message order, as a chat template lays them out. Completions: the prompt, a
    list of prompts joined by newlines.
    """
    if path.endswith("/chat/completions"):
        messages = doc.get("messages")
        if not isinstance(messages, list):
            return None
        parts: list[str] = []
        for m in messages:
            if not isinstance(m, Mapping):
                continue
            parts.append(str(m.get("role", "")))
            parts.append("\n")
            parts.append(_content_text(m.get("content")))
            parts.append("\n")
        text = "".join(parts)
        return text or None
    if path.endswith("/completions"):
        prompt = doc.get("prompt")
        if isinstance(prompt, str):
            return prompt or None
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt) or None
        return None  # token ids (a list of ints, or of lists of ints): no text to match
    return None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, Mapping) and p.get("type") in ("text", "input_text")
        )
    return ""
