"""The router: one OpenAI-compatible endpoint over many vLLM nodes (`mvllm run`)."""
