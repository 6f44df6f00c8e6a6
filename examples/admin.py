"""Operating a fleet from Python with the mvllm client: drain a node and see requests avoid it,
read the router's log records, then load, sleep, wake and unload a model on an agent.

Try it against the demo (three simulated engines and an agent with simulated GPUs, no GPU needed):

    mvllm run --demo                      # one terminal: the router on http://127.0.0.1:8888
    python examples/admin.py              # another terminal

Elsewhere, the model part needs an agent listed in servers.toml (docs/agent.md;
agent.sim.example.toml is one without a GPU).

Environment: MVLLM_ROUTER (default http://127.0.0.1:8888), MVLLM_MODEL (the model to chat with,
default mvllm-demo), MVLLM_AGENT_MODEL (the model to load on an agent; default: the first one an
agent's catalog has), MVLLM_ADMIN_KEY when the router has API keys.
"""

from __future__ import annotations

import collections
import os
import sys
import time

from mvllm.client import Client, MvllmError, NodeInfo

ROUTER = os.environ.get("MVLLM_ROUTER", "http://127.0.0.1:8888")
MODEL = os.environ.get("MVLLM_MODEL", "mvllm-demo")
HELLO = [{"role": "user", "content": "Hello!"}]


def drain_demo(client: Client) -> None:
    serving = [n for n in client.nodes() if MODEL in n.models and n.up and not n.draining]
    if len(serving) < 2:
        print(f"drain: fewer than two nodes serve {MODEL}; nothing to show")
        return
    victim = serving[-1]
    seen = client.events(limit=1).last  # read the router's log from here on
    node = client.drain(victim.name)
    print(f"drained {node.name} ({node.drained_by}); {node.in_flight} request(s) still in flight there")
    try:
        answered = collections.Counter(client.chat(MODEL, HELLO, max_tokens=2).node for _ in range(8))
        print(f"8 chats while it drains were answered by: {dict(answered)}")
        assert victim.name not in answered, "a drained node got a request"
    finally:
        node = client.undrain(victim.name)
    print(f"undrained {node.name}: draining={node.draining}")
    for event in client.events(since=seen).events:
        print(f"  router log: {event.level} {event.message}")


def agent_model(client: Client) -> tuple[NodeInfo, str] | None:
    agents = [n for n in client.nodes() if n.is_agent and n.up]
    wanted = os.environ.get("MVLLM_AGENT_MODEL")
    for agent in agents:
        names = [i.name for i in agent.instances] + [str(c.get("name")) for c in agent.catalog]
        if wanted and (wanted in names or any(wanted in i.models for i in agent.instances)):
            return agent, wanted
        if not wanted and names:
            return agent, names[0]
    return None


def lifecycle_demo(client: Client) -> None:
    found = agent_model(client)
    if found is None:
        print("models: no agent in this fleet; see docs/agent.md to add one")
        return
    agent, model = found
    before = next((i.state for i in agent.instances if i.name == model), "stopped")
    t0 = time.monotonic()
    inst = client.load(model, node=agent.name)  # waits until the engine is ready
    print(f"load {model} on {inst.node}: {inst.state} in {time.monotonic() - t0:.1f}s")
    print(f"chat with it: {client.chat(inst.models[0], HELLO, max_tokens=4).text!r}")
    inst = client.sleep(model, level=1, node=agent.name)
    print(f"sleep: {inst.state_text}")
    inst = client.wake(model, node=agent.name)
    print(f"wake: {inst.state}")
    if before != "ready":  # leave the agent as we found it
        inst = client.unload(model, node=agent.name)
        print(f"unload: {inst.state}")


def main() -> int:
    with Client(ROUTER, admin_key=os.environ.get("MVLLM_ADMIN_KEY"), timeout=60) as client:
        drain_demo(client)
        lifecycle_demo(client)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MvllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
