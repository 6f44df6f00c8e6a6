#!/usr/bin/env bash
# The agent against real vLLM on a lent GPU machine (issue 4, item 10); see ../shared/gpu/README.md.
#
#   GPU machine:  bash .gpu/bin/install.sh && source /root/vllm-env.sh && bash scripts/gpu_check.sh
#   here (sim):   GPU_CHECK_ENGINE=sim PYTHON=.venv/bin/python OUT=/tmp/gc bash scripts/gpu_check.sh
#
# One agent, engine = "vllm", catalog: the tiny model twice (tiny-a with its LoRA, tiny-b without),
# each with gpu_memory_utilization 0.5, so both cannot be awake together; both have
# sleep_level_on_idle = 2, which the agent carries out as level 1 for tiny-a (vLLM 0.25 with
# --enable-lora dies in reload_weights after a level-2 sleep). Steps, each bounded, each printing
# `PASS|FAIL|SKIP <step> <seconds> <detail>`; a failed step does not stop the next ones:
#   load on first request (openai client via the agent's /v1) · chat · stream · the metrics the router
#   scores on · LoRA as a routable model · tiny-a sleep level 1 and wake (same output, LoRA too,
#   memory measured) · tiny-a asked for level 2 ends at level 1, wakes, same output, same engine ·
#   tiny-b evicts idle tiny-a (at level 1) · tiny-b sleep level 2 and wake (weights,
#   reload_weights, kv_cache; same output) · tiny-a back evicts tiny-b (at level 2) · LoRA output
#   as before the sleeps · tiny-b back from level 2 on a request · SIGTERM to the agent: no engine
#   process, no GPU memory left.
# Files under $OUT: gpu_check.log (this output), summary.json, agent.log, tiny-a.log, tiny-b.log,
# metrics.txt, state.json (at most 8, as the machine sends back).
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup GPU_CHECK /tmp/gpu_check_out /tmp/mvllm-gpu-check
export GPU_CHECK_LORA=${GPU_CHECK_LORA:-/root/tiny/tiny-lora}
export GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-330}   # whole run, teardown included, stays under this
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader \
  | sed 's/^/INFO gpu /' | tee -a "$OUT/gpu_check.log"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import json, os, shutil, signal, subprocess, sys, time, urllib.error, urllib.request

from scripts.gpu_lib import agent_toml, engine_keys
from scripts.gpu_lib import api as agent_api

ENGINE = os.environ["GPU_CHECK_ENGINE"]
MODEL = os.environ["GPU_CHECK_MODEL"]
LORA = os.environ["GPU_CHECK_LORA"]
WORK = os.environ["GPU_CHECK_WORK"]
OUT = os.environ["GPU_CHECK_OUT"]
BUDGET = float(os.environ["GPU_CHECK_BUDGET_S"])
T0 = time.monotonic()
TEARDOWN_S = 40.0  # kept back for SIGTERM and the leftover checks
TOKEN = "gpu-check-token"
PORT = 17171
BASE = f"http://127.0.0.1:{PORT}"
results = []
ref = {}  # greedy outputs to compare after sleeps

try:
    import openai
except ImportError:
    print("FAIL setup 0.0 the openai package is missing")
    sys.exit(1)


def left() -> float:
    return BUDGET - TEARDOWN_S - (time.monotonic() - T0)


def step(name, fn, limit):
    """Run one check with at most `limit` seconds (less if the budget is short); never raises."""
    limit = min(limit, left())
    if limit <= 1:
        print(f"SKIP {name} 0.0 out of time budget", flush=True)
        results.append({"step": name, "result": "SKIP", "seconds": 0.0, "detail": "out of time"})
        return None
    t = time.monotonic()
    try:
        detail = fn(limit)
        res = "PASS"
    except Exception as exc:  # a check failed: say why and go on
        detail, res = f"{type(exc).__name__}: {exc}"[:400], "FAIL"
    dt = time.monotonic() - t
    if dt > limit + 5:
        res, detail = "FAIL", f"took {dt:.1f}s > limit {limit:.0f}s; {detail}"
    print(f"{res} {name} {dt:.2f}s {detail}", flush=True)
    results.append({"step": name, "result": res, "seconds": round(dt, 3), "detail": str(detail)})
    return res == "PASS"


