"""How much memory a task needs, from its spec and the model's architecture, before anything is loaded.

It runs where admission runs (the orchestrator), so it reads a model's ``config.json`` (or a GGUF file's
header) and never imports torch: :func:`model_facts` turns either into :class:`ModelFacts`, and
:func:`estimate_task` turns a task plus those facts into an :class:`Estimate` with its parts. Where MLOC
itself sizes something (vLLM's context and CPU KV cache in :mod:`mloc.llm.loader`), the same rule is
called here rather than copied. The figures describe MLOC's own engines: vLLM, transformers, and TRL
1.x trainers (whose log-probabilities come from a chunked LM head, so full logits are never held).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal

from mloc.errors import MlocError
from mloc.llm.loader import (
    CHAT_TURN_TOKENS,
    CONTEXT_FLOOR,
    DTYPE_BYTES,
    DTYPE_NAMES,
    VLLM_CPU_WEIGHT_COPIES,
    ModelShape,
    Workload,
    choose_context,
    choose_dtype,
    kv_cache_bytes,
)
from mloc.spec.agent import AgentSpec
from mloc.spec.base import AdapterType, Document, Engine, ModelSpec
from mloc.spec.inference import InferenceSpec
from mloc.spec.rag import RagSpec
from mloc.spec.train import DatasetSpec, DPOSpec, GRPOSpec, PPOSpec, SFTSpec, TrainHyperparameters

GIB = 1 << 30
MIB = 1 << 20
Device = Literal["gpu", "cpu"]


class ModelFactsError(MlocError):
    """A model's config or GGUF header cannot be read, or lacks a field the estimate needs."""

    status_code = 422
    code = "unreadable_model_config"


