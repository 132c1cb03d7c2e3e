"""mloc.stopping: loops making Redis calls through MLOC's own client, cancelled at every point of a call,
all end; a finished or failed task is waited for without an error."""

from __future__ import annotations

import asyncio
import gc
import random

from mloc import connection, stopping
from mloc.settings import Settings

LOOPS = 100


def test_loops_cancelled_in_the_middle_of_redis_calls_all_end(redis_url: str) -> None:
    async def run() -> list[int]:
        r = connection.client(redis_url, Settings())
        calls: list[int] = []

        async def loop(n: int) -> None:
            # As the worker's and the orchestrator's loops do: a call, then the next, until cancelled.
            while True:
                await r.set(f"stopping:{n}", "x")
                calls[n] += 1

        rng = random.Random(7)
        for n in range(LOOPS):
            calls.append(0)
            task = asyncio.create_task(loop(n))
            await asyncio.sleep(rng.random() * 0.004)  # lands anywhere in a call: send, read, between
            try:
                async with asyncio.timeout(5):
                    await stopping.cancel(task, again_sec=0.05)
            except TimeoutError:
                lost.append(n)
                while not task.done():  # so the test ends and says so, rather than hang
                    task.cancel()
                    await asyncio.wait([task], timeout=0.05)
            assert task.cancelled()
        await r.aclose()
        return calls

    lost: list[int] = []
    calls = asyncio.run(run())
    assert lost == [], f"{len(lost)} of {LOOPS} loops went on after their cancel"
    # The cancels landed while calls were being made, not before the first.
    assert sum(1 for c in calls if c > 0) > LOOPS // 2


def test_a_task_already_ended_or_that_raised_is_waited_for_quietly() -> None:
    unretrieved: list[str] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unretrieved.append(context["message"]))

        async def fails() -> None:
            raise RuntimeError("gone")

        async def ends() -> None:
            return None

        tasks = [asyncio.create_task(fails()), asyncio.create_task(ends())]
        await asyncio.sleep(0)
        await stopping.cancel(*tasks)
        assert all(task.done() for task in tasks)
        del tasks
        gc.collect()  # an exception never retrieved is reported as its task is collected
        slow = asyncio.create_task(asyncio.sleep(60))
        await stopping.cancel(slow)
        assert slow.cancelled()
        await stopping.cancel()

    asyncio.run(run())
    assert unretrieved == []


def test_a_loops_clean_up_shorter_than_again_sec_is_not_cut_short() -> None:
    async def run() -> bool:
        cleaned = False

        async def tidy() -> None:
            nonlocal cleaned
            try:
                await asyncio.sleep(60)
            finally:
                await asyncio.sleep(0.2)
                cleaned = True

        task = asyncio.create_task(tidy())
        await asyncio.sleep(0)
        await stopping.cancel(task, again_sec=0.5)
        return cleaned

    assert asyncio.run(run()) is True