def api(method, path, body=None, timeout=30.0):
    return agent_api(BASE, TOKEN, method, path, body, timeout)


def state():
    code, raw = api("GET", "/state", timeout=10)
    assert code == 200, f"/state -> {code}"
    return json.loads(raw)


def inst(name):
    return next(i for i in state()["instances"] if i["name"] == name)


def gib(b):
    return f"{(b or 0) / 2**30:.2f}GiB"


def gpu_used():
    st = state()
    return sum(g["memory_used_bytes"] for g in st["gpus"])


def client(timeout):
    return openai.OpenAI(base_url=BASE + "/v1", api_key=TOKEN, timeout=timeout, max_retries=0)


def greedy(model, timeout=60):
    r = client(timeout).completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    return r.choices[0].text


# ------------------------------------------------------------------ config and agent
entry = f'''model = "{MODEL}"
gpu_memory_utilization = 0.5
max_model_len = 512
max_num_seqs = 16
sleep_level_on_idle = 2
{engine_keys(ENGINE, "startup_s = 2, ttft_ms = 20, itl_ms = 5")}'''
toml = agent_toml(ENGINE, PORT, TOKEN, (18100, 18140), f"{WORK}/logs", """gpu_memory_reserve_gib = 1.0
load_timeout = 240
ready_timeout = 240
stop_timeout = 20
idle_timeout = 0
unload_timeout = 0
""", f'''[models.tiny-a]
{entry}lora_adapters = {{ tiny-lora = "{LORA}" }}
max_lora_rank = 8

[models.tiny-b]
{entry}''')
cfg_path = os.path.join(WORK, "agent.toml")
with open(cfg_path, "w") as f:
    f.write(toml)
print(f"INFO engine={ENGINE} model={MODEL} lora={LORA} budget={BUDGET:.0f}s", flush=True)

baseline_used = None
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20).stdout
    baseline_used = sum(int(x) for x in out.split()) if out.strip() else None
except (OSError, subprocess.SubprocessError, ValueError):
    pass

agent_log = open(os.path.join(WORK, "agent.log"), "wb")
agent = subprocess.Popen([sys.executable, "-m", "mvllm", "agent", "--config", cfg_path, "--reap-stale"],
                         stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True)


