"""Operator side of the router: the `mvllm ps/load/unload/sleep/wake/drain/undrain/status/reload`
commands. Every HTTP call, and the fleet and key views they print, come from `mvllm.client`."""
