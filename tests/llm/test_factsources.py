"""The facts a worker publishes of the models its disk holds, and the name each goes by: read from real
folders laid out as the download cache, the packaged-model builds and a Hugging Face cache lay them out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mloc.llm.downloads import COMPLETE, ENTRY_FILE, downloads_root
from mloc.llm.factsources import facts_key, held_model_facts
from mloc.llm.modelfacts import ModelFacts, ModelFactsError, facts_from_config
from mloc.llm.modelsource import CONVERTED_DIR, MARKER
from mloc.spec.base import ModelSource, SourceType
from tests.support.gguf_file import write_tiny_llama_gguf
from tests.unit.test_memfit import GEMMA3_270M, LLAMA3_8B, QWEN25_05B


def entry(models_dir: Path, name: str, kind: str, source: str) -> Path:
    folder = downloads_root(models_dir) / name
    folder.mkdir(parents=True)
    (folder / ENTRY_FILE).write_text(json.dumps({"kind": kind, "source": source}))
    return folder


def config(folder: Path, data: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_facts_go_by_the_names_held_models_uses() -> None:
    assert facts_key(ModelSource(identifier="Qwen/Qwen2.5-0.5B")) == "Qwen/Qwen2.5-0.5B"
    assert facts_key(ModelSource(identifier="https://h/m.gguf")) == "https://h/m.gguf"
    assert facts_key(ModelSource(type="package", identifier="tiny-llama")) == "package:mloc-tiny-llama"
    # A task cannot name an unknown packaged model any more; one stored before that was refused has no key.
    unknown = ModelSource.model_construct(type=SourceType.PACKAGE, identifier="no-such-package")
    assert facts_key(unknown) is None
    assert facts_key(ModelSource(type="local", identifier="/models/x")) is None


def test_a_worker_publishes_the_facts_of_each_model_on_its_disk(tmp_path: Path) -> None:
    models = tmp_path / "models"
    hub = entry(models, "hf--Qwen--Qwen2.5-0.5B", "huggingface", "Qwen/Qwen2.5-0.5B")
    config(hub / ("a" * 40), QWEN25_05B)
    (hub / ("a" * 40) / COMPLETE).write_text("done")
    config(hub / ("b" * 40), LLAMA3_8B)  # a download never completed: not the model
    write_tiny_llama_gguf(entry(models, "model.gguf-1", "url", "https://files/model.gguf") / "model.gguf")
    built = config(models / CONVERTED_DIR / "gemma3-270m", GEMMA3_270M)
    (built / MARKER).write_text("built")
    entry(models, "broken", "url", "s3://bucket/broken")  # holds nothing readable
    cache = tmp_path / "hf-cache"
    config(cache / "models--meta-llama--Meta-Llama-3-8B" / "snapshots" / "main-commit", LLAMA3_8B)
    published = held_model_facts(models, hf_cache=cache)
    assert sorted(published) == [
        "Qwen/Qwen2.5-0.5B",
        "https://files/model.gguf",
        "meta-llama/Meta-Llama-3-8B",
        "package:gemma3-270m",
    ]
    qwen = ModelFacts.from_wire(published["Qwen/Qwen2.5-0.5B"], source="worker w1")
    assert qwen == facts_from_config(QWEN25_05B, source=str(hub / ("a" * 40) / "config.json"))
    gguf = ModelFacts.from_wire(published["https://files/model.gguf"], source="worker w1")
    assert (gguf.format, gguf.quantization, gguf.vocab_size) == ("gguf", "Q8_0", 1000)
    # A few hundred bytes a model.
    assert all(len(json.dumps(facts)) < 1024 for facts in published.values())


def test_published_facts_that_do_not_read_are_refused_naming_the_field() -> None:
    wire = facts_from_config(LLAMA3_8B).to_wire()
    assert ModelFacts.from_wire({**wire, "added_by_a_newer_mloc": 1}, source="w") == facts_from_config(LLAMA3_8B)
    with pytest.raises(ModelFactsError, match=r"worker w2: published model facts lack layers"):
        ModelFacts.from_wire({k: v for k, v in wire.items() if k != "layers"}, source="worker w2")
    with pytest.raises(ModelFactsError, match=r"give hidden_size = 'big', not a count"):
        ModelFacts.from_wire({**wire, "hidden_size": "big"}, source="w")
    with pytest.raises(ModelFactsError, match=r"not a JSON object"):
        ModelFacts.from_wire([1, 2], source="w")
