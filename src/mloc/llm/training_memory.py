"""The memory a training task needs: SFT, DPO, GRPO and PPO, in full or with LoRA or QLoRA, with the
optimizer states, gradients, activations and the models beside the policy (reference, reward, value)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mloc.llm.estimate import (
    CPU_ACTIVATION_SLACK,
    CPU_RUNTIME_BYTES,
    GPU_CONTEXT_BYTES,
    LOGPROB_TOKENS,
    LOGPROB_VOCAB,
    NF4_BITS,
    Estimate,
    Target,
    likely_tokens,
    value_bytes,
)
from mloc.llm.loader import CHAT_TURN_TOKENS
from mloc.llm.modelfacts import FOUR_NORMS, ModelFacts
from mloc.spec.base import AdapterType
from mloc.spec.train import DatasetSpec, DPOSpec, GRPOSpec, PPOSpec, SFTSpec, TrainHyperparameters

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
    return min(hp.max_length, likely_tokens(longest, facts) + 8)


def _prompt(dataset: DatasetSpec, hp: TrainHyperparameters, facts: ModelFacts) -> int:
    """Tokens per prompt of a prompt-only dataset (GRPO, PPO)."""
    if dataset.examples is None:
        return hp.max_length
    longest = max(_flat_bytes(example.get("prompt", example)) for example in dataset.examples)
    return min(hp.max_length, likely_tokens(longest, facts) + 8)


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


def training_estimate(spec: SFTSpec | DPOSpec | GRPOSpec | PPOSpec, facts: ModelFacts, target: Target) -> Estimate:
    hp = spec.hyperparameters
    notes: list[str] = []
    gpu = target.device == "gpu"
    # MLOC trains in bfloat16 on GPUs that have it and in float32 elsewhere, CPUs included.
    compute = "bfloat16" if gpu and target.bf16 else "float32"
    value = value_bytes(compute)
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
    spec: GRPOSpec | PPOSpec, facts: ModelFacts, target: Target, value: int, full: bool, notes: list[str]
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
