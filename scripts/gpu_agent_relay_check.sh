#!/usr/bin/env bash
# The agent's /v1 relay under steady load against real vLLM (issue 16, item 6): one agent, one engine
# of the tiny model, requests straight to the agent at a fixed rate, in bursts separated by idle gaps
# longer than vLLM's 5 s keep-alive, so pooled connections the engine has closed are met again.
# Counts every answer by status; the agent must give no 502.
#
#   GPU machine:  bash .gpu/bin/install.sh && source /root/vllm-env.sh && bash scripts/gpu_agent_relay_check.sh
#   here (sim):   RELAY_CHECK_ENGINE=sim PYTHON=.venv/bin/python OUT=/tmp/rc bash scripts/gpu_agent_relay_check.sh
#
# Knobs: RELAY_CHECK_RATE (100 req/s), RELAY_CHECK_BURSTS (4 bursts of 2 s), RELAY_CHECK_GAP_S (5.5).
# Files under $OUT: relay_check.log, summary.json, agent.log, engine.log.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup RELAY_CHECK /tmp/gpu_relay_out /tmp/mvllm-relay-check
export RELAY_CHECK_RATE=${RELAY_CHECK_RATE:-100} RELAY_CHECK_BURSTS=${RELAY_CHECK_BURSTS:-4}
export RELAY_CHECK_GAP_S=${RELAY_CHECK_GAP_S:-5.5}
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/relay_check.log"
import asyncio, json, os, shutil, subprocess, time

import aiohttp

from scripts.gpu_lib import agent_toml, engine_keys, stop

ENGINE = os.environ["RELAY_CHECK_ENGINE"]
OUT = os.environ["RELAY_CHECK_OUT"]
PY = os.environ["RELAY_CHECK_PY"]
MODEL = os.environ["RELAY_CHECK_MODEL"]
WORK = os.environ["RELAY_CHECK_WORK"]
RATE = float(os.environ["RELAY_CHECK_RATE"])
BURSTS = int(os.environ["RELAY_CHECK_BURSTS"])
GAP = float(os.environ["RELAY_CHECK_GAP_S"])
TOKEN = "relay-check-token"
PORT = 17272
BASE = f"http://127.0.0.1:{PORT}"

with open(os.path.join(WORK, "agent.toml"), "w") as f:
    f.write(agent_toml(ENGINE, PORT, TOKEN, (18150, 18160), f"{WORK}/logs", """load_timeout = 240
ready_timeout = 240
idle_timeout = 0
unload_timeout = 0""", f'''[models.tiny]
model = "{MODEL}"
gpu_memory_utilization = 0.3
max_model_len = 512
max_num_seqs = 64
{engine_keys(ENGINE, "startup_s = 1, ttft_ms = 20, itl_ms = 5")}'''))

agent_log = open(os.path.join(OUT, "agent.log"), "w")
agent = subprocess.Popen([PY, "-m", "mvllm", "agent", "--config", os.path.join(WORK, "agent.toml")],
                         stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True)
HDRS = {"Authorization": f"Bearer {TOKEN}"}


async def one(session, statuses, errors):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8, "temperature": 0}
    try:
        async with session.post(BASE + "/v1/chat/completions", json=body, headers=HDRS) as r:
            await r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1
    except Exception as exc:  # a transport error seen by the client counts as a failure too
        errors.append(f"{type(exc).__name__}: {exc}"[:200])


async def main():
    summary = {"engine": ENGINE, "rate": RATE, "bursts": BURSTS, "gap_s": GAP}
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.monotonic()
        while True:  # the first request loads the model (bounded by load_timeout)
            try:
                async with session.post(BASE + "/v1/chat/completions", headers=HDRS, json={
                        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}) as r:
                    await r.read()
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() - t0 > 280:
                print("FAIL relay_check the model did not load")
                return summary
            await asyncio.sleep(1.0)
        summary["load_s"] = round(time.monotonic() - t0, 1)
        print(f"INFO model answered after {summary['load_s']} s")
        statuses, errors = {}, []
        for burst in range(BURSTS):
            tasks, start = [], time.monotonic()
            for k in range(int(RATE * 2)):
                await asyncio.sleep(max(0.0, start + k / RATE - time.monotonic()))
                tasks.append(asyncio.ensure_future(one(session, statuses, errors)))
            await asyncio.gather(*tasks)
            print(f"INFO burst {burst + 1}: {statuses} errors {len(errors)}")
            await asyncio.sleep(GAP)  # longer than the engine's keep-alive: idle pooled connections close
        total = sum(statuses.values()) + len(errors)
        bad = total - statuses.get(200, 0)
        summary.update(requests=total, statuses=statuses, transport_errors=errors[:10], failed=bad)
        print(f"{'PASS' if bad == 0 else 'FAIL'} relay_check {total} requests at {RATE:.0f} req/s, "
              f"{bad} failed; statuses {statuses}")
    return summary


try:
    summary = asyncio.run(main())
    with open(os.path.join(OUT, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
finally:
    stop(agent)
    logs = os.path.join(WORK, "logs")
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        if name.startswith("tiny"):
            shutil.copy(os.path.join(logs, name), os.path.join(OUT, "engine.log"))
            break
PYEOF
