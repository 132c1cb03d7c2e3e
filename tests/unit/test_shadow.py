"""The shadow time of a held worker, a placed task's expected end, and what a hold admits."""

from __future__ import annotations

import time

from mloc.orchestrator.shadow import Capacity, Hold, Holding, Need, Shadow, expected_end, shadow_time

NOW = time.time()
GIB = 1 << 30


def held(task_id: str, gpus: set[int], ends_in: float | None, *, cpu: int = 1000, mem: int = GIB) -> Holding:
    return Holding(task_id, cpu, mem, frozenset(gpus), None if ends_in is None else NOW + ends_in, "test")


def four_gpus(free: set[int], *, cpu: int = 8000, mem: int = 64 * GIB, slots: int = 4) -> Capacity:
    return Capacity(cpu, mem, slots, frozenset(free))


WHOLE = Need(cpu=1000, mem=GIB, gpu_count=4, usable=frozenset({0, 1, 2, 3}))


def test_a_task_that_fits_now_has_its_shadow_time_now() -> None:
    shadow = shadow_time(WHOLE, four_gpus({0, 1, 2, 3}), [], NOW)
    assert shadow == Shadow(NOW, four_gpus({0, 1, 2, 3}), ())


def test_the_shadow_time_is_when_the_last_needed_task_ends() -> None:
    tasks = [held("a", {1}, 10), held("b", {2}, 20), held("c", {3}, 5)]
    shadow = shadow_time(Need(0, 0, 3, frozenset({0, 1, 2, 3})), four_gpus({0}), tasks, NOW)
    assert shadow is not None
    # GPU 0 is free; c frees GPU 3 at +5, a frees GPU 1 at +10: three GPUs then, b not needed.
    assert shadow.at == NOW + 10
    assert [h.task_id for h in shadow.waiting_for] == ["c", "a"]
    assert shadow.free.gpus == frozenset({0, 1, 3})
    whole = shadow_time(WHOLE, four_gpus({0}), tasks, NOW)
    assert whole is not None and whole.at == NOW + 20


def test_only_gpus_of_the_model_asked_for_count() -> None:
    # GPUs 2 and 3 are another model: their tasks ending early does not help.
    need = Need(0, 0, 2, frozenset({0, 1}))
    tasks = [held("other", {2, 3}, 1), held("a", {0}, 30), held("b", {1}, 60)]
    shadow = shadow_time(need, four_gpus(set()), tasks, NOW)
    assert shadow is not None and shadow.at == NOW + 60


def test_cpu_memory_and_slots_count_like_gpus() -> None:
    need = Need(cpu=4000, mem=8 * GIB, gpu_count=0, usable=frozenset())
    tasks = [held("cpu", set(), 5, cpu=3000, mem=0), held("mem", set(), 9, cpu=0, mem=8 * GIB)]
    shadow = shadow_time(need, four_gpus(set(), cpu=1000, mem=0), tasks, NOW)
    assert shadow is not None and shadow.at == NOW + 9
    full = [held(f"t{i}", set(), 3 + i, cpu=0, mem=0) for i in range(4)]
    slot = shadow_time(Need(0, 0, 0, frozenset()), four_gpus(set(), slots=0), full, NOW)
    assert slot is not None and slot.at == NOW + 3 and len(slot.waiting_for) == 1


def test_an_overdue_task_may_end_any_moment_and_an_unknown_end_makes_the_shadow_unknown() -> None:
    late = shadow_time(WHOLE, four_gpus({0, 1, 2}), [held("late", {3}, -30)], NOW)
    assert late is not None and late.at == NOW
    unknown = shadow_time(WHOLE, four_gpus({0, 1}), [held("a", {2}, 5), held("forever", {3}, None)], NOW)
    assert unknown is not None and unknown.at is None
    assert [h.task_id for h in unknown.waiting_for] == ["a", "forever"]
    # A task with no known end that the need does not wait for leaves the shadow time known.
    known = shadow_time(Need(0, 0, 3, WHOLE.usable), four_gpus({0, 1}), [held("a", {2}, 5), held("x", {3}, None)], NOW)
    assert known is not None and known.at == NOW + 5


def test_no_shadow_when_the_worker_could_never_fit_the_task() -> None:
    assert shadow_time(Need(0, 0, 5, frozenset(range(5))), four_gpus({0, 1}), [held("a", {2, 3}, 5)], NOW) is None


