"""Operator side of the router: the fleet view shared by CLI, dashboard and `mvllm.client`, and the
`mvllm ps/load/unload/sleep/wake/drain/undrain/status/reload/top` commands (every HTTP call through
`mvllm.client`)."""
