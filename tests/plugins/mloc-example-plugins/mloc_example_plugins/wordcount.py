"""``seed_two_wordcount``: a task module in the second seed's form that counts the words of some lines.

It reports progress once per line and pauses ``pause_sec`` between lines, so a test can watch the
progress move and cancel it half way; ``await`` points are where a cancelled module stops.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from mloc.errors import ExecutionError
from mloc.modules import BaseModule, ProgressCallback


class WordCountModule(BaseModule):
    async def execute(self, progress_callback: ProgressCallback | None = None) -> dict[str, Any]:
        lines = [str(line) for line in self.config.get("lines", [])]
        if not lines:
            raise ExecutionError("hyperparameters.lines is empty; give at least one line of text to count")
        pause = float(self.config.get("pause_sec", 0.0))
        counts: Counter[str] = Counter()
        try:
            for index, line in enumerate(lines, start=1):
                words = line.lower().split()
                counts.update(words)
                self.log(f"line {index}/{len(lines)}: {len(words)} words")
                if progress_callback is not None:
                    await progress_callback(index, len(lines), f"counted line {index}")
                if index < len(lines):
                    await asyncio.sleep(pause)
        except asyncio.CancelledError:
            self.log(f"cancelled after {sum(counts.values())} words")
            raise
        result = {"ok": True, "task_id": self.task_id, "words": sum(counts.values()), "counts": dict(counts)}
        self.save_json("responses.json", result)
        return result
