"""Tiny but real causal language models: random weights and a tokenizer trained here, in seconds, offline.

A tiny model loads through the same code paths as a hub model (an HF folder with config, weights and
tokenizer) and trains or generates in milliseconds on a CPU, so it checks a whole pipeline (inference,
SFT, DPO, GRPO, PPO) where no real model is at hand. Its answers are noise: it is for plumbing, not for
text. Workers build the packaged model ``mloc-tiny-llama`` with :func:`build_builtin` on first use; the
tests build variants with :func:`build_tiny_causal_lm`. ``python -m mloc.llm.tiny FOLDER`` writes one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CORPUS = [
    "Question: What is the capital of France?\nAnswer: Paris is the capital of France.",
    "Question: What colour is the sky?\nAnswer: The sky is blue on a clear day.",
    "Question: How many legs does a spider have?\nAnswer: A spider has eight legs.",
    "The quick brown fox jumps over the lazy dog.",
    "MLOC schedules inference, fine-tuning and retrieval tasks on a fleet of workers.",
    "Redis streams deliver each assignment at least once to a consumer group.",
    "def add(a, b):\n    return a + b\n",
    "print(2 + 2)",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The packaged model's size: vLLM's CPU attention kernels take head sizes of 32 and up, and
# 256 / 4 heads = 64 fits, so the same folder runs on both engines.
BUILTIN_HIDDEN = 256


def build_tiny_causal_lm(
    path: Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    chat_template: bool = False,
    seed: int = 0,
) -> Path:
    """Write a Llama-architecture model folder at ``path`` (idempotent) and return it."""
    if (path / "config.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|tool|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    (path / "mloc_tiny.json").write_text(json.dumps({"seed": seed, "corpus": len(CORPUS)}))
    return path


def build_builtin(path: Path) -> Path:
    """The packaged model ``mloc-tiny-llama``: with a chat template, so chat data and agents work too."""
    return build_tiny_causal_lm(path, hidden_size=BUILTIN_HIDDEN, chat_template=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mloc.llm.tiny FOLDER   (writes the mloc-tiny-llama model there)", file=sys.stderr)
        return 2
    print(build_builtin(Path(argv[0]).expanduser()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
