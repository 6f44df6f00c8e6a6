"""Pure: the GPU memory a catalog model needs on each of its GPUs when its entry gives no budget
(neither `gpu_memory_utilization` nor `memory_gib`), from the shape in its config.json or from
the entry's `param_count`, with the assumptions spelt out in `basis`.

Per GPU (tensor parallelism splits weights and KV cache evenly over `tp` GPUs):

    weights  = (linear params × bytes(weight dtype) + embedding params × bytes(dtype)) / tp
    kv_cache = 2 (K and V) × layers × kv_heads × head_dim × bytes(kv dtype) × tokens / tp
    tokens   = max_model_len × min(max_num_seqs, KV_SEQUENCES)
    overhead = OVERHEAD_BYTES (CUDA context ~1 GiB: a sleeping vLLM keeps ~960 MiB on an H100;
               plus ~1 GiB for activations at the profiling batch, the sampler and CUDA graphs)
    need     = weights + kv_cache + overhead, rounded up to a multiple of 256 MiB

Assumptions: KV room for KV_SEQUENCES full-length sequences (vLLM needs room for one to start;
more concurrency is what the engine then makes of the budget); `max_model_len` defaults to the
model's `max_position_embeddings` (as vLLM does) or DEFAULT_MAX_LEN when the config has none;
dtype `auto` loads float32 checkpoints as 16-bit (vLLM's rule); a quantized checkpoint
(`quantization_config.bits`, or fp8) stores its linear layers at that width and its embeddings
at the model dtype; vision towers of multimodal models (`text_config`) are not counted. With
only `param_count` (billions) and no config.json, the KV cache is taken as PARAM_ONLY_KV_SHARE
of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
MIB = 1024**2
OVERHEAD_BYTES = 2 * GIB
KV_SEQUENCES = 4
DEFAULT_MAX_LEN = 4096
PARAM_ONLY_KV_SHARE = 0.25
_ROUND = 256 * MIB

# Bytes per element of the dtype names found in config.json (`torch_dtype` / `dtype`), vLLM's
# `--dtype` / `--kv-cache-dtype` values, and the spellings of the tools mvllm replaces.
_DTYPE_BYTES = {
    "float32": 4.0, "float": 4.0, "fp32": 4.0,
    "float16": 2.0, "half": 2.0, "fp16": 2.0,
    "bfloat16": 2.0, "bf16": 2.0,
    "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0, "float8_e4m3fn": 1.0, "int8": 1.0,
    "int4": 0.5,
}  # fmt: skip
# vLLM's `--dtype` names for the catalog's `dtype` key (aliases normalised).
VLLM_DTYPES = {
    "auto": "auto",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "float": "float32", "fp32": "float32",
}  # fmt: skip
# Model types whose config class ties lm_head to the embeddings when config.json does not say.
_TIED_BY_DEFAULT = frozenset({"gpt2", "gpt_bigcode", "gemma", "gemma2", "gemma3_text"})
_NON_GATED_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode"})


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model's config.json."""

    params: int  # all parameters (of the language model)
    embed_params: int  # of which embeddings and an untied lm_head (kept at the model dtype when quantized)
    layers: int
    kv_heads: int
    head_dim: int
    max_position: int | None
    dtype: str | None  # torch_dtype of the checkpoint
    quant_bits: float | None = None  # bits of quantized linear weights, when the checkpoint is quantized
    note: str = ""  # e.g. "text_config of a multimodal model"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (None: nothing to estimate from) and what it was computed from, in words."""

    bytes: int | None
    basis: str
    weights_bytes: int = 0
    kv_bytes: int = 0
    overhead_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "basis": self.basis,
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "overhead_bytes": self.overhead_bytes,
        }


