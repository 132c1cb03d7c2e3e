"""The engine layer on real tiny models: prompt rendering, token counting and the warm-engine cache."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mloc.llm import text
from mloc.llm.base import Generation
from mloc.llm.cache import EngineCache
from mloc.llm.hf_engine import TransformersEngine
from mloc.spec.sampling import Message, Sampling
from tests.llm.builders import TINY_HIDDEN
from tests.support.tiny_model import build_tiny_causal_lm

pytestmark = pytest.mark.extra("inference")


def test_stop_strings_cut_at_the_earliest_one() -> None:
    assert text.cut_at_stop("a, b. c", [".", ","]) == ("a", True)
    assert text.cut_at_stop("abc", ["x", ""]) == ("abc", False)


def test_a_base_models_reply_to_a_plain_conversation_ends_at_any_turn_it_writes() -> None:
    # What Gemma 3 270M (no chat template) wrote after "System: ...\nUser: Name a color.\nAssistant:".
    written = " Name a color.\nAssistant: Name a color.\nAssistant: Name a color."
    assert text.cut_at_stop(written, text.PLAIN_TURN_STOPS) == (" Name a color.", True)
    assert text.cut_at_stop(" Blue.\nUser: and?", text.PLAIN_TURN_STOPS) == (" Blue.", True)


def test_engine_counts_tokens_as_its_tokenizer_and_knows_its_context(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    engine = TransformersEngine("tiny", tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert engine.count_tokens("The quick brown fox") == len(tokenizer("The quick brown fox").input_ids)
    assert engine.max_context == 512
    assert engine.memory_bytes > 0 and not engine.has_chat_template


def test_a_prompt_already_starting_with_bos_gets_no_second_one(tiny_chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    with_bos = tokenizer.bos_token + "Hello"
    ids = text.encode(tokenizer, with_bos)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_chat_renders_through_the_template_or_as_plain_turns(tiny_model: Path, tiny_chat_model: Path) -> None:
    conversation = [Message(role="system", content="Be brief."), Message(role="user", content="Hi")]
    templated = TransformersEngine("chat", tiny_chat_model)
    assert templated.has_chat_template
    assert templated.render_chat(conversation) == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>"
    plain = TransformersEngine("plain", tiny_model)
    assert plain.render_chat(conversation) == "System: Be brief.\nUser: Hi\nAssistant:"


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model: Path) -> None:
    """Left padding must not change what a prompt generates."""
    engine = TransformersEngine("tiny", tiny_model)
    sampling = Sampling.model_validate({"max_tokens": 6, "temperature": 0})
    prompts = ["Question: What is the capital of France?\nAnswer:", "print"]
    batched = [samples[0].output for samples in engine.generate(prompts, sampling)]
    single = [engine.generate([prompt], sampling)[0][0].output for prompt in prompts]
    assert batched == single


def test_prompts_with_their_own_sampling_get_what_a_call_each_would_give(tiny_model: Path) -> None:
    engine = TransformersEngine("tiny", tiny_model)
    short = Sampling.model_validate({"max_tokens": 2, "temperature": 0})
    long = Sampling.model_validate({"max_tokens": 7, "temperature": 0})
    twice = Sampling.model_validate({"max_tokens": 3, "temperature": 0.9, "seed": 4, "n": 2})
    prompts = ["Question: What is the capital of France?\nAnswer:", "print", "The quick brown fox", "def add"]
    samplings = [long, short, twice, short]
    mixed = engine.generate(prompts, samplings)
    alone = [engine.generate([prompt], sampling)[0] for prompt, sampling in zip(prompts, samplings, strict=True)]

    def seen(samples: list[Generation]) -> list[tuple[str, str, int, int]]:
        return [(s.output, s.finish_reason, s.prompt_tokens, s.completion_tokens) for s in samples]

    assert [seen(samples) for samples in mixed] == [seen(samples) for samples in alone]
    assert [[s.completion_tokens for s in samples] for samples in mixed] == [[7], [2], [3, 3], [2]]
    assert [{s.index for s in samples} for samples in mixed] == [{0}, {1}, {2}, {3}]
    # One Sampling for all of them is the same as that one given to each.
    assert engine.generate(prompts, short) == engine.generate(prompts, [short] * len(prompts))

    with pytest.raises(ValueError, match="2 samplings for 4 prompts"):
        engine.generate(prompts, [short, long])
    cancelled = threading.Event()
    cancelled.set()
    assert engine.generate(prompts, samplings, cancel=cancelled) == []


def test_a_seed_of_minus_one_is_no_seed_as_vllm_reads_it(tiny_model: Path) -> None:
    import torch

    engine = TransformersEngine("tiny", tiny_model)
    prompts = ["The quick brown fox", "def add"]

    def drawn(seed: int | None) -> list[str]:
        torch.manual_seed(7)  # the process's generator, which an unseeded call draws from
        sampling = Sampling.model_validate({"max_tokens": 8, "temperature": 2.0, "seed": seed, "n": 3})
        return [s.output for samples in engine.generate(prompts, sampling) for s in samples]

    assert drawn(-1) == drawn(None)
    assert drawn(-1) != drawn(-2)  # a real seed fixes its own draw


def test_cache_evicts_the_least_recently_used_engine(tiny_model: Path, tmp_path: Path) -> None:
    paths = [
        tiny_model,
        *(build_tiny_causal_lm(tmp_path / f"m{i}", hidden_size=TINY_HIDDEN, seed=i) for i in (1, 2)),
    ]
    size = TransformersEngine("probe", tiny_model).memory_bytes
    cache = EngineCache(budget_bytes=int(size * 2.5))

    def load(index: int) -> TransformersEngine:
        engine = cache.load(f"k{index}", size, lambda: TransformersEngine(f"m{index}", paths[index]))
        assert isinstance(engine, TransformersEngine)
        return engine

    first = load(0)
    load(1)
    assert load(0) is first  # a hit: no load, and k0 becomes most recently used
    load(2)
    assert cache.lru_keys() == ["k0", "k2"]
    assert cache.evictions == ["k1"] and cache.loads == 3
    assert cache.used_bytes <= cache.budget_bytes


def test_a_model_larger_than_the_budget_is_still_loaded_alone(tiny_model: Path) -> None:
    cache = EngineCache(budget_bytes=1)
    cache.load("a", 10, lambda: TransformersEngine("a", tiny_model))
    cache.load("b", 10, lambda: TransformersEngine("b", tiny_model))
    assert cache.lru_keys() == ["b"]


@pytest.mark.parametrize("rank,expected", [(4, 8), (8, 8), (12, 16), (64, 64)])
def test_vllm_lora_rank_is_rounded_up_to_a_supported_size(tmp_path: Path, rank: int, expected: int) -> None:
    from mloc.llm.vllm_engine import lora_rank

    (tmp_path / "adapter_config.json").write_text(f'{{"r": {rank}}}')
    assert lora_rank(tmp_path) == expected
