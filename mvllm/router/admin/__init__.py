"""The admin API (`/admin/*`, admin keys only): one module per area, each a route table.

Where a change belongs: nodes, drain, reload and the event log in nodes.py; model lifecycle
(load/unload/sleep/wake) in models.py; LoRA adapters in lora.py; logs in logs.py; ad-hoc
instances and assign in instances.py; /proxy/{instance}/{path} (admin keys too) in
engine_proxy.py; API keys and the usage file in keys.py; finding agents and calling them (the one
mapping of an agent's failure to the admin answer) in agent_calls.py; AdminError in errors.py.
Admin modules never import router/app.py: the app keys are in router/appkeys.py.
"""

from __future__ import annotations

from aiohttp import web

from mvllm.router.admin import engine_proxy, instances, keys, logs, lora, models, nodes
from mvllm.router.admin.errors import handler


def register(app: web.Application) -> None:
    """Add every admin route table to `app` (AdminError answered in OpenAI form) and their
    background work. Order matters where paths overlap: /admin/models/{model}/{action} first."""
    nodes.setup(app)  # first: the event log records what the other parts log at start
    tables = (nodes.ROUTES, models.ROUTES, lora.ROUTES, logs.ROUTES, instances.ROUTES, keys.ROUTES, engine_proxy.ROUTES)
    for table in tables:
        app.router.add_routes(web.RouteDef(r.method, r.path, handler(r.handler), r.kwargs) for r in table)
    logs.setup(app)
    keys.setup(app)
