"""``seed_one_echo``: an executor written exactly in the first seed's form.

It sets only ``name`` and implements ``run(task, out_dir)``; MLOC serves it under its entry point's
name and hands it the task as plain data. ``hyperparameters.fail`` makes it raise ExecutionError, to
show how a plug-in fails its task with a message; ``hyperparameters.chatter`` makes it write as such
code does: prints, its own logger, a library's logger, and a library writing straight to stderr.
"""

import logging
import sys
from pathlib import Path

from mloc.executors.base_executor import ExecutionError, Executor  # seed 1's import path


class SeedOneEchoExecutor(Executor):
    name = "seed-one-echo"

    # The seed's signature; MLOC adapts it where the class is created (hence the differing override).
    def run(self, task: dict, out_dir: Path) -> dict:  # type: ignore[override]
        options = task["spec"].get("hyperparameters", {})
        if options.get("chatter"):
            print("hello from seed_one_echo")
            logging.getLogger(__name__).warning("a warning of the plug-in's own")
            logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=4)) after connection broken")
            print("INFO 05-09 07:35:25 [loader.py:12] Loading weights took 0.52 seconds", file=sys.stderr)
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
