"""A small GGUF file written byte by byte as the format lays it out (header, metadata, tensor infos,
aligned data), for tests that read GGUF headers without the gguf package or a real model."""

from __future__ import annotations

import struct
from pathlib import Path

# GGUF value types and ggml tensor types used here.
UINT32, STRING, ARRAY = 4, 8, 9
F32, Q8_0 = 0, 8
ALIGNMENT = 32


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(value: int | str | list[str]) -> bytes:
    if isinstance(value, int):
        return struct.pack("<I", UINT32) + struct.pack("<I", value)
    if isinstance(value, str):
        return struct.pack("<I", STRING) + _string(value)
    return struct.pack("<I", ARRAY) + struct.pack("<IQ", STRING, len(value)) + b"".join(map(_string, value))


def tiny_llama_gguf(*, vocab: int = 1000, hidden: int = 64, layers: int = 2, ffn: int = 128) -> bytes:
    """A Llama GGUF (Q8_0 blocks, F32 norms) whose tokenizer holds ``vocab`` tokens: a large vocabulary
    makes a header of several MiB, as real models have."""
    metadata: dict[str, int | str | list[str]] = {
        "general.architecture": "llama",
        "general.file_type": 7,  # MOSTLY_Q8_0
        "llama.context_length": 2048,
        "llama.embedding_length": hidden,
        "llama.block_count": layers,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 4,
        "tokenizer.ggml.tokens": [f"token-{index:07d}" for index in range(vocab)],
    }
    tensors: list[tuple[str, tuple[int, ...], int]] = [("token_embd.weight", (hidden, vocab), Q8_0)]
    for block in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors.append((f"blk.{block}.{name}.weight", (hidden, hidden), Q8_0))
        tensors += [
            (f"blk.{block}.ffn_gate.weight", (hidden, ffn), Q8_0),
            (f"blk.{block}.ffn_up.weight", (hidden, ffn), Q8_0),
            (f"blk.{block}.ffn_down.weight", (ffn, hidden), Q8_0),
            (f"blk.{block}.attn_norm.weight", (hidden,), F32),
            (f"blk.{block}.ffn_norm.weight", (hidden,), F32),
        ]
    tensors += [("output_norm.weight", (hidden,), F32), ("output.weight", (hidden, vocab), Q8_0)]
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(_string(key) + _value(value) for key, value in metadata.items())
    infos, offset, sizes = b"", 0, []
    for name, shape, kind in tensors:
        elements = 1
        for dim in shape:
            elements *= dim
        size = elements * 4 if kind == F32 else elements // 32 * 34
        infos += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", kind, offset)
        sizes.append(size)
        offset += -(-size // ALIGNMENT) * ALIGNMENT
    head = header + infos
    head += b"\0" * (-len(head) % ALIGNMENT)
    return head + b"\0" * offset


def write_tiny_llama_gguf(path: Path, **shape: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_llama_gguf(**shape))
    return path
