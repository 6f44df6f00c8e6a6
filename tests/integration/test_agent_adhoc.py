"""Ad-hoc instances and `assign` on a real `mvllm agent` process (engine = "sim"), the openai client via its /v1.

Covers: an ad-hoc instance started with custom flags (seen in the engine's argv), chat by its name
and by the model id, marked adhoc in /state; its ttl postponed by a stream in flight, then the
instance stopped and forgotten; DELETE; flags outside the allow-list refused by name; assign
without restart (saved, applies at the next start), with restart (new argv and GPU), surviving an
agent restart, refused when invalid, and kept at run time when agent.toml is read-only.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import tomllib

from tests.integration.agent_support import TOKEN, model, pid_alive, running_agent
from tests.support import wait_until

FAST_ADHOC = {
    "max_instances": 2,
    "default_ttl": 120,
    "memory_gib": 4,
    "base_params": {"max_num_seqs": 8},
    "sim": {"ttft_ms": 5, "itl_ms": 2, "weights_gib": 1},
}


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")[:-1]


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.split("=", 1) for item in f.read().decode(errors="replace").split("\0") if "=" in item)


def error_of(raw: bytes) -> dict:
    return json.loads(raw)["error"]


def test_adhoc_instance_start_chat_ttl_delete_and_bad_flags(tmp_path: Path) -> None:
    with running_agent(tmp_path, model("m1"), top={"adhoc": FAST_ADHOC, "drain_timeout": 10}) as agent:
        # Flags outside the allow-list, of a wrong type, or the agent's own: 400 naming the flag.
        code, raw = agent.api("POST", "/instances", {"model": "org/x", "params": {"tokenizer_pool_size": 2}})
        err = error_of(raw)
        assert code == 400 and err["code"] == "invalid_parameter", raw
        assert "'tokenizer_pool_size' is not allowed" in err["message"] and "max_model_len" in err["message"]
        code, raw = agent.api("POST", "/instances", {"model": "org/x", "params": {"trust_remote_code": True}})
        assert code == 400 and "allow_trust_remote_code" in error_of(raw)["message"]
        code, raw = agent.api("POST", "/instances", {"model": "org/x", "params": {"max_model_len": "lots"}})
        assert code == 400 and error_of(raw)["message"].startswith("max_model_len:"), raw
        code, raw = agent.api("POST", "/instances", {"model": "org/x", "params": {"port": 1}})
        assert code == 400 and "set by the agent itself" in error_of(raw)["message"]
        code, raw = agent.api("POST", "/instances", {"model": "org/x", "colour": "red"})
        assert code == 400 and "colour" in error_of(raw)["message"]
        assert agent.api("GET", "/instances")[1] and json.loads(agent.api("GET", "/instances")[1])["instances"] == []

        body = {
            "model": "org/custom-7b",
            "name": "cx",
            "ttl": 2.5,
            "params": {"max_model_len": 2048, "enforce_eager": True, "dtype": "float16", "enable_prefix_caching": False},
        }
        code, raw = agent.api("POST", "/instances", body)
        assert code == 201, raw
        doc = json.loads(raw)
        assert doc["state"] == "ready" and doc["adhoc"] and doc["served_model_names"] == ["cx", "org/custom-7b"]
        assert doc["params"] == {"max_num_seqs": 8, **body["params"]}  # base_params under the request's
        assert abs(doc["expires_at"] - (doc["created_at"] + 2.5)) < 0.01
        argv = cmdline(doc["pid"])
        assert argv[argv.index("serve") + 1] == "org/custom-7b"
        for flag in ("--enforce-eager", "--no-enable-prefix-caching"):
            assert flag in argv, argv
        assert argv[argv.index("--max-model-len") + 1] == "2048" and argv[argv.index("--dtype") + 1] == "float16"
        assert argv[argv.index("--max-num-seqs") + 1] == "8"

        # Routed by either served name; a name taken is refused.
        assert agent.chat("cx") and agent.chat("org/custom-7b")
        assert agent.api("POST", "/instances", {"model": "org/y", "name": "m1"})[0] == 409
        st = agent.state()
        entry = next(i for i in st["instances"] if i["name"] == "cx")
        assert entry["adhoc"] and entry["expires_at"] == doc["expires_at"]
        assert next(c for c in st["catalog"] if c["name"] == "cx")["adhoc"]
        assert not next(i for i in st["instances"] if i["name"] == "m1")["adhoc"]

        # A stream in flight when the ttl ends postpones the stop until it is done.
        stream = agent.client().chat.completions.create(
            model="cx", messages=[{"role": "user", "content": "count"}], max_tokens=1500, stream=True
        )
        pieces, during = 0, None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
            if during is None and time.time() > doc["expires_at"] + 0.5:
                during = agent.api("GET", "/instances/cx")  # past its ttl, the stream still running
        ended = time.monotonic()
        assert during is not None, "the stream should outlast the ttl"
        assert during[0] == 200 and json.loads(during[1])["state"] == "ready", during
        assert pieces >= 1000
        wait_until(lambda: all(i["name"] != "cx" for i in agent.state()["instances"]), 10, "expired instance gone")
        removed_after = time.monotonic() - ended
        assert removed_after < 5, removed_after
        assert not pid_alive(doc["pid"])
        assert agent.api("GET", "/instances/cx")[0] == 404
        code, raw = agent.api("POST", "/v1/chat/completions", {"model": "cx", "messages": [{"role": "user", "content": "x"}]})
        assert code == 404
        assert "ad-hoc instance cx: ttl of 2.5 s is over" in agent.proc.log()

        # No ttl (0), a made-up name; DELETE drains and stops it; the limit of [adhoc] max_instances.
        code, raw = agent.api("POST", "/instances", {"model": "org/other", "ttl": 0, "devices": [0]})
        assert code == 201, raw
        other = json.loads(raw)
        assert other["expires_at"] is None and other["name"].startswith("other-")
        code, raw = agent.api("POST", "/instances", {"model": "org/third", "ttl": 0})
        assert code == 201, raw
        third = json.loads(raw)["name"]
        code, raw = agent.api("POST", "/instances", {"model": "org/fourth"})
        assert code == 409 and "max_instances = 2" in error_of(raw)["message"]
        code, raw = agent.api("DELETE", f"/instances/{other['name']}")
        assert code == 200 and json.loads(raw)["removed"], raw
        assert not pid_alive(other["pid"])
        assert agent.api("GET", f"/instances/{other['name']}")[0] == 404
        assert agent.api("DELETE", "/instances/m1")[0] == 404  # a catalog model is not ad hoc
        assert [i["name"] for i in json.loads(agent.api("GET", "/instances")[1])["instances"]] == [third]


def test_assign_saves_restarts_with_new_flags_and_survives_an_agent_restart(tmp_path: Path) -> None:
    catalog = model("m1", 'extra_args = ["--seed", "1"]') + model("m2")
    with running_agent(tmp_path, catalog, sim_gpus=(24, 24), top={"drain_timeout": 5}) as agent:
        original = agent.config.read_text()
        assert agent.chat("m1")
        pid = agent.inst("m1")["pid"]

        # Refused: unknown field, a GPU the agent does not have, a bad fraction; nothing changes.
        code, raw = agent.api("POST", "/models/m1/assign", {"gpus": [1]})
        assert code == 400 and "gpus" in error_of(raw)["message"]
        code, raw = agent.api("POST", "/models/m1/assign", {"devices": [5]})
        assert code == 400 and "models.m1.devices" in error_of(raw)["message"] and "sim_gpus" in error_of(raw)["message"]
        code, raw = agent.api("POST", "/models/m1/assign", {"gpu_memory_utilization": 1.5})
        assert code == 400 and "gpu_memory_utilization" in error_of(raw)["message"]
        assert agent.config.read_text() == original

        # Without restart: saved at once, the running engine keeps its settings.
        code, raw = agent.api("POST", "/models/m1/assign", {"devices": "1", "gpu_memory_utilization": 0.25, "max_model_len": 1024})
        assert code == 200, raw
        doc = json.loads(raw)
        assert doc["applied"] == "next_start" and doc["saved"]["saved"], doc
        assert doc["pending"]["devices"] == [1] and "memory_gib" not in doc["pending"]
        assert agent.inst("m1")["pid"] == pid and agent.inst("m1")["devices"] == [0]
        saved = tomllib.loads(agent.config.read_text())
        assert saved["models"]["m1"]["devices"] == [1] and saved["models"]["m1"]["gpu_memory_utilization"] == 0.25
        assert "memory_gib" not in saved["models"]["m1"] and saved["models"]["m2"]["memory_gib"] == 10
        assert saved["token"] == TOKEN and saved["sim_gpus"] == [{"memory_gib": 24}, {"memory_gib": 24}]
        assert Path(str(agent.config) + ".bak").read_text() == original

        # With restart: a stream in flight finishes first, then the engine starts again with the new flags on GPU 1.
        first, streamed = threading.Event(), {}

        def stream_it() -> None:
            pieces, finish = 0, None
            for chunk in agent.client().chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "go"}], max_tokens=400, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces += 1
                    first.set()
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            streamed.update(pieces=pieces, finish=finish)

        streamer = threading.Thread(target=stream_it)
        streamer.start()
        assert first.wait(20)
        code, raw = agent.api("POST", "/models/m1/assign", {"extra_args": ["--seed", "7"], "restart": True})
        streamer.join(30)
        assert code == 200, raw
        assert streamed["finish"] == "length" and streamed["pieces"] >= 390, streamed  # drained, not cut
        doc = json.loads(raw)
        assert doc["applied"] == "restarted" and doc["pending"] is None
        inst = agent.inst("m1")
        assert inst["state"] == "ready" and inst["pid"] != pid and not pid_alive(pid) and inst["devices"] == [1]
        argv = cmdline(inst["pid"])
        assert argv[argv.index("--max-model-len") + 1] == "1024" and argv[argv.index("--seed") + 1] == "7"
        assert environ(inst["pid"])["CUDA_VISIBLE_DEVICES"] == "1"
        util = float(argv[argv.index("--gpu-memory-utilization") + 1])
        assert 0.2 <= util <= 0.25, util
        st = agent.state()
        assert st["gpus"][1]["memory_used_bytes"] > 0 and st["gpus"][0]["memory_used_bytes"] == 0
        assert agent.chat("m1")

        # The agent restarts: the catalog it reads is the assigned one.
        agent.stop()
        agent.start()
        entry = next(c for c in agent.state()["catalog"] if c["name"] == "m1")
        assert entry["devices"] == [1] and entry["gpu_memory_utilization"] == 0.25 and entry["max_model_len"] == 1024
        assert agent.chat("m1")
        argv = cmdline(agent.inst("m1")["pid"])
        assert argv[argv.index("--seed") + 1] == "7"

        # A read-only agent.toml: the change holds at run time, the answer says it was not saved.
        before = agent.config.read_text()
        os.chmod(agent.config, 0o444)
        try:
            code, raw = agent.api("POST", "/models/m2/assign", {"memory_gib": 6})
        finally:
            os.chmod(agent.config, 0o644)
        assert code == 200, raw
        doc = json.loads(raw)
        assert doc["applied"] == "now" and not doc["saved"]["saved"] and "read-only" in doc["saved"]["reason"]
        assert doc["catalog"]["memory_bytes"] == 6 * 1024**3
        assert agent.config.read_text() == before
