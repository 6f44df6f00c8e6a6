"""The router: one OpenAI-compatible endpoint over many vLLM nodes (`mvllm run`).

Layout: a small core (app: routes and the one middleware; proxy: forward, stream, retry; policy:
scoring and tiers, pure; breaker and retry: pure state machines; config, reload, metrics, state,
stats, request, appkeys, eventloop, demo, cli, serve) around three sub-packages: access/ (API keys,
limits, quotas, usage), fleet/ (the nodes and targets a request is routed to, and how the router
learns their state) and admin/ (the /admin/* API). The router never imports the dashboard, the
CLI or the agent: they meet over HTTP, and mvllm.launch composes `mvllm run`.
"""
