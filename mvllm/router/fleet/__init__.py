"""The fleet as the router sees it: the nodes it routes to and how it learns their state.

Where a change belongs: the node set, the model index and the config diff in registry.py; what a
request can be routed to (the Target protocol, Health, the one in-flight load correction, the
static server `Node`) in targets.py; agent nodes and their engine routes in agents.py; the HTTP calls to an agent (/state polls, lifecycle calls) in
agent_client.py; scraping /metrics and /health in scraper.py; engine-specific metric names in engines.py; a model's
replicas (grouping and state, for /admin/models and the gauge) in replicas.py; the autoscale loop
(observing, scaling up and releasing) in autoscaler.py, its pure policy in router/autoscale.py.
"""
