"""What a model is, read from its ``config.json`` without loading it: :class:`ModelFacts`.

The orchestrator reads these facts to size a task before anything is loaded, so nothing here imports
torch. :func:`model_facts` takes a config dict, a ``config.json``, a model folder (config plus the
weights' size) or a ``.gguf`` file (read by :mod:`mloc.llm.ggufheader`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mloc.errors import MlocError
from mloc.llm.loader import CONTEXT_FLOOR, DTYPE_BYTES, DTYPE_NAMES, ModelShape


class ModelFactsError(MlocError):
    """A model's config or GGUF header cannot be read, or lacks a field the estimate needs."""

    status_code = 422
    code = "unreadable_model_config"


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

    def to_wire(self) -> dict[str, Any]:
        """The facts as a small JSON object (a few hundred bytes), as a worker publishes them."""
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        data["weight_bytes"] = dict(self.weight_bytes)
        return data

    @classmethod
    def from_wire(cls, data: Any, *, source: str) -> ModelFacts:
        """Facts another process published (:meth:`to_wire`); fields a newer MLOC adds are ignored, and
        :class:`ModelFactsError` names what does not read (``source``: who published them)."""
        if not isinstance(data, Mapping):
            raise ModelFactsError(f"{source}: published model facts are not a JSON object")
        kinds = {item.name: item for item in fields(cls)}
        given = {name: value for name, value in data.items() if name in kinds}
        required = [name for name, item in kinds.items() if item.default is MISSING and item.default_factory is MISSING]
        missing = [name for name in required if name not in given]
        if missing:
            raise ModelFactsError(f"{source}: published model facts lack {', '.join(missing)}")
        for name, value in given.items():
            if name in _WIRE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ModelFactsError(f"{source}: published model facts give {name} = {value!r}, not a count")
        weights = given.get("weight_bytes", {})
        if not isinstance(weights, Mapping) or not all(isinstance(v, int) for v in weights.values()):
            raise ModelFactsError(f"{source}: published model facts give weight_bytes = {weights!r}")
        return cls(**given)


# Fields of :class:`ModelFacts` a published copy must give as whole numbers.
_WIRE_INTS = {"parameters", "hidden_size", "layers", "heads", "kv_heads", "head_dim", "intermediate_size",
              "vocab_size", "max_context", "sliding_layers", "experts", "linear_parameters"}  # fmt: skip


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
        from mloc.llm.ggufheader import facts_from_gguf

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
