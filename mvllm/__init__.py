"""mvllm: one OpenAI-compatible endpoint over a fleet of vLLM servers."""

__version__ = "0.2.0"