def test_expected_end_prefers_progress_then_history_then_timeout_and_never_passes_the_timeout() -> None:
    base = {"now": NOW, "assigned_at": NOW - 12, "started_at": NOW - 10}
    by_eta = expected_end(**base, progress_eta=(30.0, NOW - 2), median_sec=100.0, timeout_sec=None)
    assert by_eta == (NOW + 28, "progress ETA")
    by_history = expected_end(**base, progress_eta=None, median_sec=40.0, timeout_sec=600.0)
    assert by_history == (NOW + 28, "median run of its kind")  # from placement, as the history measures
    by_timeout = expected_end(**base, progress_eta=None, median_sec=None, timeout_sec=60.0)
    assert by_timeout == (NOW + 50, "timeout")  # from its start
    capped = expected_end(**base, progress_eta=(500.0, NOW), median_sec=None, timeout_sec=60.0)
    assert capped == (NOW + 50, "timeout")
    overdue = expected_end(**base, progress_eta=None, median_sec=5.0, timeout_sec=None)
    assert overdue[0] == NOW
    assert expected_end(**base, progress_eta=None, median_sec=None, timeout_sec=None)[0] is None
    queued = expected_end(
        now=NOW, assigned_at=NOW - 1, started_at=None, progress_eta=None, median_sec=3.0, timeout_sec=None
    )
    assert queued[0] == NOW + 2


def hold_on(free: set[int], tasks: list[Holding]) -> Hold:
    shadow = shadow_time(WHOLE, four_gpus(free), tasks, NOW)
    assert shadow is not None
    return Hold.of("big", "w1", WHOLE, four_gpus(free), shadow, NOW)


def test_a_hold_admits_work_that_ends_before_the_shadow_time_or_leaves_the_need_free() -> None:
    hold = hold_on({0}, [held("a", {1, 2, 3}, 60)])
    assert hold.admits(0, 0, [0], 30.0, NOW)  # ends 30 s before the shadow time
    assert not hold.admits(0, 0, [0], 90.0, NOW)  # still running then
    assert not hold.admits(0, 0, [0], None, NOW)  # nobody knows
    # A worker with a GPU to spare at the shadow time: long work may take that one.
    roomy = Need(0, 0, 3, WHOLE.usable)
    shadow = shadow_time(roomy, four_gpus({0}), [held("a", {1, 2, 3}, 60)], NOW)
    assert shadow is not None
    spare = Hold.of("big", "w1", roomy, four_gpus({0}), shadow, NOW)
    assert spare.admits(0, 0, [0], None, NOW)
    spare.take(0, 0, [0], None, NOW)
    assert not spare.admits(0, 0, [1], None, NOW)  # the spare GPU is spoken for now
    short = hold_on({0}, [held("a", {1, 2, 3}, 60)])
    before = short.free
    short.take(0, 0, [0], 30.0, NOW)  # ends first: what is free at the shadow time is unchanged
    assert short.free == before and before.gpus == frozenset({0, 1, 2, 3})
    unknown = hold_on({0}, [held("a", {1, 2, 3}, None)])
    assert not unknown.admits(0, 0, [0], 1.0, NOW)  # no shadow time: nothing is known to end first


def test_the_held_tasks_reason_says_where_from_when_and_what_it_waits_for() -> None:
    noon = NOW - NOW % 86_400 + 12 * 3600  # today, 12:00:00 UTC
    tasks = [
        Holding("t-abc", 0, 0, frozenset({2}), noon + 90, "test"),
        Holding("t-def", 0, 0, frozenset({3}), noon + 125, "test"),
    ]
    shadow = shadow_time(WHOLE, four_gpus({0, 1}), tasks, noon)
    assert shadow is not None
    hold = Hold.of("big", "w1", WHOLE, four_gpus({0, 1}), shadow, noon)
    assert hold.reason(noon) == "reserved on w1 from ~12:02:05 UTC (in 2m): waiting for 2 GPUs held by t-abc, t-def"
    assert hold.reason(noon + 100).startswith("reserved on w1 from ~12:02:05 UTC (in 25s)")
    assert hold.reason(noon + 125).startswith("reserved on w1 from now")
    # Seen from another day, the date is shown.
    day = time.strftime("%Y-%m-%d", time.gmtime(noon))
    assert hold.reason(noon - 86_400).startswith(f"reserved on w1 from ~{day} 12:02:05 UTC (in 24h 2m)")
    unknown = hold_on({0, 1, 2}, [held("t-x", {3}, None)])
    assert unknown.reason(NOW) == (
        "reserved on w1 (start time unknown: t-x has no progress ETA, run history or timeout): "
        "waiting for 1 GPU held by t-x"
    )
    blocked = hold.blocked(300.0, noon)
    assert blocked.startswith("waiting for capacity: w1 is reserved for older task big from ~12:02:05 UTC (in 2m)")
    assert "this task (usually 5m) would not end by then" in blocked
    assert "no run history of its kind and no timeout" in hold.blocked(None, noon)


def test_a_hold_survives_its_round_trip_through_json() -> None:
    hold = hold_on({0}, [held("a", {1, 2, 3}, 60)])
    assert Hold.from_json(hold.to_json()) == hold
