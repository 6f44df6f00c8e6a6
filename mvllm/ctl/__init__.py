"""Operator side of the router: its HTTP admin client, the fleet view shared by CLI and dashboard,
and the `mvllm ps/load/unload/sleep/wake/drain/undrain/status/reload/top` commands."""
