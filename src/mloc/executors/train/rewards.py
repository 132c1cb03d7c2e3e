"""The built-in GRPO reward functions that ``hyperparameters.reward_funcs`` names.

Each takes TRL's reward-function arguments (the batch's prompts and completions, plus the dataset's other
columns as keyword lists) and returns one float per completion. Their names and arguments are checked
when a task is submitted (:func:`mloc.spec.train.parse_reward_func`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from mloc.errors import ExecutionError
from mloc.spec.train import parse_reward_func

RewardFunc = Callable[..., list[float]]
DEFAULT_LENGTH = 100


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes a string, or a list of messages for chat prompts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _named(func: RewardFunc, name: str) -> RewardFunc:
    # TRL logs each reward under its function's name (rewards/<name>/mean).
    func.__name__ = re.sub(r"\W+", "_", name).strip("_") or "reward"
    return func


def length_reward(target: int) -> RewardFunc:
    def reward(completions: list[Any], **_: Any) -> list[float]:
        return [max(-1.0, 1.0 - abs(len(completion_text(c)) - target) / target) for c in completions]

    return reward


def contains_reward(word: str) -> RewardFunc:
    needle = word.lower()

    def reward(completions: list[Any], **_: Any) -> list[float]:
        return [1.0 if needle in completion_text(c).lower() else 0.0 for c in completions]

    return reward


def regex_reward(pattern: str) -> RewardFunc:
    compiled = re.compile(pattern)

    def reward(completions: list[Any], **_: Any) -> list[float]:
        return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]

    return reward


def answer_reward(column: str) -> RewardFunc:
    def reward(completions: list[Any], **columns: Any) -> list[float]:
        answers = columns.get(column)
        if answers is None:
            raise ExecutionError(f"reward function 'answer' needs a dataset column {column!r}; it is missing")
        return [
            1.0 if str(answer).strip() and str(answer).strip().lower() in completion_text(c).lower() else 0.0
            for c, answer in zip(completions, answers, strict=True)
        ]

    return reward


def json_reward(completions: list[Any], **_: Any) -> list[float]:
    scores = []
    for completion in completions:
        try:
            json.loads(completion_text(completion))
            scores.append(1.0)
        except ValueError:
            scores.append(0.0)
    return scores


def distinct_reward(completions: list[Any], **_: Any) -> list[float]:
    scores = []
    for completion in completions:
        words = completion_text(completion).split()
        scores.append(len(set(words)) / len(words) if words else 0.0)
    return scores


def build(text: str) -> RewardFunc:
    """The reward function for one ``reward_funcs`` entry."""
    name, arg = parse_reward_func(text)
    func: RewardFunc
    if name == "length":
        func = length_reward(int(arg) if arg else DEFAULT_LENGTH)
    elif name == "contains":
        assert arg is not None
        func = contains_reward(arg)
    elif name == "regex":
        assert arg is not None
        func = regex_reward(arg)
    elif name == "answer":
        func = answer_reward(arg or "answer")
    elif name == "json":
        func = json_reward
    elif name == "distinct":
        func = distinct_reward
    else:  # parse_reward_func accepts only the names above; a new name needs a branch here.
        raise ExecutionError(f"reward function {name!r} has no implementation")
    return _named(func, text if name != "regex" else "regex")
