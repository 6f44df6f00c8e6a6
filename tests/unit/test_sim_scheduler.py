from mvllm.sim.scheduler import Phase, Scheduler, Seq, chained_block_hashes


def seq(i, prompt=10, lora=None, hashes=()):
    return Seq(seq_id=i, prompt_tokens=prompt, target_tokens=5, finish_reason="length", arrival=0.0,
               lora=lora, block_hashes=hashes)


def test_fifo_admission_up_to_max_num_seqs():
    s = Scheduler(max_num_seqs=2, num_gpu_blocks=100, block_size=16)
    seqs = [seq(i) for i in range(5)]
    for q in seqs:
        s.add(q)
    admitted = s.schedule(0.0)
    assert admitted == seqs[:2]
    assert (s.num_running, s.num_waiting) == (2, 3)
    assert all(q.phase is Phase.PREFILL for q in admitted)
    s.finish(seqs[0])
    assert s.schedule(1.0) == [seqs[2]]  # the oldest waiting one goes next
    assert (s.num_running, s.num_waiting) == (2, 2)


def test_kv_pool_blocks_the_queue_head():
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=4, block_size=16)
    big, small = seq(1, prompt=60), seq(2, prompt=5)  # big needs 4 blocks (61 tokens), small 1
    s.add(seq(0, prompt=20))  # 2 blocks
    s.add(big)
    s.add(small)
    assert [q.seq_id for q in s.schedule(0.0)] == [0]
    assert s.num_waiting == 2  # big cannot fit; small waits behind it (head-of-line, FCFS)
    assert s.kv_usage == 0.5


def test_lora_slots_defer_other_adapters_but_let_later_requests_pass():
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=100, block_size=16, max_loras=1)
    a, b, base, a2 = seq(1, lora="a"), seq(2, lora="b"), seq(3), seq(4, lora="a")
    for q in (a, b, base, a2):
        s.add(q)
    admitted = s.schedule(0.0)
    assert admitted == [a, base, a2]
    assert list(s.waiting) == [b]
    assert s.num_deferred() == 1
    assert s.running_loras() == ["a"] and s.waiting_loras() == ["b"]


def test_preemption_frees_the_newest_request_when_blocks_run_out():
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=2, block_size=4)
    old, new = seq(1, prompt=3), seq(2, prompt=3)
    s.add(old)
    s.add(new)
    assert s.schedule(0.0) == [old, new]  # one block each (3 prompt tokens + 1)
    old.generated = 1  # 4 tokens: the next one needs a second block
    preempted = s.reserve_next_token(old)
    assert preempted == [new]
    assert new.phase is Phase.WAITING and new.preemptions == 1 and list(s.waiting) == [new]
    assert old.blocks == 2 and s.free_blocks == 0


def test_prefix_cache_hits_count_whole_leading_blocks():
    tokens = list(range(40))
    hashes = chained_block_hashes(tokens, 16)
    assert len(hashes) == 2  # 40 tokens: two full blocks of 16
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=100, block_size=16)
    first, second = seq(1, prompt=40, hashes=hashes), seq(2, prompt=40, hashes=hashes)
    s.add(first)
    s.schedule(0.0)
    assert first.cached_tokens == 0
    s.mark_computed(first)
    s.add(second)
    s.schedule(0.0)
    assert second.cached_tokens == 32
    other = chained_block_hashes([99, *tokens[1:]], 16)  # first block differs: nothing matches
    third = seq(3, prompt=40, hashes=other)
    s.add(third)
    s.schedule(0.0)
    assert third.cached_tokens == 0
    s.reset_prefix_cache()
    fourth = seq(4, prompt=40, hashes=hashes)
    s.add(fourth)
    s.schedule(0.0)
    assert fourth.cached_tokens == 0


def test_prefix_still_prefilling_is_not_a_hit():
    hashes = chained_block_hashes(list(range(40)), 16)
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=100, block_size=16)
    first, second, third = (seq(i, prompt=40, hashes=hashes) for i in (1, 2, 3))
    s.add(first)
    s.add(second)
    s.schedule(0.0)  # both admitted together: neither block is computed yet
    assert first.cached_tokens == 0 and second.cached_tokens == 0
    s.mark_computed(first)
    s.add(third)
    s.schedule(0.0)
    assert third.cached_tokens == 32


def test_full_hit_recomputes_the_last_block_as_vllm():
    hashes = chained_block_hashes(list(range(32)), 16)  # exactly two full blocks
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=100, block_size=16)
    first, second = seq(1, prompt=32, hashes=hashes), seq(2, prompt=32, hashes=hashes)
    s.add(first)
    s.schedule(0.0)
    s.mark_computed(first)
    s.add(second)
    s.schedule(0.0)
    # vLLM caps the hit at n - 1 tokens, block-aligned: 31 // 16 = one block.
    assert second.cached_tokens == 16


def test_prefix_caching_off_never_hits():
    hashes = chained_block_hashes(list(range(40)), 16)
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=100, block_size=16, enable_prefix_caching=False)
    first, second = seq(1, prompt=40, hashes=hashes), seq(2, prompt=40, hashes=hashes)
    s.add(first)
    s.schedule(0.0)
    s.mark_computed(first)
    s.add(second)
    s.schedule(0.0)
    assert second.cached_tokens == 0


def test_admit_limit_holds_newer_requests():
    s = Scheduler(max_num_seqs=10, num_gpu_blocks=100, block_size=16)
    for i in (1, 2, 3):
        s.add(seq(i))
    s.admit_up_to = 2
    assert [q.seq_id for q in s.schedule(0.0)] == [1, 2]
    s.admit_up_to = -1
    assert s.schedule(0.0) == []
    assert s.has_seqs_up_to(2) and s.num_waiting == 1


def test_abort_releases_blocks_and_leaves_queue():
    s = Scheduler(max_num_seqs=1, num_gpu_blocks=10, block_size=16)
    a, b = seq(1), seq(2)
    s.add(a)
    s.add(b)
    s.schedule(0.0)
    s.abort(b)
    s.abort(a)
    assert s.num_running == 0 and s.num_waiting == 0 and s.free_blocks == 10
    assert a.phase is Phase.FINISHED and b.phase is Phase.FINISHED