# --- what a model is --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """A model's architecture and weight sizes, read without loading it."""

    source: str  # the file the facts came from, for messages
    model_type: str
    parameters: int
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    # The float dtype MLOC's engines read the weights in: the checkpoint's, or bfloat16 for a GGUF
    # (MLOC dequantizes GGUF files to bfloat16 safetensors before loading them).
    dtype: str
    format: Literal["hf", "gguf"] = "hf"
    tied_embeddings: bool = False
    gated_mlp: bool = True
    sliding_window: int | None = None
    sliding_layers: int = 0
    experts: int = 1
    # Weights of the decoder's linear layers: what 4-bit quantization shrinks and 'all-linear' LoRA wraps.
    linear_parameters: int = 0
    quantization: str | None = None  # "Q4_K_M" (GGUF), "bitsandbytes 4-bit", "awq 4-bit", ...
    weight_bytes: Mapping[str, int] = field(default_factory=dict)  # as stored, by dtype or GGUF tensor type

    @property
    def kv_values_per_token(self) -> int:
        """K and V entries per token over all layers, windows ignored (as :class:`ModelShape` counts)."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def shape(self) -> ModelShape:
        return ModelShape(self.dtype, self.max_context, self.kv_values_per_token)

    def kv_bytes(self, sequences: int, length: int, value_bytes: float) -> int:
        """KV cache of ``sequences`` sequences of ``length`` tokens; sliding-window layers keep only their window."""
        windowed = min(length, self.sliding_window) if self.sliding_window else length
        tokens = (self.layers - self.sliding_layers) * length + self.sliding_layers * windowed
        return math.ceil(2 * self.kv_heads * self.head_dim * value_bytes * sequences * tokens)

    def loaded_bytes(self, dtype: str) -> int:
        """The weights in memory when loaded as ``dtype``; a pre-quantized checkpoint stays as stored."""
        if self.quantization is not None and self.format == "hf":
            return sum(self.weight_bytes.values())
        return self.parameters * DTYPE_BYTES.get(dtype, 4)


# Fields that published configs leave out because transformers' config class supplies them.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {
        "vocab_size": 262_208,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131_072,
        "tie_word_embeddings": True,
        "sliding_window_pattern": 6,
    },
    "gemma2": {"tie_word_embeddings": True, "sliding_window_pattern": 2},
    "gemma": {"tie_word_embeddings": True},
    "siglip_vision_model": {"num_channels": 3},
}
ALIASES = {
    "hidden_size": ("n_embd", "d_model"),
    "num_hidden_layers": ("n_layer", "num_layers"),
    "num_attention_heads": ("n_head",),
    "max_position_embeddings": ("n_positions", "max_sequence_length", "seq_length"),
    "intermediate_size": ("n_inner", "ffn_dim"),
}
# Families whose MLP is two plain linears (not gated), with biases everywhere.
PLAIN_MLP = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "bert", "roberta", "xlm-roberta",
             "starcoder2", "gpt_bigcode", "mpt", "codegen"}  # fmt: skip
LEARNED_POSITIONS = {"gpt2", "opt", "bert", "roberta", "xlm-roberta", "gpt_bigcode"}
ENCODERS = {"bert", "roberta", "xlm-roberta"}  # embedding models: no LM head, a pooler instead
QKV_BIAS = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"}
QK_NORM = {"gemma3_text", "qwen3", "qwen3_moe", "olmo2"}
FOUR_NORMS = {"gemma2", "gemma3_text"}
# Features whose weights the counting below does not cover: the file size must say instead.
UNCOVERED = ("kv_lora_rank", "q_lora_rank", "n_routed_experts", "ssm_cfg", "mamba_d_state")


class _Config:
    """One config section with its model type's defaults; a missing field raises naming file and field."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
        self.data, self.source, self.prefix = data, source, prefix
        self.model_type = str(data.get("model_type") or "")
        self.defaults = MODEL_DEFAULTS.get(self.model_type, {})

    def get(self, name: str, default: Any = None) -> Any:
        for key in (name, *ALIASES.get(name, ())):
            if self.data.get(key) is not None:
                return self.data[key]
        return self.defaults.get(name, default)

    def number(self, name: str, default: int | None = None) -> int:
        value = self.get(name, default)
        if value is None:
            raise ModelFactsError(
                f"{self.source}: field {self.prefix}{name} is missing, and MLOC knows no default for model type "
                f"{self.model_type or '(none)'!r}; add it to config.json (the value is in the model card or "
                "transformers' config class), or give the weights' size so the estimate can use that"
            )
        if isinstance(value, list):  # a per-layer list (OpenELM): the largest layer bounds them all
            value = max(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ModelFactsError(
                f"{self.source}: field {self.prefix}{name} is {value!r}; it must be a positive number"
            )
        return int(value)


def _vision_parameters(vision: _Config, text_hidden: int) -> int:
    """A ViT tower (SigLIP, CLIP) and the projection into the language model."""
    hidden, inter = vision.number("hidden_size"), vision.number("intermediate_size")
    layers, patch, image = vision.number("num_hidden_layers"), vision.number("patch_size"), vision.number("image_size")
    channels = vision.number("num_channels", 3)
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 4 * hidden
    tower = (
        channels * patch * patch * hidden + hidden + (image // patch) ** 2 * hidden + layers * per_layer + 2 * hidden
    )
    return tower + hidden * text_hidden + hidden  # projection and its norm


def facts_from_config(
    config: Mapping[str, Any], *, source: str = "config.json", weights_bytes: int | None = None
) -> ModelFacts:
    """Facts from a Hugging Face ``config.json`` (as a dict); ``weights_bytes`` is the checkpoint's size if known."""
    if not isinstance(config, Mapping):
        raise ModelFactsError(f"{source}: expected a JSON object, got {type(config).__name__}")
    nested = isinstance(config.get("text_config"), Mapping)
    text = _Config(config["text_config"] if nested else config, source, "text_config." if nested else "")
    top = _Config(config, source)
    model_type = text.model_type or top.model_type
    stored = str(
        top.get("torch_dtype") or top.get("dtype") or text.get("torch_dtype") or text.get("dtype") or "float32"
    )
    stored = DTYPE_NAMES.get(stored, stored)
    if stored not in DTYPE_BYTES:
        raise ModelFactsError(
            f"{source}: torch_dtype {stored!r} is not a float dtype MLOC knows ({sorted(DTYPE_BYTES)})"
        )
    uncovered = [name for name in UNCOVERED if text.get(name) is not None]
    try:
        if uncovered:
            raise ModelFactsError(
                f"{source}: field {text.prefix}{uncovered[0]} belongs to an architecture whose weights MLOC does "
                "not count from the config; give the weights' size (the safetensors files or their index)"
            )
        facts = _count(text, top, source, model_type, stored)
    except ModelFactsError:
        if weights_bytes is None or not text.get("hidden_size"):
            raise
        facts = _count(text, top, source, model_type, stored, rough=True)
        facts = _replace(facts, parameters=weights_bytes // DTYPE_BYTES[stored])
    quant = config.get("quantization_config") or text.get("quantization_config")
    if quant:
        label, bits = _quantization(quant, source)
        stored_bytes = weights_bytes
        if stored_bytes is None:
            if bits is None:
                raise ModelFactsError(
                    f"{source}: quantization_config.quant_method {quant.get('quant_method')!r} does not say its bits; "
                    "give the weights' size so the estimate can use that"
                )
            # About a quarter of a bit per weight goes to group scales and zero points.
            quantized = facts.linear_parameters * (bits + 0.25) / 8
            stored_bytes = math.ceil(quantized + (facts.parameters - facts.linear_parameters) * DTYPE_BYTES[stored])
        return _replace(facts, quantization=label, weight_bytes={label: stored_bytes})
    stored_bytes = weights_bytes if weights_bytes is not None else facts.parameters * DTYPE_BYTES[stored]
    return _replace(facts, weight_bytes={stored: stored_bytes})


def _replace(facts: ModelFacts, **changes: Any) -> ModelFacts:
    return ModelFacts(**{**{item.name: getattr(facts, item.name) for item in fields(facts)}, **changes})


def _count(text: _Config, top: _Config, source: str, model_type: str, dtype: str, rough: bool = False) -> ModelFacts:
    hidden = text.number("hidden_size")
    layers = text.number("num_hidden_layers", 1 if rough else None)
    heads = text.number("num_attention_heads", 1 if rough else None)
    kv_heads = text.number("num_key_value_heads", heads)
    head_dim = text.number("head_dim", max(1, hidden // heads))
    vocab = text.number("vocab_size", 1 if rough else None)
    context = text.number("max_position_embeddings", CONTEXT_FLOOR if rough else None)
    plain = model_type in PLAIN_MLP
    inter = text.number("intermediate_size", 4 * hidden if plain or rough else None)
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    expert_inter = text.number("moe_intermediate_size", inter) if experts > 1 else inter
    tied = bool(text.get("tie_word_embeddings", top.get("tie_word_embeddings", False)))
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if plain or text.get("attention_bias"):
        attention += 2 * q + 2 * kv if plain else q + 2 * kv + hidden
    elif model_type in QKV_BIAS:
        attention += q + 2 * kv
    mlp_one = (2 if plain else 3) * hidden * expert_inter
    if plain or text.get("mlp_bias"):
        mlp_one += expert_inter + hidden
    mlp = experts * mlp_one + (hidden * experts if experts > 1 else 0)
    shared = int(text.get("shared_expert_intermediate_size") or 0)
    mlp += 3 * hidden * shared + hidden if shared else 0
    norms = (4 if model_type in FOUR_NORMS else 2) * hidden * (2 if plain else 1)
    norms += 2 * head_dim if model_type in QK_NORM else 0
    embeddings = vocab * hidden * (1 if tied or model_type in ENCODERS else 2)
    embeddings += hidden * hidden + hidden if model_type in ENCODERS else 0
    if model_type in LEARNED_POSITIONS:
        embeddings += context * hidden + int(text.get("type_vocab_size") or 0) * hidden
    linear = layers * (
        hidden * q + 2 * hidden * kv + q * hidden + experts * (2 if plain else 3) * hidden * expert_inter
    )
    parameters = layers * (attention + mlp + norms) + embeddings + hidden * (2 if plain else 1)
    if isinstance(top.get("vision_config"), Mapping):
        vision = _vision_parameters(_Config(top.data["vision_config"], source, "vision_config."), hidden)
        parameters += vision
    sliding, window = _sliding(text, layers)
    return ModelFacts(
        source=source,
        model_type=model_type,
        parameters=parameters,
        hidden_size=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=expert_inter,
        vocab_size=vocab,
        max_context=context,
        dtype=dtype,
        tied_embeddings=tied,
        gated_mlp=not plain,
        sliding_window=window,
        sliding_layers=sliding,
        experts=experts,
        linear_parameters=linear,
    )


def _sliding(text: _Config, layers: int) -> tuple[int, int | None]:
    """How many layers attend within a sliding window, and the window."""
    window = text.get("sliding_window")
    if not window or text.get("use_sliding_window") is False:
        return 0, None
    types = text.get("layer_types")
    if isinstance(types, list) and types:
        return sum(1 for kind in types if kind == "sliding_attention"), int(window)
    pattern = text.get("sliding_window_pattern") or text.data.get("_sliding_window_pattern")
    if pattern:
        return sum(1 for index in range(layers) if (index + 1) % int(pattern)), int(window)
    return layers, int(window)  # Mistral's window applies to every layer


def _quantization(quant: Mapping[str, Any], source: str) -> tuple[str, float | None]:
    method = str(quant.get("quant_method") or "")
    if not method:
        raise ModelFactsError(
            f"{source}: quantization_config has no quant_method; MLOC cannot tell how weights are stored"
        )
    if method == "bitsandbytes":
        bits: float | None = 4 if quant.get("load_in_4bit") else 8
    elif method in ("fp8", "fbgemm_fp8"):
        bits = 8
    elif method == "mxfp4":
        bits = 4.25
    elif method == "compressed-tensors":
        found = [group.get("weights", {}).get("num_bits") for group in (quant.get("config_groups") or {}).values()]
        bits = min((b for b in found if b), default=None)
    else:
        bits = quant.get("bits") or quant.get("w_bit") or quant.get("nbits")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int | float) or not 0 < bits <= 32):
        raise ModelFactsError(f"{source}: quantization_config gives {bits!r} bits; expected a number from 1 to 32")
    return (f"{method} {bits:g}-bit" if bits else method), bits


def _checkpoint_bytes(folder: Path) -> int | None:
    """The checkpoint's size from its index (hub metadata, without the shards) or its weight files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = folder / index
        if path.is_file():
            try:
                return int(json.loads(path.read_text(encoding="utf-8"))["metadata"]["total_size"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelFactsError(f"{path}: cannot read metadata.total_size ({exc})") from exc
    for pattern in ("*.safetensors", "*.bin"):
        files = [item for item in folder.glob(pattern) if item.is_file() and "training_args" not in item.name]
        if files:
            return sum(item.stat().st_size for item in files)
    return None


def model_facts(source: Path | str | Mapping[str, Any], *, weights_bytes: int | None = None) -> ModelFacts:
    """Facts from a config dict, a ``config.json``, a model folder (config plus weight sizes) or a ``.gguf``."""
    if isinstance(source, Mapping):
        return facts_from_config(source, weights_bytes=weights_bytes)
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelFactsError(
            f"{path}: no such file or folder; give a model folder with config.json, the config.json itself or a .gguf"
        )
    if path.suffix == ".gguf":
        return facts_from_gguf(path)
    config_path = path / "config.json" if path.is_dir() else path
    if path.is_dir() and weights_bytes is None:
        weights_bytes = _checkpoint_bytes(path)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelFactsError(
            f"{config_path}: no such file; a Hugging Face model folder holds its config.json"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelFactsError(f"{config_path}: cannot read it as JSON ({exc})") from exc
    return facts_from_config(config, source=str(config_path), weights_bytes=weights_bytes)


# --- GGUF headers -----------------------------------------------------------------------------------

# ggml tensor types: id -> (name, elements per block, bytes per block), as ggml.h and gguf-py define them.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
# general.file_type: the mix a whole file was quantized to (llama.cpp's LLAMA_FTYPE_*).
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}  # fmt: skip
# GGUF value types: id -> struct format (8 string, 9 array are read by hand).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# GGUF architecture names that differ from the model type of the HF folder MLOC converts them to.
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}
# Every sixth Gemma 3 layer attends to the whole context, every other Gemma 2 layer (llama.cpp's rule).
GGUF_FULL_EVERY = {"gemma3": 6, "gemma2": 2}
LONG_ARRAY = 64  # longer arrays (the vocabulary) are skipped: only their length is kept


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]
    type_name: str
    elements: int
    bytes: int
    offset: int  # from the start of the data section


class _Reader:
    def __init__(self, handle: BinaryIO, source: str) -> None:
        self.handle, self.source = handle, source

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ModelFactsError(f"{self.source}: the GGUF header ends early; the file is cut short or not a GGUF")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        length = self.take("<Q")
        if length > 1 << 24:
            raise ModelFactsError(f"{self.source}: a GGUF string claims {length} bytes; the header is corrupt")
        data = self.handle.read(length)
        if len(data) != length:
            raise ModelFactsError(f"{self.source}: the GGUF header ends early; the file is cut short or not a GGUF")
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("<I"), self.take("<Q")
            if count > LONG_ARRAY:
                if item in _SCALARS:
                    self.handle.seek(count * struct.calcsize(_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        self.value(item)
                return count
            return [self.value(item) for _ in range(count)]
        raise ModelFactsError(
            f"{self.source}: unknown GGUF value type {kind}; the header is corrupt or newer than MLOC"
        )


def read_gguf(path: Path) -> tuple[dict[str, Any], list[GgufTensor]]:
    """A GGUF file's key/value metadata and tensor list; arrays longer than 64 items keep only their length."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ModelFactsError(f"{path}: cannot open the GGUF file ({exc.strerror or exc})") from exc
    with handle:
        reader = _Reader(handle, str(path))
        if handle.read(4) != b"GGUF":
            raise ModelFactsError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        version = reader.take("<I")
        if version < 2:
            raise ModelFactsError(f"{path}: GGUF version {version} is too old; convert it again with llama.cpp")
        tensor_count, kv_count = reader.take("<Q"), reader.take("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.take("<I"))
        tensors = []
        for _ in range(tensor_count):
            name = reader.string()
            shape = tuple(reader.take("<Q") for _ in range(reader.take("<I")))
            type_id, offset = reader.take("<I"), reader.take("<Q")
            if type_id not in GGML_TYPES:
                raise ModelFactsError(f"{path}: tensor {name} has ggml type {type_id}, which MLOC does not know")
            type_name, block, block_bytes = GGML_TYPES[type_id]
            elements = math.prod(shape)
            tensors.append(GgufTensor(name, shape, type_name, elements, elements // block * block_bytes, offset))
    return metadata, tensors


def facts_from_gguf(path: Path) -> ModelFacts:
    """Facts from a GGUF file's header: exact parameter and byte counts from its tensor list."""
    metadata, tensors = read_gguf(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFactsError(f"{path}: GGUF key general.architecture is missing; the file does not say its model")

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            value = max(value)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFactsError(f"{path}: GGUF key {arch}.{key} is missing or not a positive number ({value!r})")
        return value

    names = {tensor.name for tensor in tensors}
    hidden, heads, layers = number("embedding_length"), number("attention.head_count"), number("block_count")
    vocab = metadata.get(f"{arch}.vocab_size") or metadata.get("tokenizer.ggml.tokens")
    if not isinstance(vocab, int):
        embedding = next((t for t in tensors if t.name == "token_embd.weight"), None)
        vocab = max(embedding.shape) if embedding else None
    if not isinstance(vocab, int):
        raise ModelFactsError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is in the GGUF header")
    by_type: dict[str, int] = {}
    for tensor in tensors:
        by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.bytes
    window = metadata.get(f"{arch}.attention.sliding_window")
    every = GGUF_FULL_EVERY.get(arch)
    sliding = sum(1 for index in range(layers) if (index + 1) % every) if window and every else 0
    file_type = metadata.get("general.file_type")
    return ModelFacts(
        source=str(path),
        model_type=GGUF_MODEL_TYPES.get(arch, arch),
        parameters=sum(tensor.elements for tensor in tensors),
        hidden_size=hidden,
        layers=layers,
        heads=heads,
        kv_heads=number("attention.head_count_kv", heads),
        head_dim=number("attention.key_length", max(1, hidden // heads)),
        intermediate_size=number("feed_forward_length"),
        vocab_size=int(vocab),
        max_context=number("context_length"),
        dtype="bfloat16",
        format="gguf",
        tied_embeddings="output.weight" not in names,
        gated_mlp=any(name.endswith("ffn_gate.weight") for name in names),
        sliding_window=window if sliding and isinstance(window, int) else None,
        sliding_layers=sliding,
        experts=int(metadata.get(f"{arch}.expert_count") or 1),
        linear_parameters=sum(t.elements for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2),
        quantization=GGUF_FILE_TYPES.get(file_type, f"file type {file_type}") if isinstance(file_type, int) else None,
        weight_bytes=by_type,
    )


# --- what a task needs --------------------------------------------------------------------------------

# What the process holds beyond the named parts: on a GPU the CUDA context and library workspaces; on a
# CPU the libraries' first-use buffers (generation; training with TRL's data pipeline), measured by
# bench/memfit.py on the packaged tiny model, whose own parts are a few MiB.
GPU_CONTEXT_BYTES = 512 * MIB
VLLM_GRAPH_BYTES = 512 * MIB  # CUDA graphs, unless enforce_eager
CPU_RUNTIME_BYTES = {"inference": 16 * MIB, "training": 48 * MIB}
# A vllm-cpu engine's first start with cold compile caches (vLLM's and torch inductor's), beyond weights
# and KV cache, measured on the tiny model. The loader's allowance (VLLM_CPU_RUNTIME_BYTES, 1 GiB) also
# covers importing vLLM, which this estimate, like the bench, counts as the executor's own.
VLLM_CPU_FIRST_START_BYTES = 256 * MIB
# A fast tokenizer in RAM, per vocabulary entry (Gemma 3's 262k entries: 330 MB measured).
TOKENIZER_BYTES_PER_TOKEN = 1280
# Training on a CPU peaks this much above the activations themselves: glibc keeps a step's freed activations
# for the next, and backward holds one layer's activation gradients (measured on Gemma 3 270M: LoRA 1.7x,
# full fine-tuning 1.1x; the step peaks settle from the second step on).
CPU_ACTIVATION_SLACK = 1.5
# vLLM's defaults for the offline LLM class (vllm/engine/arg_utils.py): GPUs under 70 GiB, and CPUs.
VLLM_BATCHED_TOKENS = {"gpu": 8192, "cpu": 4096}
VLLM_MAX_SEQS = 256
DEFAULT_BATCH = {"vllm": 256, "transformers": 16}  # the inference executor's prompts per engine call
# TRL computes log-probabilities through a chunked LM head: tokens x vocabulary in tiles of this size.
LOGPROB_TOKENS, LOGPROB_VOCAB = 4096, 32768
# A dataset's prompts are unknown at submit; assume prompts of this many tokens.
UNKNOWN_PROMPT_TOKENS = 512
# A token is at least a byte (the loader's bound, which sizes vLLM's cache on a CPU); with a vocabulary of
# this size or more, text runs about this many bytes a token (English and code 3.5-4.5, CJK about 3).
LARGE_VOCABULARY, BYTES_PER_TOKEN = 16_384, 3
NF4_BITS = 4.127  # 4-bit weights, plus double-quantized absmax per 64 (QLoRA's storage)
MINILM_PARAMETERS = 22_713_216  # all-MiniLM-L6-v2, the default embedding model


@dataclass(frozen=True)
class Estimate:
    """The memory one task needs on each device it uses, by part, in bytes."""

    task: str
    device: Device
    gpus: int = 1
    dtype: str = ""  # what the weights are loaded as
    weights: int = 0
    packed_weights: int = 0
    adapter: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    kv_cache: int = 0
    reference_model: int = 0
    reward_model: int = 0
    value_model: int = 0
    embedding_model: int = 0
    tokenizer: int = 0
    loading: int = 0  # a CPU load that converts the dtype holds the checkpoint's pages beside the result
    overhead: int = 0
    reserve: int = 0  # what vLLM's gpu_memory_utilization leaves to others: the GPU must still have it
    notes: tuple[str, ...] = ()

    LABELS: ClassVar[dict[str, str]] = {
        "weights": "weights",
        "packed_weights": "packed weights",
        "adapter": "adapter",
        "gradients": "gradients",
        "optimizer": "optimizer states",
        "kv_cache": "KV cache",
        "activations": "activations",
        "reference_model": "reference model",
        "reward_model": "reward model",
        "value_model": "value model",
        "embedding_model": "embedding model",
        "tokenizer": "tokenizer",
        "loading": "loading",
        "overhead": "overhead",
        "reserve": "vLLM reserve",
    }

    @property
    def parts(self) -> dict[str, int]:
        """The parts that are not zero, in a fixed order."""
        return {name: getattr(self, name) for name in self.LABELS if getattr(self, name)}

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def explain(self) -> str:
        """One line: the total and its parts, in GiB (MiB under 1 GiB)."""
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", MIB)
        digits = 1 if unit == "GiB" else 0
        where = (
            "of RAM" if self.device == "cpu" else ("on one GPU" if self.gpus == 1 else f"on each of {self.gpus} GPUs")
        )
        parts = ", ".join(f"{self.LABELS[name]} {value / scale:.{digits}f}" for name, value in self.parts.items())
        return f"needs about {self.total / scale:.{digits}f} {unit} {where}: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "device": self.device,
            "gpus": self.gpus,
            "dtype": self.dtype,
            "total_bytes": self.total,
            "parts": self.parts,
            "explain": self.explain(),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Target:
    device: Device
    bf16: bool
    engine: Literal["vllm", "transformers"]
    others: Mapping[str, ModelFacts]


def estimate_task(
    document: Document,
    facts: ModelFacts,
    *,
    device: Device = "gpu",
    bf16: bool | None = None,
    auto_engine: Literal["vllm", "transformers"] = "vllm",
    others: Mapping[str, ModelFacts] | None = None,
) -> Estimate:
    """The memory ``document``'s task needs with the model ``facts`` describe.

    ``device`` is where it would run; ``bf16`` whether that device computes in bfloat16 (default: GPUs
    do, CPUs do not: MLOC computes in float32 on a CPU without native bfloat16). ``auto_engine`` is the
    engine ``model.engine: auto`` gets (vLLM where the worker has it). ``others`` holds the facts of the
    other models a task names (reward, value, embedding models) by the identifier the task gives; a
    model missing there is assumed the size of the task's own, and the estimate says so in its notes.
    """
    target = _Target(device, device == "gpu" if bf16 is None else bf16, auto_engine, others or {})
    spec = document.spec
    if isinstance(spec, InferenceSpec | RagSpec | AgentSpec):
        estimate = _inference(spec, facts, target)
    elif isinstance(spec, SFTSpec | DPOSpec | GRPOSpec | PPOSpec):
        estimate = _training(spec, facts, target)
    else:
        raise ModelFactsError(
            f"task type {spec.task_type!r} loads no model MLOC can size; its memory is what "
            "spec.resources.hardware says"
        )
    return _in_ram(estimate, facts) if device == "cpu" else estimate


def _in_ram(estimate: Estimate, facts: ModelFacts) -> Estimate:
    """On a CPU the tokenizer shares the memory, and a load that converts the checkpoint's dtype peaks at
    the converted weights plus the checkpoint's pages (the file is mapped while it is read)."""
    tokenizer = facts.vocab_size * TOKENIZER_BYTES_PER_TOKEN
    loading = 0
    stored = facts.parameters * DTYPE_BYTES["bfloat16"] if facts.format == "gguf" else sum(facts.weight_bytes.values())
    stored_dtype = "bfloat16" if facts.format == "gguf" else facts.dtype
    converts = estimate.dtype not in ("", "nf4", stored_dtype)
    if converts and (facts.quantization is None or facts.format == "gguf"):
        # The tokenizer is loaded first; the running parts come after the load.
        loading = max(0, estimate.weights + stored + estimate.overhead - estimate.total)
    return _replace_estimate(estimate, tokenizer=tokenizer, loading=loading)


def _bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(dtype, 4)


def _text_bytes(*texts: str) -> int:
    return sum(len(text.encode()) for text in texts)


def _inference_workload(spec: InferenceSpec | RagSpec | AgentSpec, batch: int) -> Workload | None:
    """What the executor will ask of the engine, bounded as the loader bounds it (a token is at least a byte)."""
    if isinstance(spec, InferenceSpec):
        return None if spec.inference.input is not None else Workload.of_inference(spec.inference, batch)
    if isinstance(spec, RagSpec):
        options = spec.hyperparameters
        frame = options.prompt_template or options.system_prompt
        # Every retrieved chunk in the prompt, as the RAG executor's own bound does.
        prompt = (
            _text_bytes(frame)
            + max(_text_bytes(q) for q in spec.questions)
            + options.retrieval_k * (options.chunk_size + 32)
        )
        sequences = min(len(spec.questions), batch) * spec.inference.n
        return Workload(prompt + 16 + 2 * CHAT_TURN_TOKENS + spec.inference.max_tokens, sequences)
    # An agent's conversation grows by a reply and a tool result each step.
    agent = spec.hyperparameters
    start = _text_bytes(agent.system_prompt, spec.input or "", *(m.content for m in spec.messages))
    turns = len(spec.messages) + 2 + 2 * agent.max_steps
    grown = start + agent.max_steps * (spec.inference.max_tokens + UNKNOWN_PROMPT_TOKENS)
    return Workload(grown + CHAT_TURN_TOKENS * turns + spec.inference.max_tokens, spec.inference.n)


def _tokens(text_bytes: int, facts: ModelFacts) -> int:
    """Likely tokens in ``text_bytes`` bytes of text for this model's vocabulary."""
    return math.ceil(text_bytes / (BYTES_PER_TOKEN if facts.vocab_size >= LARGE_VOCABULARY else 1))


def _inference(spec: InferenceSpec | RagSpec | AgentSpec, facts: ModelFacts, target: _Target) -> Estimate:
    # A task without a model runs the worker's default (VLLM_MODEL), which ``facts`` describe.
    model = spec.model or ModelSpec.model_validate({"source": {"identifier": "worker-default"}})
    engine = target.engine if model.engine == Engine.AUTO else model.engine.value
    batch = getattr(getattr(spec, "inference", None), "batch_size", None) or DEFAULT_BATCH[engine]
    bound = _inference_workload(spec, batch)
    notes: list[str] = []
    typical = None
    if bound is None:
        notes.append("the dataset's prompts are unknown at submit: the KV cache is sized for the longest context")
    else:
        new = spec.inference.max_tokens
        typical = Workload(_tokens(max(0, bound.context - new), facts) + new, bound.sequences)
    if engine == "vllm":
        estimate = _vllm(model, facts, target, bound, typical, notes)
    else:
        estimate = _transformers(model, facts, target, typical, spec.inference.max_tokens, notes)
    if isinstance(spec, RagSpec):
        embedder = target.others.get(spec.hyperparameters.embedding_model)
        # sentence-transformers loads in float32 on either device.
        size = embedder.parameters * 4 if embedder else MINILM_PARAMETERS * 4
        if embedder is None:
            notes.append(
                f"embedding model {spec.hyperparameters.embedding_model!r} assumed the size of all-MiniLM-L6-v2"
            )
        estimate = _replace_estimate(
            estimate, embedding_model=size, notes=tuple(notes), task=f"rag_inference on {engine}"
        )
    elif isinstance(spec, AgentSpec):
        estimate = _replace_estimate(estimate, task=f"agent_inference on {engine}")
    return estimate


def _replace_estimate(estimate: Estimate, **changes: Any) -> Estimate:
    return Estimate(**{**{item.name: getattr(estimate, item.name) for item in fields(estimate)}, **changes})


def _forward_per_token(facts: ModelFacts, value_bytes: int) -> int:
    """Bytes one token's tensors take inside one layer during a forward pass (no gradients kept)."""
    q, kv = facts.heads * facts.head_dim, facts.kv_heads * facts.head_dim
    return (4 * facts.hidden_size + q + 2 * kv + 3 * facts.intermediate_size) * value_bytes


def _vllm(
    model: ModelSpec,
    facts: ModelFacts,
    target: _Target,
    workload: Workload | None,
    typical: Workload | None,
    notes: list[str],
) -> Estimate:
    """vLLM on a CPU holds what the loader sizes for the workload's bound; on a GPU it claims its share of
    the GPU, which must hold the weights, the profiling pass and the KV cache the task's sequences need."""
    options = model.vllm.model_dump(exclude_none=True)
    shape = facts.shape()
    dtype = choose_dtype(
        model.vllm.dtype,
        facts.dtype,
        on_gpu=target.device == "gpu",
        native_bf16=target.bf16 and facts.dtype == "bfloat16",
    )
    if dtype == "auto":  # vLLM's own rule: the checkpoint's 16-bit dtype, and float32 checkpoints in 16 bits
        dtype = facts.dtype if _bytes(facts.dtype) == 2 else "bfloat16"
    context = model.vllm.max_model_len or choose_context(shape, workload) or CONTEXT_FLOOR
    weights = facts.loaded_bytes(dtype)
    fixed_kv = options.get("kv_cache_memory_bytes")
    # The sampler's float32 logits, and their softmax, over max_num_seqs rows.
    sampler = int(options.get("max_num_seqs") or VLLM_MAX_SEQS) * facts.vocab_size * 4 * 3
    if target.device == "cpu":
        kv = int(fixed_kv) if fixed_kv else kv_cache_bytes(shape, dtype, context, workload)
        activations = VLLM_BATCHED_TOKENS["cpu"] * _forward_per_token(facts, _bytes(dtype)) + sampler
        return Estimate(
            task="inference on vllm",
            device="cpu",
            dtype=dtype,
            weights=weights,
            packed_weights=(VLLM_CPU_WEIGHT_COPIES - 1) * weights,
            kv_cache=kv,
            activations=activations,
            # An engine's first start compiles its kernels; once warm, the activations take that room.
            overhead=max(VLLM_CPU_FIRST_START_BYTES - activations, CPU_RUNTIME_BYTES["inference"]),
            notes=tuple(notes),
        )
    tp = model.vllm.tensor_parallel_size
    max_seqs = int(options.get("max_num_seqs") or VLLM_MAX_SEQS)
    batched = int(options.get("max_num_batched_tokens") or VLLM_BATCHED_TOKENS["gpu"])
    kv_value = 1 if str(options.get("kv_cache_dtype", "")).startswith("fp8") else _bytes(dtype)
    if fixed_kv:
        kv = int(fixed_kv)
    else:
        # vLLM refuses to start without room for one sequence of the full context.
        kv = facts.kv_bytes(1, context, kv_value)
        if typical is not None:
            kv = max(kv, facts.kv_bytes(min(typical.sequences, max_seqs), min(typical.context, context), kv_value))
    # vLLM's profiling pass: one step of max_num_batched_tokens, and sampling over max_num_seqs rows.
    activations = batched * _forward_per_token(facts, _bytes(dtype)) // tp + sampler
    overhead = GPU_CONTEXT_BYTES + (0 if model.vllm.enforce_eager else VLLM_GRAPH_BYTES)
    used = weights // tp + math.ceil(kv / min(tp, facts.kv_heads)) + activations + overhead
    utilization = model.vllm.gpu_memory_utilization
    return Estimate(
        task="inference on vllm",
        device="gpu",
        gpus=tp,
        dtype=dtype,
        weights=weights // tp,
        kv_cache=math.ceil(kv / min(tp, facts.kv_heads)),
        activations=activations,
        overhead=overhead,
        reserve=math.ceil(used / utilization) - used,
        notes=tuple(notes),
    )


def _transformers(
    model: ModelSpec, facts: ModelFacts, target: _Target, workload: Workload | None, new: int, notes: list[str]
) -> Estimate:
    if model.vllm.dtype and model.vllm.dtype != "auto":
        dtype = DTYPE_NAMES.get(model.vllm.dtype, model.vllm.dtype)
    elif target.device == "gpu":
        dtype = facts.dtype  # transformers' 'auto' keeps the checkpoint's dtype
    else:
        dtype = "bfloat16" if facts.dtype == "bfloat16" and target.bf16 else "float32"
    if workload is None:
        workload = Workload(min(facts.max_context, UNKNOWN_PROMPT_TOKENS + new), DEFAULT_BATCH["transformers"])
    prompt = max(1, workload.context - new)
    value = _bytes(dtype)
    # Prefill runs one layer at a time over the whole batch; generate keeps the last position's logits
    # in float32 with a few copies (processors, softmax, sampling).
    activations = workload.sequences * (prompt * _forward_per_token(facts, value) + facts.vocab_size * 4 * 3)
    return Estimate(
        task="inference on transformers",
        device=target.device,
        dtype=dtype,
        weights=facts.loaded_bytes(dtype),
        kv_cache=facts.kv_bytes(workload.sequences, workload.context, value),
        activations=activations,
        overhead=GPU_CONTEXT_BYTES if target.device == "gpu" else CPU_RUNTIME_BYTES["inference"],
        notes=tuple(notes),
    )


# --- training ---------------------------------------------------------------------------------------

# PEFT's default LoRA targets are the query and value projections for most families; for these it has
# no default and MLOC wraps every linear layer.
ALL_LINEAR_DEFAULT = {"phi3", "gemma3", "qwen2_moe", "qwen3_moe"}
# Module names as families spell them -> the projection they are.
TARGET_NAMES = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "query": ("q",), "key": ("k",),
    "value": ("v",), "dense": ("o",), "out_proj": ("o",), "c_attn": ("q", "k", "v"), "query_key_value": ("q", "k", "v"),
    "qkv_proj": ("q", "k", "v"), "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",), "w1": ("gate",),
    "w3": ("up",), "w2": ("down",), "fc1": ("up",), "fc2": ("down",), "c_fc": ("up",), "c_proj": ("down",),
    "gate_up_proj": ("gate", "up"),
}  # fmt: skip


def _linears(facts: ModelFacts) -> dict[str, tuple[int, int]]:
    """Each decoder layer's linear layers: projection -> (inputs, outputs)."""
    h, i = facts.hidden_size, facts.intermediate_size
    q, kv = facts.heads * facts.head_dim, facts.kv_heads * facts.head_dim
    shapes = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "up": (h, i), "down": (i, h)}
    if facts.gated_mlp:
        shapes["gate"] = (h, i)
    return shapes


def _lora_targets(spec_targets: list[str] | str | None, facts: ModelFacts, notes: list[str]) -> list[str]:
    every = list(_linears(facts))
    if spec_targets == "all-linear" or (spec_targets is None and facts.model_type in ALL_LINEAR_DEFAULT):
        return every
    if spec_targets is None:
        return ["q", "v"]
    found: list[str] = []
    for name in spec_targets:
        known = TARGET_NAMES.get(name.rsplit(".", 1)[-1])
        if known is None:
            notes.append(f"LoRA target {name!r} is not a projection MLOC knows; counted as every linear layer")
            return every
        found.extend(part for part in known if part in every and part not in found)
    return found


def _example_bytes(example: Mapping[str, Any]) -> int:
    """A training example's text, in bytes (an upper bound on its tokens), as the model will see it."""
    if "chosen" in example:  # a preference pair: the prompt with the longer answer
        answers = (_flat_bytes(example.get("chosen")), _flat_bytes(example.get("rejected")))
        return _flat_bytes(example.get("prompt")) + max(answers)
    return _flat_bytes(example)


def _flat_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, Mapping):
        turn = CHAT_TURN_TOKENS if "role" in value else 0
        return turn + sum(_flat_bytes(item) for key, item in value.items() if key != "role")
    if isinstance(value, list):
        return sum(_flat_bytes(item) for item in value)
    return 0


def _sequence(dataset: DatasetSpec, hp: TrainHyperparameters, facts: ModelFacts, packing: bool = False) -> int:
    """Tokens per training sequence: max_length, or less when every inline example is shorter."""
    if packing or dataset.examples is None:
        return hp.max_length
    longest = max(_example_bytes(example) for example in dataset.examples)
    return min(hp.max_length, _tokens(longest, facts) + 8)


def _prompt(dataset: DatasetSpec, hp: TrainHyperparameters, facts: ModelFacts) -> int:
    """Tokens per prompt of a prompt-only dataset (GRPO, PPO)."""
    if dataset.examples is None:
        return hp.max_length
    longest = max(_flat_bytes(example.get("prompt", example)) for example in dataset.examples)
    return min(hp.max_length, _tokens(longest, facts) + 8)


def _saved_per_token(facts: ModelFacts, value: int, *, full: bool, lora_inputs: int) -> int:
    """Bytes one token leaves stored in one layer for the backward pass.

    Norms keep their input and output in float32; attention keeps q, k and v (repeated to every head) and
    its output; the MLP keeps its gate, up and activation. A linear layer keeps its input only when its own
    weight trains (full fine-tuning); a LoRA-wrapped one keeps the dropout's output and mask.
    """
    h, i, q = facts.hidden_size, facts.intermediate_size, facts.heads * facts.head_dim
    norms = (4 if facts.model_type in FOUR_NORMS else 2) * 2 * h * 4
    inputs = (2 * h + q + i) * value if full else 0
    return norms + 4 * q * value + (3 if facts.gated_mlp else 2) * i * value + inputs + lora_inputs * (value + 1)


def _activations(
    facts: ModelFacts,
    value: int,
    batch: int,
    seq: int,
    *,
    full: bool,
    lora_inputs: int,
    checkpointing: bool,
    lm_head: bool = True,
) -> int:
    """Forward-and-backward activations of one micro-batch, and TRL's chunked log-probability buffers (which
    also build a float32 gradient of the LM head's weights when those train); a score model has no LM head."""
    tokens = batch * seq
    per_layer = tokens * _saved_per_token(facts, value, full=full, lora_inputs=lora_inputs)
    # With checkpointing a layer keeps only its input; one layer at a time is recomputed in full.
    stored = (
        facts.layers * tokens * facts.hidden_size * value + per_layer if checkpointing else facts.layers * per_layer
    )
    head = tokens * facts.hidden_size * 4 + min(tokens, LOGPROB_TOKENS) * min(facts.vocab_size, LOGPROB_VOCAB) * 4 * 2
    # Training the LM head in 16 bits adds TRL's float32 gradient buffer for it; in float32 that buffer
    # becomes the weight's gradient itself.
    head += facts.vocab_size * facts.hidden_size * 4 if full and value < 4 else 0
    return (
        stored + per_layer + (head if lm_head else 0)
    )  # plus the gradient of one layer's activations while it is worked on


def _optimizer_bytes(optim: str | None, trainable: int, value: int) -> int:
    name = (optim or "adamw_torch_fused").lower()
    if "8bit" in name:
        return 2 * trainable
    if name.startswith("sgd"):
        return 0
    if "adafactor" in name or "lion" in name:
        return trainable * value
    return 2 * trainable * value  # AdamW: two moments in the parameters' dtype


def _score_model_bytes(facts: ModelFacts, value: int) -> int:
    """A sequence-classification model of this architecture: the LM head replaced by a one-output score."""
    head = 0 if facts.tied_embeddings else facts.vocab_size * facts.hidden_size
    return (facts.parameters - head) * value


def _training(spec: SFTSpec | DPOSpec | GRPOSpec | PPOSpec, facts: ModelFacts, target: _Target) -> Estimate:
    hp = spec.hyperparameters
    notes: list[str] = []
    gpu = target.device == "gpu"
    # MLOC trains in bfloat16 on GPUs that have it and in float32 elsewhere, CPUs included.
    compute = "bfloat16" if gpu and target.bf16 else "float32"
    value = _bytes(compute)
    adapter = spec.model.adapter
    kind = "full" if adapter is None else adapter.type.value
    targets = _lora_targets(adapter.target_modules, facts, notes) if adapter else []
    shapes = _linears(facts)
    adapter_params = sum(adapter.r * sum(shapes[name]) for name in targets) * facts.layers if adapter else 0
    lora_inputs = sum(shapes[name][0] for name in targets if name not in ("k", "v")) + (
        facts.hidden_size if {"k", "v"} & set(targets) else 0
    )
    if adapter is not None and adapter.type == AdapterType.QLORA:
        # Linear layers in NF4; PEFT's k-bit preparation casts everything else to float32.
        weights = math.ceil(facts.linear_parameters * NF4_BITS / 8) + (facts.parameters - facts.linear_parameters) * 4
    else:
        weights = facts.loaded_bytes(compute)
    # PEFT keeps adapter weights in float32 whatever the base's dtype.
    trainable, trainable_value = (adapter_params, 4) if adapter else (facts.parameters, value)
    checkpointing = hp.gradient_checkpointing and gpu  # MLOC turns it off on CPUs, where it only costs time
    batch = hp.per_device_train_batch_size
    parts: dict[str, int] = {}
    if isinstance(spec, SFTSpec):
        seq = _sequence(spec.dataset, hp, facts, spec.hyperparameters.packing)
    elif isinstance(spec, DPOSpec):
        seq, batch = _sequence(spec.dataset, hp, facts), 2 * batch  # chosen and rejected in one forward
        if adapter is None:
            parts["reference_model"] = facts.loaded_bytes(compute)
    else:
        completion = spec.hyperparameters.max_completion_length if isinstance(spec, GRPOSpec) else 0
        completion = completion or (spec.hyperparameters.response_length if isinstance(spec, PPOSpec) else 0)
        seq = _prompt(spec.dataset, hp, facts) + completion
    activations = _activations(
        facts, value, batch, seq, full=adapter is None, lora_inputs=lora_inputs, checkpointing=checkpointing
    )
    if not gpu:
        activations = math.ceil(activations * CPU_ACTIVATION_SLACK)
    kv = 0
    if isinstance(spec, GRPOSpec | PPOSpec):
        # Rollouts: GRPO generates a whole generation batch at once, PPO one micro-batch at a time.
        rollouts = batch * hp.gradient_accumulation_steps if isinstance(spec, GRPOSpec) else batch
        kv = facts.kv_bytes(rollouts, seq, value)
        parts.update(_rl_models(spec, facts, target, value, adapter is None, notes))
        if isinstance(spec, PPOSpec):
            # TRL's PPO holds the response's full logits (float32) for the policy's loss, and trains the
            # value model beside the policy on the same sequences.
            activations += batch * spec.hyperparameters.response_length * facts.vocab_size * 4 * 3
            critic = target.others.get(spec.hyperparameters.value_model or spec.hyperparameters.reward_model, facts)
            activations += _activations(
                critic, value, batch, seq, full=True, lora_inputs=0, checkpointing=checkpointing, lm_head=False
            )
    return Estimate(
        task=f"{spec.task_type} {'full' if kind == 'full' else 'with ' + kind}",
        device=target.device,
        dtype="nf4" if kind == "qlora" else compute,
        weights=weights,
        adapter=adapter_params * 4,
        gradients=trainable * trainable_value,
        optimizer=_optimizer_bytes(hp.optim, trainable, trainable_value),
        activations=activations,
        kv_cache=kv,
        overhead=GPU_CONTEXT_BYTES if gpu else CPU_RUNTIME_BYTES["training"],
        notes=tuple(notes),
        **parts,
    )


def _rl_models(
    spec: GRPOSpec | PPOSpec, facts: ModelFacts, target: _Target, value: int, full: bool, notes: list[str]
) -> dict[str, int]:
    """The models beside the policy: reference (unless an adapter makes it free), reward and value."""
    parts: dict[str, int] = {}
    hp = spec.hyperparameters
    needs_reference = isinstance(spec, PPOSpec) or spec.hyperparameters.beta > 0
    if needs_reference and full:
        parts["reference_model"] = facts.loaded_bytes("bfloat16" if value == 2 else "float32")

    def other(identifier: str, role: str) -> ModelFacts:
        known = target.others.get(identifier)
        if known is None:
            notes.append(f"{role} {identifier!r} assumed the size of the policy")
        return known or facts

    if hp.reward_model:
        parts["reward_model"] = _score_model_bytes(other(hp.reward_model, "reward model"), value)
    if isinstance(spec, PPOSpec):
        ppo = spec.hyperparameters
        critic = other(ppo.value_model or ppo.reward_model, "value model")
        size = _score_model_bytes(critic, value)
        # The value model trains in full: its weights, gradients and AdamW's two moments.
        parts["value_model"] = 4 * size
    return parts
