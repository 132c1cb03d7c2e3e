"""A GGUF file's header: its metadata and tensor list, and the :class:`ModelFacts` they give, read
without the weights (exact parameter and byte counts per quantization type)."""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mloc.llm.modelfacts import ModelFacts, ModelFactsError

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


class GgufHeaderCut(ModelFactsError):
    """The header goes on past the bytes at hand: a file cut short, or a range read that was too short."""


class _Reader:
    def __init__(self, handle: BinaryIO, source: str) -> None:
        self.handle, self.source = handle, source

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise GgufHeaderCut(f"{self.source}: the GGUF header ends early; the file is cut short or not a GGUF")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        length = self.take("<Q")
        if length > 1 << 24:
            raise ModelFactsError(f"{self.source}: a GGUF string claims {length} bytes; the header is corrupt")
        data = self.handle.read(length)
        if len(data) != length:
            raise GgufHeaderCut(f"{self.source}: the GGUF header ends early; the file is cut short or not a GGUF")
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
        return read_gguf_from(handle, str(path))


def read_gguf_from(handle: BinaryIO, source: str) -> tuple[dict[str, Any], list[GgufTensor]]:
    """:func:`read_gguf` from an open file or the first bytes of one (``source`` names it in errors);
    :class:`GgufHeaderCut` when the header goes on past what ``handle`` holds."""
    reader = _Reader(handle, source)
    if handle.read(4) != b"GGUF":
        raise ModelFactsError(f"{source}: not a GGUF file (it does not start with 'GGUF')")
    version = reader.take("<I")
    if version < 2:
        raise ModelFactsError(f"{source}: GGUF version {version} is too old; convert it again with llama.cpp")
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
            raise ModelFactsError(f"{source}: tensor {name} has ggml type {type_id}, which MLOC does not know")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        elements = math.prod(shape)
        tensors.append(GgufTensor(name, shape, type_name, elements, elements // block * block_bytes, offset))
    return metadata, tensors


def facts_from_gguf(path: Path) -> ModelFacts:
    """Facts from a GGUF file's header: exact parameter and byte counts from its tensor list."""
    return facts_from_gguf_header(*read_gguf(path), source=str(path))


def facts_from_gguf_bytes(data: bytes, source: str) -> ModelFacts:
    """Facts from the first bytes of a GGUF file (a range read); :class:`GgufHeaderCut` if too few."""
    return facts_from_gguf_header(*read_gguf_from(io.BytesIO(data), source), source=source)


def facts_from_gguf_header(metadata: dict[str, Any], tensors: list[GgufTensor], *, source: str) -> ModelFacts:
    """Facts from a GGUF header read by :func:`read_gguf_from`."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFactsError(f"{source}: GGUF key general.architecture is missing; the file does not say its model")

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            value = max(value)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFactsError(f"{source}: GGUF key {arch}.{key} is missing or not a positive number ({value!r})")
        return value

    names = {tensor.name for tensor in tensors}
    hidden, heads, layers = number("embedding_length"), number("attention.head_count"), number("block_count")
    vocab = metadata.get(f"{arch}.vocab_size") or metadata.get("tokenizer.ggml.tokens")
    if not isinstance(vocab, int):
        embedding = next((t for t in tensors if t.name == "token_embd.weight"), None)
        vocab = max(embedding.shape) if embedding else None
    if not isinstance(vocab, int):
        raise ModelFactsError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is in the GGUF header")
    by_type: dict[str, int] = {}
    for tensor in tensors:
        by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + tensor.bytes
    window = metadata.get(f"{arch}.attention.sliding_window")
    every = GGUF_FULL_EVERY.get(arch)
    sliding = sum(1 for index in range(layers) if (index + 1) % every) if window and every else 0
    file_type = metadata.get("general.file_type")
    return ModelFacts(
        source=source,
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
