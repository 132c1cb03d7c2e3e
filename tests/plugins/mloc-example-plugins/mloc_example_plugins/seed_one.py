"""``seed_one_echo``: an executor written exactly in the first seed's form.

It sets only ``name`` and implements ``run(task, out_dir)``; MLOC serves it under its entry point's
name and hands it the task as plain data. ``hyperparameters.fail`` makes it raise ExecutionError, to
show how a plug-in fails its task with a message.
"""

from pathlib import Path

from mloc.executors.base_executor import ExecutionError, Executor  # seed 1's import path


class SeedOneEchoExecutor(Executor):
    name = "seed-one-echo"

    # The seed's signature; MLOC adapts it where the class is created (hence the differing override).
    def run(self, task: dict, out_dir: Path) -> dict:  # type: ignore[override]
        options = task["spec"].get("hyperparameters", {})
        if options.get("fail"):
            raise ExecutionError(str(options["fail"]))
        result = {
            "ok": True,
            "message": "Task completed",
            "echo": options.get("message"),
            "task_name": task["metadata"].get("name"),
            "out_dir": out_dir.name,
        }
        self.save_json(out_dir / "responses.json", result)
        return result
