"""Ad-hoc instances and `assign` through the router (in this process) to two real `mvllm agent`
processes (engine = "sim"), by HTTP with the openai client and by the `mvllm` CLI as subprocesses.

Covers: POST /admin/instances picking the agent with the most free GPU memory, a request routed by
the new instance's name at once, a flag outside the allow-list refused by name, GET and DELETE
/admin/instances, `mvllm instance start|ls|rm`, `mvllm assign --restart` and
POST /admin/models/{model}/assign.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.integration.agent_support import Agent, model
from tests.integration.test_agent_adhoc import FAST_ADHOC, cmdline
from tests.integration.test_cli_admin import mvllm
from tests.integration.test_router_agents import agent_entry, chat, client, node_entry, router_for
from tests.support import wait_until_async


@contextlib.contextmanager
def two_agents(tmp_path: Path) -> Iterator[tuple[Agent, Agent]]:
    top = {"adhoc": FAST_ADHOC, "drain_timeout": 5}
    a = Agent(tmp_path, model("m1"), sim_gpus=(24, 24), top=top)
    b = Agent(tmp_path, model("m2"), sim_gpus=(80,), top=top)
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


async def call(method: str, url: str, body: dict | None = None) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body) as resp:
        return resp.status, await resp.json(), resp.headers.get("x-mvllm-node", "")


async def cli(*args: str, router: str) -> tuple[int, str, str]:
    out = await asyncio.to_thread(mvllm, *args, router=router)
    return out.returncode, out.stdout, out.stderr


async def test_adhoc_instances_and_assign_through_the_router_and_the_cli(tmp_path: Path) -> None:
    with two_agents(tmp_path) as (a, b):
        async with router_for(tmp_path, [agent_entry(a, "gpu-a"), agent_entry(b, "gpu-b")]) as router:
            url = router.url
            await wait_until_async(
                lambda: all(node_entry(router, n)["agent"]["gpus"] for n in ("gpu-a", "gpu-b")), 10, what="agents read"
            )
            c = client(router)

            # No node named: the agent with the most free memory on one GPU (gpu-b, 80 GiB).
            body = {"model": "org/adhoc-r", "name": "ra", "params": {"max_model_len": 1024}, "ttl": 60}
            code, doc, node = await call("POST", url + "/admin/instances", body)
            assert code == 201 and node == "gpu-b" and doc["node"] == "gpu-b" and doc["state"] == "ready", doc
            # Routed by its name at once (the router read the agent again before answering).
            text, where = await chat(c, "ra")
            assert text and where == "gpu-b"
            text, where = await chat(c, "org/adhoc-r")
            assert text and where == "gpu-b"
            assert {"ra", "org/adhoc-r"} <= {m.id for m in (await c.models.list()).data}

            code, doc, _ = await call(
                "POST", url + "/admin/instances", {"model": "org/x", "node": "gpu-a", "params": {"foo_bar": 1}}
            )
            assert code == 400 and doc["error"]["code"] == "invalid_parameter" and "'foo_bar'" in doc["error"]["message"]
            code, doc, _ = await call("POST", url + "/admin/instances", {"model": "org/x", "node": "nowhere"})
            assert code == 404 and doc["error"]["code"] == "node_not_found"

            # The CLI: start one on gpu-a with flags, list both, assign with restart, remove.
            rc, out, err = await cli(
                "instance", "start", "org/cli-model", "--name", "cli1", "--node", "gpu-a",
                "--param", "max_model_len=256", "--param", "enforce_eager=true", "--ttl", "30", router=url,
            )  # fmt: skip
            assert rc == 0, err
            assert re.match(r"cli1 on gpu-a: ready \(GPU \[\d\], expires in \d+s\); send model = cli1, org/cli-model", out), out
            pid = a.inst("cli1")["pid"]
            argv = cmdline(pid)
            assert "--enforce-eager" in argv and argv[argv.index("--max-model-len") + 1] == "256"
            text, where = await chat(c, "cli1")
            assert text and where == "gpu-a"

            rc, out, err = await cli("instance", "ls", router=url)
            assert rc == 0, err
            rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
            assert set(rows) == {"ra", "cli1"} and rows["ra"][1] == "gpu-b" and rows["cli1"][1:4] == ["gpu-a", "org/cli-model", "ready"]
            assert "max_model_len=256 enforce_eager=true" in out
            rc, out, _ = await cli("instance", "ls", "--json", "--node", "gpu-b", router=url)
            assert rc == 0 and [i["name"] for i in json.loads(out)["instances"]] == ["ra"]
            rc, _, err = await cli("instance", "start", "org/y", "--param", "host=0.0.0.0", "--node", "gpu-a", router=url)
            assert rc == 1 and "'host' is set by the agent itself" in err, err

            text, where = await chat(c, "m1")
            assert text and where == "gpu-a"
            m1_pid = a.inst("m1")["pid"]
            rc, out, err = await cli(
                "assign", "m1", "--devices", "1", "--gpu-memory", "0.3", "--max-model-len", "512", "--restart", router=url
            )
            assert rc == 0, err
            assert out.startswith("m1 on gpu-a: devices [1], gpu_memory_utilization 0.3, max_model_len 512; engine restarted"), out
            assert f"saved to {a.config}" in out
            inst = a.inst("m1")
            assert inst["pid"] != m1_pid and inst["devices"] == [1] and inst["state"] == "ready"
            assert cmdline(inst["pid"])[cmdline(inst["pid"]).index("--max-model-len") + 1] == "512"
            text, where = await chat(c, "m1")
            assert text and where == "gpu-a"

            # assign by HTTP: the router finds the agent of the model; a model no agent has is 404.
            code, doc, node = await call("POST", url + "/admin/models/m2/assign", {"max_num_seqs": 4})
            assert code == 200 and node == "gpu-b" and doc["applied"] == "now" and doc["catalog"]["max_num_seqs"] == 4
            code, doc, _ = await call("POST", url + "/admin/models/nope/assign", {"max_num_seqs": 4})
            assert code == 404 and doc["error"]["code"] == "model_not_found"

            rc, out, err = await cli("instance", "rm", "cli1", router=url)
            assert rc == 0 and out.strip() == "cli1 on gpu-a: removed", out + err
            assert not any(i["name"] == "cli1" for i in a.state()["instances"])
            code, doc, node = await call("DELETE", url + "/admin/instances/ra")
            assert code == 200 and node == "gpu-b" and doc["removed"]
            with pytest.raises(openai.NotFoundError):
                await chat(c, "ra")
            code, doc, _ = await call("GET", url + "/admin/instances")
            assert code == 200 and doc == {"instances": [], "errors": {}}
            rc, _, err = await cli("instance", "rm", "ra", router=url)
            assert rc == 1 and "no agent has an ad-hoc instance named 'ra'" in err
            await c.close()
