#!/usr/bin/env bash
# Cache-aware routing against real vLLM (issue 13, item 6): two engines of the tiny model behind the
# router, the same shared-prefix workload under least-score and under cache-aware, and vLLM's own
# prefix-cache counters (vllm:prefix_cache_hits / queries, in tokens) read from each engine.
#
#   GPU machine:  bash .gpu/bin/install.sh && source /root/vllm-env.sh && bash scripts/gpu_prefix_check.sh
#   here (sim):   PREFIX_CHECK_ENGINE=sim PYTHON=.venv/bin/python OUT=/tmp/gp bash scripts/gpu_prefix_check.sh
#
# Workload: 12 conversations, each with its own 300-word system prompt (within the tiny model's 2,048 positions), 4 turns each, sent
# interleaved 4 at a time (turn k of every conversation before turn k+1 of any), temperature 0,
# 16 tokens per answer. Between legs both engines' prefix caches are reset (/reset_prefix_cache,
# which needs VLLM_SERVER_DEV_MODE=1), so each leg starts cold. Files under $OUT: prefix_check.log,
# summary.json, engine-a.log, engine-b.log, router.log.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup PREFIX_CHECK /tmp/gpu_prefix_out /tmp/mvllm-prefix-check
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/prefix_check.log"
import json, os, random, signal, subprocess, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

ENGINE = os.environ["PREFIX_CHECK_ENGINE"]
MODEL = os.environ["PREFIX_CHECK_MODEL"]
WORK = os.environ["PREFIX_CHECK_WORK"]
OUT = os.environ["PREFIX_CHECK_OUT"]
PY = os.environ["PREFIX_CHECK_PY"]
PORTS = {"engine-a": 18101, "engine-b": 18102}
ROUTER_PORT = 18188
SERVED = "tiny"
procs = []


def get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def post(url, doc, timeout=60.0):
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read()


def wait_ok(url, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            get(url, 2.0)
            return True
        except Exception:
            time.sleep(0.5)
    return False


def start_engine(name, port):
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    if ENGINE == "sim":
        cmd = [PY, "-m", "mvllm", "sim", "serve", MODEL, "--sim-prefill-ms-per-token", "0.2"]
    else:
        cmd = ["vllm", "serve", MODEL, "--enforce-eager", "--gpu-memory-utilization", "0.15",
               "--max-model-len", "2048", "--enable-prefix-caching"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED]
    log = open(os.path.join(OUT, f"{name}.log"), "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    procs.append(p)
    return p


def counters(port):
    hits = queries = 0.0
    for line in get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def system_prompt(i):
    rng = random.Random(1000 + i)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember", "maple", "quartz"]
    return f"Conversation {i} rules: " + " ".join(rng.choice(words) for _ in range(300))


def run_leg(policy):
    cfg = os.path.join(WORK, f"servers-{policy}.toml")
    servers = ",\n".join(
        f'  {{ url = "http://127.0.0.1:{p}", name = "{n}", max_concurrent_requests = 8 }}'
        for n, p in PORTS.items())
    with open(cfg, "w") as f:
        f.write(f'[router]\nport = {ROUTER_PORT}\n[policy]\ntype = "{policy}"\n'
                f'[servers]\nservers = [\n{servers}\n]\n[config]\nscrape_interval = 0.5\n')
    log = open(os.path.join(OUT, "router.log"), "a")
    router = subprocess.Popen([PY, "-m", "mvllm", "run", "--console", "--config", cfg,
                               "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    procs.append(router)
    try:
        base = f"http://127.0.0.1:{ROUTER_PORT}"
        if not wait_ok(base + "/health", 30):
            return {"policy": policy, "error": "router did not start"}
        time.sleep(2.0)  # both nodes scraped and healthy
        for port in PORTS.values():
            try:
                post(f"http://127.0.0.1:{port}/reset_prefix_cache", {})
            except Exception as exc:
                print(f"INFO reset_prefix_cache on {port}: {exc}")
        before = {n: counters(p) for n, p in PORTS.items()}
        convs = {i: [{"role": "system", "content": system_prompt(i)}] for i in range(12)}
        share, ttfts, routes, failures = {}, [], {}, 0
        for turn in range(4):
            def one(i):
                msgs = convs[i] + [{"role": "user", "content": f"Question {turn} of {i}: go on."}]
                t = time.monotonic()
                # Completions over the conversation's text: the tiny test model has no chat
                # template (vLLM answers chat with 400), and the router indexes a prompt the same way.
                prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
                status, hdrs, body = post(base + "/v1/completions", {
                    "model": SERVED, "prompt": prompt, "max_tokens": 16, "temperature": 0})
                dt = time.monotonic() - t
                text = json.loads(body)["choices"][0]["text"]
                return i, msgs, text, dt, hdrs.get("x-mvllm-node", "?"), hdrs.get("x-mvllm-route", "")
            with ThreadPoolExecutor(4) as pool:
                for fut in [pool.submit(one, i) for i in range(12)]:
                    try:
                        i, msgs, text, dt, node, route = fut.result()
                    except Exception as exc:
                        failures += 1
                        print(f"INFO request failed: {exc}")
                        continue
                    convs[i] = msgs + [{"role": "assistant", "content": text}]
                    share[node] = share.get(node, 0) + 1
                    ttfts.append(dt)
                    reason = next((p.split("=", 1)[1] for p in route.split("; ")
                                   if p.startswith("reason=")), "")
                    routes[reason] = routes.get(reason, 0) + 1
        after = {n: counters(p) for n, p in PORTS.items()}
        hits = sum(after[n][0] - before[n][0] for n in PORTS)
        queries = sum(after[n][1] - before[n][1] for n in PORTS)
        return {"policy": policy, "requests": len(ttfts), "failures": failures,
                "hit_ratio": round(hits / queries, 3) if queries else None,
                "prefix_hits_tokens": hits, "prefix_queries_tokens": queries,
                "mean_latency_ms": round(1000 * sum(ttfts) / max(1, len(ttfts)), 1),
                "share": share, "route_reasons": routes}
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(15)
        except subprocess.TimeoutExpired:
            router.kill()


try:
    t0 = time.monotonic()
    for n, p in PORTS.items():
        # One after the other: an engine that profiles its memory while the other is still
        # allocating sees no room for its KV cache (vLLM: "No available memory for the cache blocks").
        start_engine(n, p)
        ok = wait_ok(f"http://127.0.0.1:{p}/health", 240)
        if not ok:
            break
    print(f"INFO engines ready={ok} after {time.monotonic() - t0:.1f}s")
    results = [run_leg("least-score"), run_leg("cache-aware")] if ok else []
    for r in results:
        print("RESULT " + json.dumps(r))
    if len(results) == 2 and all("hit_ratio" in r for r in results):
        ls, ca = results
        verdict = "PASS" if (ca["hit_ratio"] or 0) > (ls["hit_ratio"] or 0) and ca["failures"] == 0 else "FAIL"
        print(f"{verdict} cache-aware hit ratio {ca['hit_ratio']} vs least-score {ls['hit_ratio']}")
    with open(os.path.join(OUT, "summary.json"), "w") as f:
        json.dump({"engine": ENGINE, "legs": results}, f, indent=1)
finally:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
PYEOF