def s_agent_up(limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert agent.poll() is None, f"agent exited with {agent.returncode}"
        try:
            with urllib.request.urlopen(BASE + "/health", timeout=2) as r:
                if r.status == 200:
                    st = state()
                    gpus = ", ".join(f"{g['name']} {gib(g['memory_used_bytes'])}/{gib(g['memory_total_bytes'])}" for g in st["gpus"])
                    return f"pid {agent.pid}; GPUs: {gpus or 'none seen'}; stale: {len(st['stale_engines'])}"
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("agent /health not 200")


def s_auth(limit):
    req = urllib.request.Request(BASE + "/state", headers={"Authorization": "Bearer wrong"})
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("bad token accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 401, e.code
    try:
        client(10).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass
    return "bad token 401, unknown model 404"


def s_first_request(limit):
    t = time.monotonic()
    r = client(limit).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hello"}], max_tokens=16)
    st = state()
    i = next(x for x in st["instances"] if x["name"] == "tiny-a")
    assert i["state"] == "ready", i["state"]
    # Whether NVML's per-process pids match the engine's session (not in every container).
    procs = [(p["pid"], p["instance"], gib(p["memory_bytes"])) for g in st["gpus"] for p in g["processes"]]
    return (f"cold load + first answer {time.monotonic() - t:.1f}s; {r.usage.completion_tokens} tokens; "
            f"engine memory {gib(i['memory_bytes']) if i['memory_bytes'] is not None else 'not attributed'}; "
            f"loads={i['loads']}; GPU processes {procs}")


def s_chat(limit):
    t = time.monotonic()
    r = client(limit).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
    return f"warm chat {1000 * (time.monotonic() - t):.0f}ms, {r.usage.completion_tokens} tokens"


def s_stream(limit):
    t = time.monotonic()
    first = None
    chunks = 0
    finish = None
    stream = client(limit).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Count"}],
                                                  max_tokens=24, stream=True)
    for c in stream:
        if first is None:
            first = time.monotonic() - t
        chunks += 1
        if c.choices and c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
    assert chunks >= 2 and finish, (chunks, finish)
    return f"{chunks} chunks, first after {1000 * first:.0f}ms, finish={finish}"


def s_metrics(limit):
    # Keep requests going so running > 0 can show; the router scores on running and waiting.
    import threading

    def load():
        for _ in range(3):
            try:
                client(30).completions.create(model="tiny-a", prompt="x", max_tokens=64)
            except Exception:
                pass
    th = [threading.Thread(target=load) for _ in range(4)]
    for x in th:
        x.start()
    time.sleep(1.5)
    code, raw = api("GET", "/metrics", timeout=10)
    for x in th:
        x.join(timeout=limit)
    text = raw.decode()
    with open(os.path.join(WORK, "metrics.txt"), "w") as f:
        f.write(text)
    need = ['vllm:num_requests_running{instance="tiny-a"', 'vllm:num_requests_waiting{instance="tiny-a"',
            "vllm:kv_cache_usage_perc{", "mvllm_agent_instance_state{", "mvllm_agent_in_flight{"]
    missing = [n for n in need if n not in text]
    assert code == 200 and not missing, f"missing {missing}"
    fams = len({line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("vllm:")})
    i = inst("tiny-a")
    has_sleep_state = "vllm:engine_sleep_state" in text
    return f"{fams} vllm:* names re-exported; /state running={i['running']} waiting={i['waiting']}; engine_sleep_state={has_sleep_state}"


def s_lora(limit):
    code, raw = api("GET", "/v1/models")
    ids = [m["id"] for m in json.loads(raw)["data"]]
    assert "tiny-lora" in ids, ids
    r = client(limit).chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert r.model == "tiny-lora", r.model
    ref["lora"] = greedy("tiny-lora")
    ref["base"] = greedy("tiny-a")
    differs = "differs from" if ref["lora"] != ref["base"] else "SAME AS"
    return f"listed and answered as {r.model}; greedy output {differs} the base model's; loaded: {inst('tiny-a')['loras']}"



def agent_log_lines(needle):
    agent_log.flush()
    with open(os.path.join(WORK, "agent.log"), errors="replace") as f:
        return [ln.strip() for ln in f if needle in ln]


def sleep_wake(name, level, expect=None, lora=None):
    """Sleep `name` asking for `level` (it must end at `expect`), wake it: same output, same engine."""
    expect = expect or level

    def run(limit):
        before = greedy(name)
        before_lora = greedy(lora) if lora else None
        i0 = inst(name)
        used0 = gpu_used()
        t = time.monotonic()
        code, raw = api("POST", f"/models/{name}/sleep?level={level}", timeout=limit)
        t_sleep = time.monotonic() - t
        assert code == 200, (code, raw[:300])
        answered = json.loads(raw)["sleep_level"]
        i = inst(name)
        assert answered == expect and i["state"] == "sleeping" and i["sleep_level"] == expect, (
            answered, i["state"], i["sleep_level"])
        used1 = gpu_used()
        t = time.monotonic()
        code, raw = api("POST", f"/models/{name}/wake", timeout=limit)
        t_wake = time.monotonic() - t
        assert code == 200, (code, raw[:300])
        after = greedy(name)
        i2 = inst(name)
        assert i2["state"] == "ready", i2["state"]
        # Empty text after a level-2 wake is what vLLM gives when reload_weights was skipped.
        assert after == before and len(after) > 0, f"output changed: {before!r} -> {after!r}"
        if lora:
            after_lora = greedy(lora)
            assert after_lora == before_lora and after_lora, f"LoRA output changed: {before_lora!r} -> {after_lora!r}"
        # Woken, not restarted (a failed wake restarts the engine cold: a new pid, one more load).
        assert (i2["pid"], i2["loads"], i2["restarts"]) == (i0["pid"], i0["loads"], i0["restarts"]), (i0, i2)
        ref[name] = after
        freed = used0 - used1
        assert ENGINE == "sim" or freed > 2**30, f"only {gib(freed)} freed"
        extra = f"asked level {level}, answered level {answered}; " if expect != level else f"level {level}; "
        if lora:
            extra += f"LoRA same output {after_lora[:20]!r}; "
        return (f"{extra}sleep {t_sleep:.2f}s, wake {t_wake:.2f}s; engine {gib(i0['memory_bytes'])} -> "
                f"{gib(i['memory_bytes'])} asleep; GPU used {gib(used0)} -> {gib(used1)}; same output "
                f"{after[:30]!r}; pid {i2['pid']} kept")
    return run


def s_lora_level2_downgraded(limit):
    run = sleep_wake("tiny-a", 2, expect=1, lora="tiny-lora")
    detail = run(limit)
    warned = agent_log_lines("sleeping at level 1 instead of 2")
    assert len(warned) == 1 and "tiny-a" in warned[0], warned
    cfg_warned = agent_log_lines("sleep_level_on_idle = 2 with LoRA")
    assert len(cfg_warned) == 1 and "models.tiny-a." in cfg_warned[0], cfg_warned
    return detail + "; warned once (and at config load)"


def s_evict_for_b(limit):
    t = time.monotonic()
    r = client(limit).chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    dt = time.monotonic() - t
    a, b = inst("tiny-a"), inst("tiny-b")
    assert b["state"] == "ready", b["state"]
    # tiny-a's sleep_level_on_idle = 2 is carried out at level 1: it runs with --enable-lora.
    assert a["state"] == "sleeping" and a["sleep_level"] == 1, (a["state"], a["sleep_level"])
    return (f"tiny-b cold load {dt:.1f}s; tiny-a sleeping level {a['sleep_level']} ({gib(a['memory_bytes'])}); "
            f"tiny-b {gib(b['memory_bytes'])}; {r.usage.completion_tokens} tokens")


def s_back_to_a(limit):
    t = time.monotonic()
    client(limit).chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    dt = time.monotonic() - t
    a, b = inst("tiny-a"), inst("tiny-b")
    assert a["state"] == "ready", a["state"]
    assert b["state"] == "sleeping" and b["sleep_level"] == 2, (b["state"], b["sleep_level"])
    assert a["loads"] == 1, f"tiny-a was restarted ({a['loads']} loads)"
    return f"tiny-a woke (level 1) in {dt:.2f}s; tiny-b evicted to sleep level {b['sleep_level']} ({gib(b['memory_bytes'])})"


def s_lora_after_wake(limit):
    # tiny-a went through sleep 1, sleep "2" (carried out as 1) and an eviction since.
    out = greedy("tiny-lora", timeout=limit)
    assert "lora" in ref, "no reference from lora_routable"
    assert out == ref["lora"], f"LoRA output changed after sleep/wake: {ref['lora']!r} -> {out!r}"
    return f"LoRA answers as before the sleeps: {out[:30]!r}"


def s_b_back_from_level2(limit):
    b0 = inst("tiny-b")
    t = time.monotonic()
    out = greedy("tiny-b", timeout=limit)
    dt = time.monotonic() - t
    a, b = inst("tiny-a"), inst("tiny-b")
    assert "tiny-b" in ref, "no reference from b_sleep2_wake_reload"
    assert out == ref["tiny-b"] and out, f"tiny-b output after a level-2 wake: {ref['tiny-b']!r} -> {out!r}"
    assert b["state"] == "ready" and b["pid"] == b0["pid"] and b["loads"] == 1, b
    assert a["state"] == "sleeping" and a["sleep_level"] == 1, (a["state"], a["sleep_level"])
    return f"tiny-b woke from level 2 (reload_weights) for a request in {dt:.2f}s, same output; tiny-a back to level 1"


def engine_procs():
    """Processes started by this agent's engines: our agent's launch marker in their environment, or VLLM::."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{p}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        # Only this agent's engines (others' tests may run sims beside us); any VLLM:: worker on the GPU box.
        ours = f"MVLLM_AGENT_ID={agent.pid}:".encode() in env
        if not zombie and (ours or (ENGINE == "vllm" and cmd.startswith("VLLM::"))):
            found.append(f"{p}:{cmd[:60]}")
    return found


def s_sigterm(limit):
    st = state()
    pids = [i["pid"] for i in st["instances"] if i["pid"]]
    t = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=limit)
    dt = time.monotonic() - t
    left_procs = engine_procs()
    assert not left_procs, f"left running: {left_procs}"
    assert agent.returncode == 0, f"agent exit code {agent.returncode}"
    detail = f"agent gone in {dt:.1f}s (engines {pids}); no engine process left"
    if baseline_used is not None:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        used = sum(int(x) for x in subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                                    capture_output=True, text=True, timeout=20).stdout.split())
        assert not out, f"compute apps still on the GPU: {out}"
        assert used <= baseline_used + 256, f"GPU memory used {used} MiB vs {baseline_used} MiB before"
        detail += f"; GPU memory {used} MiB (before the run {baseline_used} MiB), no compute app"
    return detail


if not step("agent_up", s_agent_up, 60):
    BUDGET = 0  # nothing to check without an agent: every step below says SKIP
step("auth_and_unknown_model", s_auth, 20)
step("load_on_first_request", s_first_request, 240)
step("chat", s_chat, 30)
step("stream", s_stream, 30)
step("metrics", s_metrics, 40)
step("lora_routable", s_lora, 30)
step("a_lora_sleep1_wake", sleep_wake("tiny-a", 1, lora="tiny-lora"), 60)
step("a_lora_level2_asked_ends_at_1", s_lora_level2_downgraded, 60)
step("evict_a_for_b", s_evict_for_b, 240)
step("b_sleep2_wake_reload", sleep_wake("tiny-b", 2), 60)
step("back_to_a_evicts_b", s_back_to_a, 60)
step("lora_after_wake", s_lora_after_wake, 30)
step("b_back_from_level2", s_b_back_from_level2, 60)
try:
    with open(os.path.join(OUT, "state.json"), "w") as f:
        json.dump(state(), f, indent=1)
except Exception as exc:
    print(f"INFO state.json not written: {exc}")
# Teardown has its own reserve: run it whatever is left of the budget.
TEARDOWN_LIMIT = max(15.0, TEARDOWN_S - 5)
BUDGET = max(BUDGET, time.monotonic() - T0) + TEARDOWN_S
step("sigterm_no_leftovers", s_sigterm, TEARDOWN_LIMIT)
if agent.poll() is None:
    os.killpg(agent.pid, signal.SIGKILL)
    print("INFO agent killed (SIGKILL) after the checks")
for p in engine_procs():  # never leave an engine behind, even after a failure
    pid = int(p.split(":")[0])
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
agent_log.close()

def tail_copy(src, dst, lines=400):
    try:
        with open(src, errors="replace") as f:
            data = f.readlines()[-lines:]
        with open(dst, "w") as f:
            f.writelines(data)
    except OSError:
        pass

tail_copy(os.path.join(WORK, "agent.log"), os.path.join(OUT, "agent.log"), 600)
for m in ("tiny-a", "tiny-b"):
    tail_copy(os.path.join(WORK, "logs", f"{m}.log"), os.path.join(OUT, f"{m}.log"))
if os.path.exists(os.path.join(WORK, "metrics.txt")):
    shutil.copy(os.path.join(WORK, "metrics.txt"), os.path.join(OUT, "metrics.txt"))
n_pass = sum(r["result"] == "PASS" for r in results)
n_fail = sum(r["result"] == "FAIL" for r in results)
total = time.monotonic() - T0
n_skip = len(results) - n_pass - n_fail
verdict = "FAIL" if n_fail else "INCOMPLETE" if n_skip else "PASS"
with open(os.path.join(OUT, "summary.json"), "w") as f:
    json.dump({"engine": ENGINE, "total_s": round(total, 1), "pass": n_pass, "fail": n_fail, "skip": n_skip, "steps": results}, f, indent=1)
print(f"{verdict} summary {total:.1f}s {n_pass} passed, {n_fail} failed, {n_skip} skipped", flush=True)
sys.exit(0 if verdict == "PASS" else 1)
PYEOF
rc=${PIPESTATUS[0]}
exit "$rc"
