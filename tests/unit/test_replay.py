"""The queue replayed on the workers' resources: when and where a waiting task starts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mloc.orchestrator.replay import HeldTask, Lane, Shares, Start, Waiter, replay
from mloc.orchestrator.shadow import Capacity, Hold, Holding, Need

NOW = 1_000_000.0
GPUS = frozenset({0, 1, 2, 3})


def held(gpus: set[int], ends_in: float, *, task_id: str = "t") -> Holding:
    return Holding(task_id, 0, 0, frozenset(gpus), NOW + ends_in, "test")


def lane(
    worker_id: str,
    free_gpus: set[int],
    *holdings: Holding,
    slots: int = 8,
    opens_in: float = 0.0,
    gpu_worker: bool = True,
) -> Lane:
    free = Capacity(8000, 1 << 36, slots, frozenset(free_gpus))
    return Lane(worker_id, free, holdings, NOW + opens_in, gpu_worker)


def gpu_task(count: int, run_sec: float, *workers: str) -> Waiter:
    need = Need(0, 0, count, GPUS)
    return Waiter(f"{count} GPUs, {run_sec}s", {worker: need for worker in workers or ("w1",)}, run_sec)


def slot_task(run_sec: float, worker: str = "w1") -> Waiter:
    return Waiter(f"slot, {run_sec}s", {worker: Need(0, 0, 0, frozenset())}, run_sec)


def test_slots_free_as_their_tasks_end_and_the_tasks_ahead_take_them_in_turn() -> None:
    busy = lane("w1", set(), held(set(), 1.0), held(set(), 1.0), slots=0)
    ahead = [slot_task(1.0)] * 3
    # Two slots free at +1: two tasks ahead take them; the third and this one start at +2.
    assert replay([busy], ahead[:1], slot_task(1.0), NOW) == Start(NOW + 1.0, "w1", (0, 1, 0, 0))
    assert replay([busy], ahead, slot_task(1.0), NOW) == Start(NOW + 2.0, "w1", (0, 1, 0, 0))


def test_a_gpu_task_waits_for_the_gpus_of_the_tasks_ahead_though_slots_are_free() -> None:
    # All four GPUs busy for 10 s; a whole-worker task ahead then holds them 20 s more. Slots alone
    # would say this one starts at +10 (a free slot remains all along).
    busy = lane("w1", set(), held({0, 1, 2, 3}, 10.0))
    start = replay([busy], [gpu_task(4, 20.0)], gpu_task(4, 5.0), NOW)
    assert start == Start(NOW + 30.0, "w1", (4, 0, 0, 0))


def test_a_blocked_task_ahead_does_not_hold_back_one_that_fits_now() -> None:
    # Two GPUs free: the four-GPU task ahead waits for the others, and a one-GPU task starts now, as
    # a scheduling pass would place it.
    half = lane("w1", {0, 1}, held({2, 3}, 10.0))
    assert replay([half], [gpu_task(4, 20.0)], gpu_task(1, 5.0), NOW) == Start(NOW, "w1", (0, 0, 0, 0))
    # Two one-GPU tasks ahead take the free GPUs; at +10 two free again, still too few for the big
    # one, and this one takes one of them.
    after = [gpu_task(1, 15.0), gpu_task(1, 15.0), gpu_task(4, 20.0)]
    assert replay([half], after, gpu_task(1, 5.0), NOW) == Start(NOW + 10.0, "w1", (0, 0, 0, 0))
    # A big task ahead that fits starts first and holds every GPU for its run.
    idle = lane("w1", {0, 1, 2, 3})
    assert replay([idle], [gpu_task(4, 20.0)], gpu_task(1, 5.0), NOW) == Start(NOW + 20.0, "w1", (0, 0, 0, 0))


def test_smaller_tasks_behind_take_what_frees_while_a_big_one_does_not_fit() -> None:
    # Its GPUs free one by one at +1..+4; alone, the whole-worker task starts at +4. With eight
    # one-GPU tasks of 10 s behind it, each freed GPU goes to one of them (a pass places what fits),
    # two rounds of four, so it starts only when the last of them ends, at +24.
    staggered = lane("w1", set(), *(held({gpu}, gpu + 1.0) for gpu in range(4)))
    assert replay([staggered], [], gpu_task(4, 5.0), NOW) == Start(NOW + 4.0, "w1", (4, 0, 0, 0))
    behind = [gpu_task(1, 10.0)] * 8
    assert replay([staggered], [], gpu_task(4, 5.0), NOW, behind) == Start(NOW + 24.0, "w1", (4, 0, 0, 0))


def test_the_task_starts_on_the_worker_that_frees_enough_first() -> None:
    lanes = [lane("w1", set(), held({0, 1, 2, 3}, 40.0)), lane("w2", {0}, held({1, 2, 3}, 25.0))]
    start = replay(lanes, [], gpu_task(3, 5.0, "w1", "w2"), NOW)
    assert start == Start(NOW + 25.0, "w2", (2, 0, 0, 0))


def test_tasks_ahead_that_run_elsewhere_leave_this_workers_gpus_alone() -> None:
    lanes = [lane("w1", {0, 1, 2, 3}), lane("w2", {0, 1, 2, 3})]
    elsewhere = gpu_task(4, 100.0, "w2")
    assert replay(lanes, [elsewhere] * 3, gpu_task(4, 5.0, "w1", "w2"), NOW) == Start(NOW, "w1", (0, 0, 0, 0))


def test_gpu_tasks_are_packed_and_other_tasks_spread_as_a_pass_places_them() -> None:
    # Three GPUs free on w1, one on w2: a one-GPU task goes where it wastes fewest (w2), so the
    # three-GPU task after it still starts now on w1; first fit would have put the small one on w1.
    lanes = [lane("w1", {0, 1, 2}), lane("w2", {3})]
    small = gpu_task(1, 30.0, "w1", "w2")
    assert replay(lanes, [small], gpu_task(3, 5.0, "w1", "w2"), NOW) == Start(NOW, "w1", (0, 0, 0, 0))
    # A task without GPUs keeps off the GPU worker while another has room, and goes where most
    # slots are free: after one such task each, w3 (8 slots) still has more than w4 (2).
    cpu_lanes = [
        lane("gpu", set()),
        lane("w3", set(), slots=8, gpu_worker=False),
        lane("w4", set(), slots=2, gpu_worker=False),
    ]
    needs = {worker: Need(0, 0, 0, frozenset()) for worker in ("gpu", "w3", "w4")}
    start = replay(cpu_lanes, [Waiter("cpu", needs, 9.0)], Waiter("cpu", needs, 9.0), NOW)
    assert start == Start(NOW, "w3", (0, 0, 0, 0))


def test_a_held_worker_starts_nothing_before_it_opens() -> None:
    held_back = lane("w1", {0, 1, 2, 3}, opens_in=50.0)
    assert replay([held_back], [], gpu_task(1, 5.0), NOW) == Start(NOW + 50.0, "w1", (0, 0, 0, 0))


def test_a_task_the_workers_never_free_enough_for_has_no_start() -> None:
    assert replay([lane("w1", {0, 1}, held({2}, 5.0))], [], gpu_task(4, 1.0), NOW) is None


def test_a_holding_without_an_end_is_refused() -> None:
    unknown = Holding("t-unknown", 0, 0, frozenset({0}), None, "test")
    with pytest.raises(ValueError, match="t-unknown on w1 has no end"):
        replay([lane("w1", set(), unknown)], [], gpu_task(1, 1.0), NOW)


def test_a_long_queue_of_a_few_kinds_replays_in_order() -> None:
    # 2,000 one-GPU tasks of 10 s ahead on four GPUs: 500 rounds, so this one starts at +5,000 s.
    idle = lane("w1", {0, 1, 2, 3}, slots=64)
    start = replay([idle], [gpu_task(1, 10.0)] * 2000, gpu_task(1, 10.0), NOW)
    assert start == Start(NOW + 5000.0, "w1", (0, 0, 0, 0))


def waited(waiter: Waiter, seconds: float) -> Waiter:
    return replace(waiter, since=NOW - seconds)


def test_a_backfill_hold_to_come_keeps_the_worker_for_a_big_task_in_a_stream_of_small_ones() -> None:
    # As in the stream above, but holds are made after 3 s of waiting: the whole-worker task (waiting
    # 1 s) takes one at +2. GPU 0 went to a small task at +1 (ends +11); from +2 the freed GPUs are
    # kept for it (a small task of 10 s would end after the shadow time, +11), and it starts at +11.
    staggered = lane("w1", set(), *(held({gpu}, gpu + 1.0) for gpu in range(4)))
    big, behind = waited(gpu_task(4, 5.0), 1.0), [waited(gpu_task(1, 10.0), 0.0)] * 8
    assert replay([staggered], [], big, NOW, behind, backfill_after=3.0) == Start(
        NOW + 11.0, "w1", (4, 0, 0, 0), held=True
    )
    # A small task behind it (the second: the first took GPU 0 at +1, before any hold) is kept off
    # until the big one has started and ended (+16) ...
    first, small = waited(gpu_task(1, 10.0), 0.0), waited(gpu_task(1, 10.0), 0.0)
    start = replay([staggered], [big, first], small, NOW, behind, backfill_after=3.0)
    assert start == Start(NOW + 16.0, "w1", (1, 0, 0, 0))
    # ... unless it ends before the shadow time: then the hold admits it (+2, on a freed GPU).
    quick = replace(waited(gpu_task(1, 3.0), 0.0), kind="quick")
    start = replay([staggered], [big, first], quick, NOW, behind, backfill_after=3.0)
    assert start == Start(NOW + 2.0, "w1", (1, 0, 0, 0))
    # Without holds the small one takes a freed GPU at once (+2).
    assert replay([staggered], [big, first], small, NOW, behind) == Start(NOW + 2.0, "w1", (1, 0, 0, 0))


def test_a_hold_goes_to_the_first_task_in_queue_order_that_has_waited_long_enough() -> None:
    # Two whole-worker tasks of 5 s; the first has waited too little ever to be held before the
    # second (waiting 10 s) is: the second gets the hold at once, and starts first, at +4.
    staggered = lane("w1", set(), *(held({gpu}, gpu + 1.0) for gpu in range(4)))
    young, old = waited(gpu_task(4, 5.0), 0.0), waited(gpu_task(4, 6.0), 10.0)
    young = replace(young, kind="young")
    behind = [waited(gpu_task(1, 10.0), 0.0)] * 8
    start = replay([staggered], [young], old, NOW, behind, backfill_after=5.0)
    assert start == Start(NOW + 4.0, "w1", (4, 0, 0, 0), held=True)


def owned(waiter: Waiter, owner: str) -> Waiter:
    return replace(waiter, owner=owner)


def test_fair_share_lets_another_users_task_in_before_a_backlog() -> None:
    # One slot, busy until +1; alice has five 1 s tasks ahead and a big recent cost, bob none: a pass
    # takes bob's task first at +1. In queue order alone it would start after alice's five, at +6.
    busy = lane("w1", set(), replace(held(set(), 1.0), owner="alice"), slots=0)
    ahead = [owned(slot_task(1.0), "alice")] * 5
    bob = owned(slot_task(1.0), "bob")
    shares = Shares(cost={"alice": 10.0}, held={"alice": 1})
    assert replay([busy], ahead, bob, NOW) == Start(NOW + 6.0, "w1", (0, 1, 0, 0))
    assert replay([busy], ahead, bob, NOW, shares=shares) == Start(NOW + 1.0, "w1", (0, 1, 0, 0))
    # Priority still goes first: a higher-priority task of alice's ahead goes before bob's.
    urgent = replace(owned(slot_task(1.0), "alice"), priority=5, kind="urgent")
    assert replay([busy], [urgent, *ahead], bob, NOW, shares=shares) == Start(NOW + 2.0, "w1", (0, 1, 0, 0))


def test_users_of_equal_standing_take_turns_and_a_weight_gives_more_turns() -> None:
    # Four slots; alice's twelve 1 s tasks are ahead of bob's four, neither has a cost yet. In queue
    # order bob's fourth starts in the fourth round (+3); taking turns, two of each per round, in the
    # second (+1); with alice at weight 3, three of hers to one of his, in the fourth again.
    idle = lane("w1", set(), slots=4)
    alice, bob = owned(slot_task(1.0), "alice"), owned(slot_task(1.0), "bob")
    queue = [alice] * 12 + [bob] * 3
    assert replay([idle], queue, bob, NOW) == Start(NOW + 3.0, "w1", (0, 0, 0, 0))
    assert replay([idle], queue, bob, NOW, shares=Shares()) == Start(NOW + 1.0, "w1", (0, 0, 0, 0))
    heavy = Shares(weight={"alice": 3.0})
    assert replay([idle], queue, bob, NOW, shares=heavy) == Start(NOW + 3.0, "w1", (0, 0, 0, 0))


def test_a_task_ending_adds_what_it_ran_to_its_owners_cost() -> None:
    # One slot, busy until +1 with alice's task, which has run 100 s by then (a cost of 10 at the CPU
    # weight); alice's and bob's tasks wait, hers first. Counted, that cost puts bob first (+1);
    # counted as nothing (no known start), they tie and queue order puts alice first (bob at +6).
    ended = replace(held(set(), 1.0), owner="alice", since=NOW + 1.0 - 100.0)
    alice, bob = owned(slot_task(5.0), "alice"), owned(slot_task(5.0), "bob")
    shares = Shares(held={"alice": 1})
    start = replay([lane("w1", set(), ended, slots=0)], [alice], bob, NOW, shares=shares)
    assert start == Start(NOW + 1.0, "w1", (0, 1, 0, 0))
    unknown = replace(ended, since=None)
    start = replay([lane("w1", set(), unknown, slots=0)], [alice], bob, NOW, shares=shares)
    assert start == Start(NOW + 6.0, "w1", (0, 1, 0, 0))


def test_standings_go_on_decaying_as_the_replay_runs() -> None:
    # One free slot; bob's twelve 10 s tasks (a cost of 1 each) are ahead of alice's, whose standing
    # is 10 now. Without decay bob runs until his cost passes hers: ten tasks, and alice starts at
    # +110 (they tie at 10 and queue order puts bob's first). With a half-life of 20 s her 10 is 2.5
    # by +40, when bob's four ends have decayed to 2.56: she starts then.
    idle = lane("w1", set(), slots=1)
    bob, alice = owned(slot_task(10.0), "bob"), owned(slot_task(10.0), "alice")
    shares = Shares(cost={"alice": 10.0}, count={"alice": 10.0})
    assert replay([idle], [bob] * 12, alice, NOW, shares=shares) == Start(NOW + 110.0, "w1", (0, 0, 0, 0))
    decaying = replace(shares, half_life_sec=20.0)
    assert replay([idle], [bob] * 12, alice, NOW, shares=decaying) == Start(NOW + 40.0, "w1", (0, 0, 0, 0))
    assert decaying.cost == {"alice": 10.0}  # the caller's standings are left as they were


def test_the_hold_that_stands_keeps_every_task_off_until_its_own_starts() -> None:
    # The whole-worker task ahead holds w1 from +4 (its GPUs free one by one until then): the one-GPU
    # tasks of 10 s, ahead and this one, wait for it to start and run (+9); without the hold they take
    # GPUs as they free (+1, +2). A task of 3 s ends before +4 and is admitted at once.
    staggered = lane("w1", set(), *(held({gpu}, gpu + 1.0) for gpu in range(4)))
    big, small = gpu_task(4, 5.0), gpu_task(1, 10.0)
    need = big.needs["w1"]
    hold = Hold("t-big", "w1", NOW + 4.0, need, Capacity(8000, 1 << 36, 8, GPUS), short="4 GPUs")
    standing = HeldTask(0, hold)
    assert replay([staggered], [big, small], small, NOW, standing=standing) == Start(NOW + 9.0, "w1", (1, 0, 0, 0))
    assert replay([staggered], [big, small], small, NOW) == Start(NOW + 2.0, "w1", (1, 0, 0, 0))
    quick = replace(gpu_task(1, 3.0), kind="quick")
    assert replay([staggered], [big, small], quick, NOW, standing=standing) == Start(NOW + 1.0, "w1", (1, 0, 0, 0))
    # The caller's hold is left as it was (the replay counts on its own copy).
    assert hold.free == Capacity(8000, 1 << 36, 8, GPUS)
