"""The per-GPU-host agent: one `EngineProcess` per catalog model (a `vllm serve` or `mvllm sim serve`
child), a thin `Supervisor` placing them on the GPUs, and the HTTP API and `/v1` gatekeeper in front.
"""