def _int(doc: Mapping[str, Any], *names: str) -> int | None:
    for n in names:
        v = doc.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def shape_from_config(doc: Mapping[str, Any]) -> ModelShape:
    """The shape of a Hugging Face config.json; ValueError when it lacks what the formula needs."""
    note = ""
    if _int(doc, "hidden_size", "n_embd", "d_model") is None and isinstance(doc.get("text_config"), Mapping):
        text = doc["text_config"]
        # Keep the outer dtype / quantization when the text part does not repeat them.
        outer = {k: doc[k] for k in ("torch_dtype", "dtype", "quantization_config") if k in doc}
        doc = {**outer, **{k: v for k, v in text.items() if v is not None}}
        note = "text_config of a multimodal model; vision tower not counted"
    hidden = _int(doc, "hidden_size", "n_embd", "d_model")
    layers = _int(doc, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(doc, "num_attention_heads", "n_head")
    vocab = _int(doc, "vocab_size")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]  # fmt: skip
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    assert hidden and layers and heads and vocab
    kv_heads = _int(doc, "num_key_value_heads", "num_kv_heads", "multi_query_group_num") or heads
    if doc.get("multi_query") is True:  # gpt_bigcode / falcon-7b style multi-query attention
        kv_heads = 1
    head_dim = _int(doc, "head_dim") or hidden // heads
    model_type = str(doc.get("model_type") or "")
    inter = _int(doc, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * hidden
    mats = 2 if model_type in _NON_GATED_MLP else 3  # gated MLPs (Llama, Qwen, Mistral) have 3 matrices

    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    experts = _int(doc, "num_local_experts", "num_experts", "n_routed_experts")
    if experts:
        expert_inter = _int(doc, "moe_intermediate_size") or inter
        shared = _int(doc, "shared_expert_intermediate_size") or (
            (_int(doc, "n_shared_experts") or 0) * expert_inter
        )
        mlp = experts * mats * hidden * expert_inter + hidden * experts + mats * hidden * shared
    else:
        mlp = mats * hidden * inter
    norms = 2 * hidden
    tied = doc.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)
    embed = vocab * hidden * (1 if tied else 2)
    params = layers * (attn + mlp + norms) + embed + hidden

    quant = doc.get("quantization_config")
    bits: float | None = None
    if isinstance(quant, Mapping):
        b = quant.get("bits") or quant.get("w_bit") or quant.get("weight_bits")
        if isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0:
            bits = float(b)
        elif str(quant.get("quant_method", "")).lower() in ("fp8", "fbgemm_fp8", "modelopt"):
            bits = 8.0
    dtype = doc.get("torch_dtype") or doc.get("dtype")
    return ModelShape(
        params=params,
        embed_params=embed,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_position=_int(doc, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
        dtype=str(dtype) if dtype else None,
        quant_bits=bits,
        note=note,
    )


def parse_length(value: int | str | None) -> int | None:
    """`max_model_len` as vLLM reads it: an int, or '32k' (k/m decimal) / '32K' (K/M binary);
    None for auto (-1, 'auto') or nothing given. ValueError for anything else."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    text = value.strip()
    if text.lower() in ("auto", "-1"):
        return None
    mult = {"k": 1000, "m": 1000**2, "K": 1024, "M": 1024**2}.get(text[-1:], 1)
    number = text[:-1] if mult != 1 else text
    try:
        n = float(number)
    except ValueError:
        raise ValueError(f"max_model_len {value!r} is not a length like 4096, '32k' or '32K'") from None
    return int(n * mult) if n > 0 else None


def dtype_bytes(name: str | None) -> float | None:
    return _DTYPE_BYTES.get(name.lower()) if name else None


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag V` / `--flag=V` in an argv (the last one wins, as with argparse)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _params_text(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n < 10e9 else f"{n / 1e9:.1f}B"


def estimate(
    shape: ModelShape | None,
    *,
    param_count_b: float | None = None,
    dtype: str | None = None,
    kv_dtype: str | None = None,
    max_model_len: int | str | None = None,
    max_num_seqs: int | None = None,
    tensor_parallel_size: int = 1,
    source: str = "config.json",
) -> MemoryEstimate:
    """The need per GPU (module docstring), from `shape` and/or `param_count_b` (billions, which
    wins over the count computed from the shape). `dtype` is the engine's `--dtype` (None or
    'auto': the checkpoint's, float32 loaded as 16-bit); `kv_dtype` its `--kv-cache-dtype`."""
    tp = max(1, tensor_parallel_size)
    if shape is None and param_count_b is None:
        return MemoryEstimate(None, f"nothing to estimate from ({source}; no param_count in the catalog entry)")
    requested = None if dtype in (None, "auto") else dtype
    checkpoint = shape.dtype if shape is not None else None
    name = requested or checkpoint or "bfloat16"
    if requested is None and dtype_bytes(name) == 4.0:
        name = "float16"  # vLLM's `auto`: a float32 checkpoint runs in 16 bits
    unit = dtype_bytes(name) or 2.0
    parts: list[str] = []

    if param_count_b is not None:
        params = param_count_b * 1e9
        embed = shape.embed_params if shape is not None else 0
        parts.append(f"param_count {_params_text(params)} {name}")
    else:
        assert shape is not None
        params = float(shape.params)
        embed = shape.embed_params
        parts.append(f"{source}: {_params_text(params)} params {name}")
    if shape is not None and shape.quant_bits is not None and requested is None:
        weights = (params - embed) * shape.quant_bits / 8 + embed * unit
        parts[-1] += f" ({shape.quant_bits:g}-bit quantized linear layers)"
    else:
        weights = params * unit
    if shape is not None and shape.note:
        parts.append(shape.note)

    if shape is not None:
        length = parse_length(max_model_len)
        if length is None:
            length = shape.max_position or DEFAULT_MAX_LEN
            why = "max_position_embeddings" if shape.max_position else "assumed"
        else:
            why = "max_model_len"
        seqs = min(max_num_seqs or KV_SEQUENCES, KV_SEQUENCES)
        tokens = length * seqs
        kv_unit = dtype_bytes(kv_dtype) if kv_dtype not in (None, "auto") else None
        kv_unit = kv_unit or unit
        kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_unit * tokens
        parts.append(f"KV {seqs} x {length} tok ({why})")
    else:
        kv = weights * PARAM_ONLY_KV_SHARE
        parts.append(f"KV {PARAM_ONLY_KV_SHARE:.0%} of weights (no config.json shape)")

    weights_gpu = weights / tp
    kv_gpu = kv / tp
    total = math.ceil((weights_gpu + kv_gpu + OVERHEAD_BYTES) / _ROUND) * _ROUND
    split = f" / tp {tp}" if tp > 1 else ""
    basis = (
        f"{' + '.join(parts)}{split}: weights {_gb(weights_gpu)} + KV {_gb(kv_gpu)} "
        f"+ overhead {_gb(OVERHEAD_BYTES)} per GPU"
    )
    return MemoryEstimate(int(total), basis, int(weights_gpu), int(kv_gpu), OVERHEAD_BYTES)
