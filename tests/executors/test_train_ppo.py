"""ppo for real: TRL 1.12's PPOTrainer in the PPO environment (scripts/setup_ppo_env.sh).

The executor runs under the PPO environment's interpreter, exactly as a worker with
MLOC_EXECUTOR_PYTHON=ppo=<venv>/bin/python does: policy, value model, reward model and KL against the
reference, then a retry of the same task resuming from its checkpoint, then a cancel.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.executors.support_train import build_models

pytestmark = pytest.mark.extra("ppo", "train")

ROOT = Path(__file__).resolve().parents[2]


def ppo_python() -> Path:
    configured = os.environ.get("MLOC_PPO_PYTHON")
    python = Path(configured) if configured else ROOT / ".venv-ppo" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no PPO environment at {python}: run scripts/setup_ppo_env.sh (or set MLOC_PPO_PYTHON)")
    return python


SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from mloc.errors import TaskCancelled
    from mloc.executors.train import PPOExecutor
    from tests.executors.support_train import QA, make_context, task_yaml

    model, out = Path(sys.argv[2]), Path(sys.argv[3])
    hyper = {
        "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "batch_size": 4, "save_steps": 2,
        "reward_model": str(model), "ppo_epochs": 2, "target_kl": 0.01, "kl_coef": 0.05, "kl_horizon": 40,
        "response_length": 6,
    }
    text = task_yaml("ppo", model, {"examples": QA * 2}, hyper, adapter={"type": "lora", "r": 4})
    report = {"missing": PPOExecutor.missing_requirements()}

    # Attempt 1 stops (as if the worker were lost) after update 2: max_steps 2, checkpoint at 2.
    ctx, events = make_context(text.replace("max_steps: 3", "max_steps: 2"), out)
    report["first"] = PPOExecutor().run(ctx)
    report["first_metrics"] = [e for e in events.events if e["ev"] == "metrics"]
    # Attempt 2 of the full task resumes at update 2 and does the third.
    ctx, events = make_context(text, out, attempt=2)
    report["retry"] = PPOExecutor().run(ctx)
    report["retry_metrics"] = [e for e in events.events if e["ev"] == "metrics"]

    # Cancel during a longer run: it stops after the update in progress.
    ctx, events = make_context(text.replace("max_steps: 3", "max_steps: 50"), out.parent / "cancel")
    def cancel():
        while not any(e["ev"] == "metrics" for e in list(events.events)):
            time.sleep(0.05)
        report["cancel_set"] = time.monotonic()
        ctx.cancel_event.set()
    threading.Thread(target=cancel, daemon=True).start()
    try:
        PPOExecutor().run(ctx)
    except TaskCancelled as exc:
        report["cancelled"] = str(exc)
        report["cancel_took"] = time.monotonic() - report["cancel_set"]
    report["cancel_checkpoints"] = sorted(p.name for p in ctx.checkpoint_dir.glob("checkpoint-*"))
    print("REPORT " + json.dumps(report))
    """
)


def test_ppo_trains_with_reward_value_and_kl_then_resumes_and_cancels(tmp_path: Path) -> None:
    python = ppo_python()
    models = build_models(tmp_path / "models")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(
        [str(python), "-c", SCRIPT, str(ROOT), str(models["base"]), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(lines[-1].removeprefix("REPORT "))

    assert report["missing"] == []
    first, retry = report["first"], report["retry"]
    assert first["ok"] and first["task_type"] == "ppo" and first["global_step"] == 2
    assert first["trl_version"] == "1.12.0"
    steps = [event["values"] for event in report["first_metrics"]]
    assert len(steps) == 2
    for values in steps:
        # Every update reports the reward model's score, the KL to the reference and both losses.
        assert {"reward", "kl", "policy_loss", "value_loss", "approx_kl", "kl_coef"} <= set(values)
    # At the first update the policy still equals the reference (KL about 0, below target_kl), so the
    # adaptive controller lowers kl_coef by its largest step: 0.05 * (1 - 0.2 * batch 4 / horizon 40).
    assert steps[0]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 40))
    assert (Path(first["adapter"]) / "adapter_model.safetensors").is_file()
    assert first["usage"]["train_samples"] == 8

    assert retry["resumed_from_step"] == 2 and retry["global_step"] == 3
    assert [event["step"] for event in report["retry_metrics"]] == [3]
    assert retry["usage"]["train_samples"] == 4

    assert "cancelled at update" in report["cancelled"]
    assert report["cancel_took"] < 30
    assert report["cancel_checkpoints"], "cancel saved no checkpoint"
