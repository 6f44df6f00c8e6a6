"""Access control: who may call the router, for which models, how often, and what it cost.

Where a change belongs: the key model and the pure `authorize` rule in keys.py; `[auth]` and the
keys file in config.py; limits and quotas (pure policies) in limits.py; the per-request gate that
applies them and settles tokens in gate.py; request hygiene (paths, methods, headers) in guard.py;
reading the usage an engine reported in usage_tail.py; the usage file's document in usage_file.py
and its load/save loop in usage_store.py.
"""
