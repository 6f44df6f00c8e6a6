"""`mvllm sim`: a drop-in stand-in for `vllm serve` that models queueing, timing, sleep and LoRA without a GPU."""
