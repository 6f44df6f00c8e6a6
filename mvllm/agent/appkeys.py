"""The typed keys of the agent's aiohttp app state, in a leaf module so every route module can read them."""

from __future__ import annotations

from aiohttp import web

from mvllm.agent.adhoc import AdhocManager
from mvllm.agent.assign import Assigner
from mvllm.agent.config import AgentConfig
from mvllm.agent.metrics import AgentMetrics
from mvllm.agent.proxy import Gatekeeper
from mvllm.agent.supervisor import Supervisor

CONFIG = web.AppKey("config", AgentConfig)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
GATEKEEPER = web.AppKey("gatekeeper", Gatekeeper)
METRICS = web.AppKey("metrics", AgentMetrics)
REAP_STALE = web.AppKey("reap_stale", bool)
ADHOC = web.AppKey("adhoc", AdhocManager)
ASSIGNER = web.AppKey("assigner", Assigner)
