"""Pure scheduling policy of the simulated engine: FIFO admission, KV blocks, prefix cache, LoRA slots.

No clocks and no I/O here: the async runner (engine.py) asks it what to admit and tells it what happened.
The rules follow vLLM's FCFS scheduler closely enough for load balancing to see the same signals:
- a waiting request is admitted when fewer than `max_num_seqs` run and the KV pool has the blocks for
  its prompt (plus what it already generated, after a preemption); the queue head blocks the rest
  (head-of-line, as FCFS does);
- a request for a LoRA adapter that is not running waits ("deferred") while `max_loras` adapters run,
  and later requests may pass it;
- each generated token that crosses a block boundary takes a block; when none is free, the most
  recently admitted running request is preempted (blocks freed, put back at the head of the queue,
  recomputed later), as vLLM's recompute preemption does;
- full prompt blocks are hashed (chained, as vLLM's prefix caching does); a block enters the cache
  only once its prefill is done (`mark_computed`), so a request admitted while the same prefix is
  still being prefilled by another computes it again, as vLLM does; cached hashes stay (LRU, at most
  the size of the pool) until evicted or reset, and a new request's leading blocks found there count
  as prefix cache hits, block-aligned and capped below the full prompt (the last token is always
  computed, so a full hit recomputes its last block, as vLLM's `max_cache_hit_length = n - 1`).
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class Seq:
    """One sequence in the engine (a request with `n` choices is `n` sequences)."""

    seq_id: int
    prompt_tokens: int
    target_tokens: int  # tokens it will generate before finishing
    finish_reason: str  # why it finishes after `target_tokens` ("length" | "stop")
    arrival: float
    block_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks
    lora: str | None = None
    index: int = 0  # choice index within its request
    sink: Callable[[Seq, str | None], None] | None = None  # token (None) or finish (reason)
    phase: Phase = Phase.WAITING
    generated: int = 0
    blocks: int = 0
    cached_tokens: int = 0
    ready_at: float = 0.0  # when its (re)prefill completes
    first_scheduled: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    preemptions: int = 0
    weights_valid: bool = True  # false while it runs on level-2 weights that were not reloaded
    pooling: bool = False  # embeddings/score/rerank: done after its prefill, generates nothing


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class Scheduler:
    max_num_seqs: int
    num_gpu_blocks: int
    block_size: int
    max_loras: int | None = None  # None: LoRA disabled, no adapter limit applies
    enable_prefix_caching: bool = True
    waiting: deque[Seq] = field(default_factory=deque)
    running: list[Seq] = field(default_factory=list)
    free_blocks: int = field(init=False)
    admit_up_to: int | None = None  # admit only seq_id <= this (None: all); -1 admits nothing
    _cache: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.free_blocks = self.num_gpu_blocks
        # Bounded, so a long run never grows memory: at most the pool size (as vLLM's cache).
        self._cache_capacity = max(1, min(self.num_gpu_blocks, 500_000))

    # --- queries -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        if self.num_gpu_blocks <= 0:
            return 0.0
        return (self.num_gpu_blocks - self.free_blocks) / self.num_gpu_blocks

    def running_loras(self) -> list[str]:
        return list(dict.fromkeys(s.lora for s in self.running if s.lora))

    def waiting_loras(self) -> list[str]:
        return list(dict.fromkeys(s.lora for s in self.waiting if s.lora))

    def num_deferred(self) -> int:
        """Waiting requests held back by the LoRA slot limit rather than by capacity."""
        active = set(self.running_loras())
        if self.max_loras is None or len(active) < self.max_loras:
            return 0
        return sum(1 for s in self.waiting if s.lora and s.lora not in active)

    def has_seqs_up_to(self, seq_id: int) -> bool:
        return any(s.seq_id <= seq_id for s in self.running) or any(s.seq_id <= seq_id for s in self.waiting)

    # --- changes -------------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        seq.phase = Phase.WAITING
        self.waiting.append(seq)

    def schedule(self, now: float) -> list[Seq]:
        """Admit waiting sequences in FIFO order; returns those admitted (now in PREFILL)."""
        admitted: list[Seq] = []
        if self.admit_up_to is not None and self.admit_up_to < 0:
            return admitted
        active_loras = set(self.running_loras())
        skipped: list[Seq] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.admit_up_to is not None and seq.seq_id > self.admit_up_to:
                break
            if (
                seq.lora
                and self.max_loras is not None
                and seq.lora not in active_loras
                and len(active_loras) >= self.max_loras
            ):
                skipped.append(self.waiting.popleft())  # deferred: later requests may pass it
                continue
            needed = blocks_for(seq.prompt_tokens + seq.generated + 1, self.block_size)
            if needed > self.free_blocks:
                break  # head-of-line: wait for blocks to free up
            self.waiting.popleft()
            self.free_blocks -= needed
            seq.blocks = needed
            seq.cached_tokens = self._lookup_prefix(seq)
            seq.phase = Phase.PREFILL
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            self.running.append(seq)
            if seq.lora:
                active_loras.add(seq.lora)
            admitted.append(seq)
        # Deferred ones go back to the head, in their original order.
        self.waiting.extendleft(reversed(skipped))
        return admitted

    def reserve_next_token(self, seq: Seq) -> list[Seq]:
        """Make room in the KV pool for `seq`'s next token; returns the sequences preempted for it
        (possibly `seq` itself, which then produces no token this step)."""
        preempted: list[Seq] = []
        need = blocks_for(seq.prompt_tokens + seq.generated + 1, self.block_size)
        while seq.blocks < need and seq.phase is not Phase.WAITING:
            if self.free_blocks > 0:
                self.free_blocks -= 1
                seq.blocks += 1
                continue
            victim = self.running[-1]  # most recently admitted first, as vLLM preempts
            self._preempt(victim)
            preempted.append(victim)
        return preempted

    def finish(self, seq: Seq) -> None:
        self._release(seq)
        seq.phase = Phase.FINISHED

    def abort(self, seq: Seq) -> None:
        if seq.phase is Phase.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.finish(seq)

    def all_seqs(self) -> Iterable[Seq]:
        yield from list(self.running)
        yield from list(self.waiting)

    def reset_prefix_cache(self) -> None:
        self._cache.clear()

    def mark_computed(self, seq: Seq) -> None:
        """`seq`'s prefill is done: its prompt blocks are now in the KV cache for later requests."""
        if not self.enable_prefix_caching:
            return
        for h in seq.block_hashes:
            self._cache[h] = None
            self._cache.move_to_end(h)
        while len(self._cache) > self._cache_capacity:
            self._cache.popitem(last=False)

    # --- internals -----------------------------------------------------------------------------
    def _preempt(self, seq: Seq) -> None:
        self._release(seq)
        seq.phase = Phase.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Seq) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def _lookup_prefix(self, seq: Seq) -> int:
        """Tokens of `seq`'s prompt found already computed in the prefix cache (whole blocks)."""
        if not self.enable_prefix_caching:
            return 0
        total = seq.prompt_tokens + seq.generated
        # At least one token is always computed, and hits are whole blocks: as vLLM, a full hit
        # recomputes the whole last block.
        limit = max(0, total - 1) // self.block_size
        hits = 0
        for h in seq.block_hashes[:limit]:
            if h not in self._cache:
                break
            self._cache.move_to_end(h)  # a hit refreshes its LRU position
            hits += 1
        return hits * self.block_size

def chained_block_hashes(token_ids: list[int], block_size: int, salt: str = "") -> tuple[int, ...]:
    """One hash per full block of `token_ids`, each covering all blocks before it (prefix identity)."""
    hashes: list[int] = []
    prev = hash(("mvllm-sim", salt))
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash((prev, tuple(token_ids[start : start + block_size])))
        hashes.append(prev)
    return tuple(hashes)
