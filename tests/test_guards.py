"""The guards as pure decisions (crv.engine.guards): state in, verdict out, at and around each
boundary; the usage ledger's arithmetic (crv.service.usage); and the store's side of both (the
ledger written as nodes come and go, the guard settings and state), on SQLite and PostgreSQL.

The end-to-end runs through the CLI and the real flow are in tests/test_guards_e2e.py."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from crv.appliance.spec import Scaling
from crv.engine.autoscale import Decision, Memory, QueueReading, Reading
from crv.engine.guards import (
    Facts,
    Notice,
    Settings,
    budget_room,
    held,
    horizon,
    judge,
    notices_of,
    span,
    within_budget,
    work_seen,
    working,
)
from crv.service.store import Store
from crv.service.usage import DAY, day_start, node_hours, overlap

T0 = 1_700_000_000.0 - 1_700_000_000.0 % DAY + 10 * 3600  # 10:00 UTC on some day
WARN = 300.0


def run(settings: Settings, now: float, notices: dict[str, Notice] | None = None,
        **facts: Any) -> Any:  # fmt: skip
    """One run's verdicts, by guard, with the notices they leave."""
    facts.setdefault("above_min", {"worker": 2})
    facts.setdefault("nodes", 3)
    j = judge(settings, Facts(now, notices=notices or {}, **facts))
    return {v.guard: v for v in j.verdicts}, j


def lease(seconds: float = 3600, mode: str = "destroy", warn: float = WARN) -> Settings:
    return Settings(lease=seconds, lease_from=T0, on_lease=mode, warn_before=warn)


# -- lease --------------------------------------------------------------------------------------


def test_lease_announces_warn_before_its_end_then_acts_at_its_end() -> None:
    s = lease(3600)
    due = T0 + 3600
    v, _ = run(s, due - WARN - 1)  # a second before the window: nothing
    assert not (v["lease"].announce or v["lease"].act or v["lease"].notice)
    v, j = run(s, due - WARN)  # the window opens: announced, for the lease's end
    a = v["lease"]
    assert a.announce and not a.act and a.action == "destroy"
    assert a.notice is not None and a.notice.acts_at == due and a.notice.due == due
    assert a.reason == "lease of 1 h ends in 5 min: the cluster will be destroyed at 11:00:00 UTC"
    assert j.acting() is None
    notices = j.notices()
    v, j = run(s, due - 1, notices)  # announced, not yet: waits, announces nothing again
    assert not v["lease"].announce and not v["lease"].act and v["lease"].notice == a.notice
    assert "in 1 s" in v["lease"].reason
    v, j = run(s, due, notices)  # its time: acts
    assert v["lease"].act and not v["lease"].announce and v["lease"].notice is None
    assert j.acting() == v["lease"]
    assert "destroyed now (announced at 10:55:00 UTC)" in v["lease"].reason


def test_a_lease_first_seen_after_its_end_is_announced_then_acted_on_warn_before_later() -> None:
    s = lease(3600)
    late = T0 + 3600 + 7200  # the schedule was off for two hours after the lease ended
    v, j = run(s, late)
    assert v["lease"].announce and not v["lease"].act
    assert v["lease"].notice is not None and v["lease"].notice.acts_at == late + WARN
    assert v["lease"].reason.startswith("lease of 1 h ended 2 h ago: ")
    assert j.hold == "the lease of 1 h ended at 11:00:00 UTC"  # and no growth meanwhile
    v, _ = run(s, late + WARN - 0.5, j.notices())
    assert not v["lease"].act
    v, _ = run(s, late + WARN, j.notices())
    assert v["lease"].act


def test_an_act_never_comes_before_its_announcement_plus_warn_before() -> None:
    """Runs at random times (a schedule with gaps): whatever they see, the first act is at
    least warn_before after the announcement that came first, and not before the guard's time."""
    rng = random.Random(23)
    for _ in range(300):
        warn = rng.choice([0.0, 5.0, 60.0, 300.0])
        s = lease(rng.uniform(1, 4000), rng.choice(["destroy", "shrink"]), warn)
        assert s.lease is not None
        due = T0 + s.lease
        now, notices, announced = T0, {}, None
        while True:
            now += rng.expovariate(1 / 90)
            v, j = run(s, now, notices)
            if v["lease"].announce:
                announced = now
            if v["lease"].act:
                assert announced is not None, "acted without an announcement"
                assert now >= announced + warn and now >= due
                break
            notices = j.notices()


def test_a_lease_set_again_withdraws_the_announcement_and_starts_again() -> None:
    s = lease(600)
    _, j = run(s, T0 + 400)
    assert "lease" in j.notices()
    renewed = replace(s, lease_from=T0 + 500)  # `crv autoscale enable --lease 10m` again
    v, j = run(renewed, T0 + 501, j.notices())
    assert v["lease"].withdraw and not v["lease"].announce and j.notices() == {}
    assert j.hold is None


def test_an_announcement_belongs_to_its_occurrence_not_to_the_guard() -> None:
    """A lease set again whose new end is within warn_before too: the old announcement's time
    does not let the new occurrence act; it is announced anew, for its own end."""
    s = lease(600)
    _, j = run(s, T0 + 300)
    old = j.notices()["lease"]
    assert old.acts_at == T0 + 600
    renewed = replace(s, lease_from=T0 + 450)  # ends at T0 + 1050
    v, j = run(renewed, T0 + 800, j.notices())
    assert not v["lease"].act and v["lease"].announce and v["lease"].withdraw
    assert j.notices()["lease"].acts_at == T0 + 800 + WARN  # warned in full: after its end
    v, _ = run(renewed, T0 + 800 + WARN - 1, j.notices())
    assert not v["lease"].act
    # the same with another action: a lease switched to shrink is another announcement
    v, _ = run(replace(s, on_lease="shrink"), T0 + 650, {"lease": old})
    assert v["lease"].announce and not v["lease"].act


def test_a_lease_on_shrink_shrinks_what_is_above_min_and_holds_growth_from_its_end() -> None:
    s = lease(600, "shrink")
    v, j = run(s, T0 + 600 - WARN)
    assert v["lease"].announce and v["lease"].action == "shrink"
    assert "every scaled group will be shrunk to its minimum" in v["lease"].reason
    assert j.hold is None  # not ended yet: growth goes on
    v, j = run(s, T0 + 600, j.notices())
    assert v["lease"].act and j.hold == "the lease of 10 min ended at 10:10:00 UTC"
    # at its minimum (the shrink done, its notice spent): nothing to do, growth still held
    v, j = run(s, T0 + 700, {}, above_min={"worker": 0})
    assert not (v["lease"].announce or v["lease"].act or v["lease"].withdraw)
    assert j.hold is not None
    # grown again by hand: announced again, shrunk warn_before later
    v, j = run(s, T0 + 900, {}, above_min={"worker": 1})
    assert v["lease"].announce and v["lease"].notice is not None
    assert v["lease"].notice.acts_at == T0 + 900 + WARN


def test_warn_before_zero_announces_and_acts_in_the_same_run() -> None:
    v, j = run(lease(60, warn=0), T0 + 60)
    assert v["lease"].announce and v["lease"].act and j.acting() == v["lease"]
    v, _ = run(lease(60, warn=0), T0 + 59.9)
    assert not v["lease"].announce and not v["lease"].act


def test_a_destroy_wins_over_a_shrink_in_the_same_run() -> None:
    s = replace(lease(60, warn=0), idle_after=30.0, idle_from=T0)
    _, j = run(s, T0 + 61)
    assert [v.guard for v in j.verdicts if v.act] == ["lease", "idle"]
    acting = j.acting()
    assert acting is not None and acting.action == "destroy"


# -- idle_after ---------------------------------------------------------------------------------


def idle(seconds: float = 1800, warn: float = WARN) -> Settings:
    return Settings(idle_after=seconds, idle_from=T0, warn_before=warn)


def test_idle_counts_from_the_last_work_and_acts_only_after_its_announcement() -> None:
    s = idle(1800)
    seen = T0 + 600  # work last seen 10 minutes after the setting
    v, _ = run(s, seen + 1800 - WARN - 1, work_seen=seen)
    assert not v["idle"].announce
    v, j = run(s, seen + 1800 - WARN, work_seen=seen)
    assert v["idle"].announce and v["idle"].action == "shrink"
    assert v["idle"].reason.startswith("no work for 25 min (idle after 30 min): every scaled")
    notice = j.notices()["idle"]
    assert notice.acts_at == seen + 1800
    v, _ = run(s, seen + 1800 - 1, j.notices(), work_seen=seen)
    assert not v["idle"].act
    v, j = run(s, seen + 1800, j.notices(), work_seen=seen)
    assert v["idle"].act and j.acting() == v["idle"]


def test_idle_counts_from_its_setting_when_work_was_seen_before_it() -> None:
    s = idle(1800)
    v, _ = run(s, T0 + 1800 - WARN - 1, work_seen=T0 - 86400)  # work a day ago: from T0
    assert not v["idle"].announce
    v, _ = run(s, T0 + 1800 - WARN, work_seen=None)
    assert v["idle"].announce


def test_work_seen_again_withdraws_the_idle_announcement() -> None:
    s = idle(1800)
    _, j = run(s, T0 + 1600)
    assert "idle" in j.notices()
    now = T0 + 1700
    v, j = run(s, now, j.notices(), work_seen=now)  # this run saw work
    assert v["idle"].withdraw and not v["idle"].announce and not v["idle"].act
    assert j.notices() == {}


def test_idle_at_min_does_nothing() -> None:
    v, j = run(idle(60), T0 + 3600, above_min={"worker": 0, "ctl": 0})
    assert not (v["idle"].announce or v["idle"].act) and j.notices() == {}


def test_an_idle_after_shorter_than_warn_before_never_announces_while_work_goes_on() -> None:
    s = idle(60, warn=300)
    for k in range(5):
        now = T0 + 30 * k
        v, _ = run(s, now, work_seen=now)
        assert not v["idle"].announce


def test_work_is_a_queue_with_jobs_or_a_metric_above_zero_and_unknown_counts_as_work() -> None:
    assert working(QueueReading(0, pending=0, running=1)) is True
    assert working(QueueReading(2, pending=2, running=0)) is True
    assert working(QueueReading(0, pending=0, running=0, states={"n": "idle"})) is False
    assert working(QueueReading(None, problem="stale")) is None
    assert working(Reading(0.0)) is False
    assert working(Reading(0.5)) is True
    assert working(Reading(None, problem="missing")) is None
    assert work_seen({"a": Reading(0.0), "b": QueueReading(0)}, T0, T0 - 50) == (T0 - 50, "no work")
    assert work_seen({"a": Reading(0.0), "b": Reading(3.0)}, T0, None) == (T0, "work in b")
    seen, why = work_seen({"a": Reading(None, problem="x")}, T0, T0 - 50)
    assert seen == T0 and why == "no reading of a: counted as working"


# -- budget -------------------------------------------------------------------------------------


def budget(node_hours: float = 10.0, warn: float = WARN) -> Settings:
    return Settings(budget=node_hours, warn_before=warn)


def test_a_budget_that_runs_out_within_warn_before_is_announced_once_a_day() -> None:
    s = budget(10.0)
    # 4 nodes, 0.5 node-hours left: runs out in 7.5 min; warn 5 min: not yet
    v, _ = run(s, T0, used=9.5, nodes=4)
    assert not v["budget"].announce and "runs out in 7 min 30 s at 4 nodes" in v["budget"].reason
    v, j = run(s, T0, used=9.7, nodes=4)  # 4.5 min left: announced
    assert v["budget"].announce and v["budget"].action == "hold" and not v["budget"].act
    assert v["budget"].reason.endswith(": growth will be held")
    v, j2 = run(s, T0 + 600, j.notices(), used=10.4, nodes=4)  # spent: not announced again
    assert not v["budget"].announce and j2.notices() == j.notices()
    # the next UTC day: a new occurrence
    tomorrow = day_start(T0) + DAY + 60
    v, _ = run(s, tomorrow, j.notices(), used=9.9, nodes=4)
    assert v["budget"].announce and v["budget"].withdraw
    assert v["budget"].notice is not None and v["budget"].notice.due == day_start(tomorrow)


def test_a_budget_already_spent_is_announced_and_holds_growth_at_once() -> None:
    v, j = run(budget(2.0), T0, used=2.5, nodes=1)
    assert v["budget"].announce and v["budget"].reason.endswith(", spent: growth is held")
    assert j.acting() is None  # a budget never destroys or shrinks
    grow = Decision(T0, 5.0, 1, 3, 3, "grow", "5 / 1 per node = 5", Memory(T0, None, T0))
    before = Memory(T0 - 999, None, T0 - 999)
    d = within_budget(grow, 2.0, 2.5, 1, 600, before)
    assert (d.action, d.target, d.memory) == ("none", 1, before)  # no cooldown starts
    assert d.reason == (
        "5 / 1 per node = 5; held: budget of 2 node-hours a day: 2.50 used today (UTC), spent"
    )


def test_a_growth_that_would_spend_more_than_is_left_is_made_smaller_or_refused() -> None:
    grow = Decision(T0, 9.0, 2, 5, 5, "grow", "r", Memory(T0, None, T0))
    before = Memory()
    # 1 node-hour left; for 10 min 6 nodes fit: 2 now, room for 4 more: the growth of 3 stays
    assert budget_room(10.0, 9.0, 2, 600) == 4
    assert within_budget(grow, 10.0, 9.0, 2, 600, before) == grow
    # for 20 min 3 nodes fit: room for 1 more
    d = within_budget(grow, 10.0, 9.0, 2, 1200, before)
    assert (d.action, d.target) == ("grow", 3)
    assert d.reason == (
        "r; budget of 10 node-hours a day: 9.00 used today (UTC), 1.00 left; 5 nodes for 20 min "
        "would spend 1.67: room for 1 more only"
    )
    # for an hour 1 node fits and 2 run: refused
    d = within_budget(grow, 10.0, 9.0, 2, 3600, before)
    assert (d.action, d.target, d.memory) == ("none", 2, before)
    # no budget, or a shrink: untouched
    assert within_budget(grow, None, 99.0, 2, 3600, before) == grow
    shrink = replace(grow, action="shrink", target=1)
    assert within_budget(shrink, 1.0, 99.0, 2, 3600, before) == shrink


def test_a_growths_horizon_is_its_least_life_and_ends_at_utc_midnight() -> None:
    scaling = Scaling.model_validate(
        {"queue": {"role": "q"}, "cooldown": "2m", "scale_down_delay": "3m"}
    )
    assert horizon(scaling, 60.0, T0) == 180.0
    assert horizon(scaling, 600.0, T0) == 600.0
    before_midnight = day_start(T0) + DAY - 100
    assert horizon(scaling, 600.0, before_midnight) == 100.0  # tomorrow has its own budget


def test_budget_across_a_utc_midnight_counts_only_today() -> None:
    midnight = day_start(T0) + DAY
    rows = [
        {"started": midnight - 3 * 3600, "ended": None},  # since 21:00 yesterday, still up
        {"started": midnight - 3600, "ended": midnight - 1800},  # ended yesterday
        {"started": midnight + 600, "ended": midnight + 1200},  # 10 min today
    ]
    at = midnight + 1800
    assert day_start(at) == midnight
    used = node_hours(rows, day_start(at), at)
    assert used == pytest.approx(0.5 + 1 / 6)
    # 10 minutes before midnight the same rows counted yesterday's hours
    before = midnight - 600
    assert node_hours(rows, day_start(before), before) == pytest.approx(2 + 50 / 60 + 0.5)
    # a budget of 1 node-hour spent yesterday evening is not spent today
    v, _ = run(budget(1.0), at, used=used, nodes=1)
    assert not v["budget"].announce
    assert (
        within_budget(Decision(at, 2.0, 1, 2, 2, "grow", "r"), 1.0, used, 1, 60.0, Memory()).action
        == "grow"
    )


def test_ledger_overlap_arithmetic() -> None:
    since, until = 1000.0, 2000.0
    assert overlap(1200, 1500, since, until) == 300  # inside
    assert overlap(500, 1500, since, until) == 500  # started before
    assert overlap(1500, 2500, since, until) == 500  # ends after
    assert overlap(1500, None, since, until) == 500  # still running
    assert overlap(500, None, since, until) == 1000  # across the whole window
    assert overlap(100, 900, since, until) == 0  # before
    assert overlap(2100, None, since, until) == 0  # after (a clock ahead)
    assert overlap(1000, 1000, since, until) == 0
    rows = [{"started": 1200, "ended": 1500}, {"started": 500, "ended": None}]
    assert node_hours(rows, since, until) == pytest.approx(1300 / 3600)
    assert day_start(T0) == T0 - 10 * 3600 and day_start(day_start(T0)) == day_start(T0)


# -- held growth, settings, words ---------------------------------------------------------------


def test_a_held_growth_is_none_with_the_reason_and_no_cooldown() -> None:
    before = Memory(T0 - 500, 33.0, T0 - 500)
    grow = Decision(T0, 4.0, 1, 4, 3, "grow", "4 / 1 per node = 4", Memory(T0, None, T0))
    d = held(grow, "the lease of 10 min ended at 10:10:00 UTC", before)
    assert (d.action, d.target, d.memory) == ("none", 1, before)
    assert d.reason == "4 / 1 per node = 4; held: the lease of 10 min ended at 10:10:00 UTC"
    assert held(grow, None, before) == grow
    none = replace(grow, action="none", target=1)
    assert held(none, "x", before) == none


def test_settings_and_notices_from_the_stores_rows() -> None:
    assert not Settings.of({}).any and Settings.of({}).warn_before == WARN
    s = Settings.of({"lease": 60.0, "lease_from": T0, "on_lease": None, "budget": 0,
                     "warn_before": 0.0})  # fmt: skip
    assert s.any and s.lease == 60 and s.on_lease == "destroy" and s.budget is None
    assert s.warn_before == 0.0
    n = Notice("idle", "shrink", T0, T0 - 1, T0 + 5, "text")
    assert notices_of({"idle": n.row()}) == {"idle": n}
    assert [span(x) for x in (0, 45, 60, 270, 3600, 7500, 90000)] == [
        "0 s", "45 s", "1 min", "4 min 30 s", "1 h", "2 h 5 min", "1 d 1 h",
    ]  # fmt: skip


# -- the store: the ledger and the guards' settings ---------------------------------------------


def node(name: str, group: str = "w", pool: str = "local") -> dict[str, Any]:
    return {"name": name, "group": group, "roles": [], "pool": pool}


def test_the_ledger_opens_a_row_per_node_recorded_and_closes_it_when_deleted(
    store: Store,
) -> None:
    import time

    before = time.time()
    store.put_nodes("c", [node("c-w-0"), node("c-w-1", "db", "rack")])
    store.put_nodes("c", [node("c-w-0")])  # recorded again: the same row
    rows = store.usage("c", 0, time.time() + 1)
    assert [(r["node"], r["group"], r["pool"], r["ended"]) for r in rows] == [
        ("c-w-0", "w", "local", None), ("c-w-1", "db", "rack", None),
    ]  # fmt: skip
    assert all(before - 1 <= r["started"] <= time.time() for r in rows)
    store.delete_node("c", "c-w-1")  # a shrink's victim (a released rack machine too)
    rows = store.usage("c", 0, time.time() + 1)
    assert rows[0]["ended"] is None and rows[1]["ended"] is not None
    store.put_nodes("c", [node("c-w-1")])  # made again later: a new row
    assert len(store.usage("c", 0, time.time() + 1)) == 3
    # only rows overlapping the window
    ended = rows[1]["ended"]
    assert [r["node"] for r in store.usage("c", ended + 0.001, time.time() + 1)] == [
        "c-w-0", "c-w-1",
    ]  # fmt: skip
    store.delete_cluster("c")  # every row closed, and kept: the cost of what was
    rows = store.usage("c", 0, time.time() + 1)
    assert len(rows) == 3 and all(r["ended"] is not None for r in rows)


def test_a_paired_machine_gets_its_ledger_row_too(store: Store) -> None:
    """A machine crv did not make (`crv pair`) is recorded by the pairing: its usage counts."""
    import time
    from datetime import timedelta

    from crv.service.store import Issued, now

    pin = store.create_pairing("c", "w", [])["pin"]
    cluster, name, _, _ = store.pair(
        pin, "csr", "10.0.0.9", lambda e: Issued("ab01", now() + timedelta(days=1), "pem")
    )
    [row] = store.usage("c", 0, time.time() + 1)
    assert (cluster, row["node"], row["pool"], row["ended"]) == ("c", name, "manual", None)


def test_guard_settings_change_only_what_is_given_and_a_lease_runs_from_when_it_was_set(
    store: Store,
) -> None:
    import time

    store.put_autoscaling("c", True, 30.0)
    t = time.time()
    s = store.put_guards("c", {"lease": 3600.0, "on_lease": "shrink", "budget": 5.0})
    assert (s["lease"], s["on_lease"], s["budget"]) == (3600.0, "shrink", 5.0)
    assert store.autoscaling("c") == [{"cluster": "c", "enabled": True, "every": 30.0}]
    assert t - 1 <= s["lease_from"] <= time.time() and s["idle_after"] is None
    s2 = store.put_guards("c", {"idle_after": 600.0, "warn_before": 0.0})
    assert s2["lease_from"] == s["lease_from"] and s2["budget"] == 5.0  # kept
    assert s2["idle_from"] is not None and s2["warn_before"] == 0.0
    store.put_autoscaling("c", False, 30.0)  # `crv autoscale disable` keeps the guards
    assert store.guards("c")["lease"] == 3600.0
    assert store.autoscaling("c") == [{"cluster": "c", "enabled": False, "every": 30.0}]
    s3 = store.put_guards("c", {"lease": None, "budget": 0, "warn_before": None})
    assert (s3["lease"], s3["lease_from"], s3["budget"], s3["warn_before"]) == (None,) * 4
    assert s3["idle_after"] == 600.0
    notice = Notice("idle", "shrink", 1.0, 2.0, 3.0, "t").row()
    store.put_guard_state("c", 42.0, {"idle": notice})
    got = store.guards("c")
    assert (got["work_seen"], got["notices"]) == (42.0, {"idle": notice})


def test_guards_on_a_cluster_without_an_autoscaling_setting_make_one_disabled(
    store: Store,
) -> None:
    assert store.guards("c") == {"cluster": "c", "lease": None, "lease_from": None,
                                 "on_lease": None, "idle_after": None, "idle_from": None,
                                 "budget": None, "warn_before": None, "work_seen": None,
                                 "notices": {}}  # fmt: skip
    s = store.put_guards("c", {"budget": 1.5})
    assert s["budget"] == 1.5 and store.autoscaling("c")[0]["enabled"] is False
    store.put_guard_state("gone", 1.0, {})  # no setting: nothing, no error
    assert [a["cluster"] for a in store.autoscaling()] == ["c"]


def test_the_wire_models_take_only_what_is_sent_and_refuse_what_is_out_of_bounds() -> None:
    from pydantic import ValidationError

    from crv.service.models import GuardSetting, GuardState

    assert GuardSetting.model_validate({"lease": 60}).model_dump(exclude_unset=True) == {
        "lease": 60.0
    }
    cleared = GuardSetting.model_validate({"lease": None, "budget": 0})
    assert cleared.model_dump(exclude_unset=True) == {"lease": None, "budget": 0.0}
    for bad in ({"lease": -1}, {"lease": 8 * 86400}, {"on_lease": "explode"},
                {"budget": -0.5}, {"warn_before": 86401}, {"lease_from": 5.0}):  # fmt: skip
        with pytest.raises(ValidationError):
            GuardSetting.model_validate(bad)
    notice = Notice("lease", "destroy", 1.0, 2.0, 3.0, "t").row()
    assert GuardState.model_validate({"work_seen": 5.0, "notices": {"lease": notice}})
    with pytest.raises(ValidationError):
        GuardState.model_validate({"notices": {"lease": {**notice, "action": "explode"}}})


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--lease", "soon"), "error: --lease: soon: 'soon' is not a duration"),
        (("--lease", "8d"), "error: --lease: 8d: '8d' is not a duration"),
        (("--lease", "1h", "--no-lease"), "error: --lease: 1h: give --lease or --no-lease"),
        (("--idle-after", "-5m"), "error: --idle-after: -5m: "),
        (("--on-lease", "explode"), "error: --on-lease: explode: must be destroy or shrink"),
        (("--budget", "-1"), "error: --budget: -1: must be a number of node-hours"),
        (("--budget", "nan"), "error: --budget: nan: must be a number of node-hours"),
        (("--budget", "2", "--no-budget"), "error: --budget: 2: give --budget or --no-budget"),
        (("--warn-before", "never"), "error: --warn-before: never: "),
    ],
)
def test_bad_guard_options_are_one_line_and_exit_2_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], line: str
) -> None:
    from crv_cli import daemons
    from tests.conftest import crv

    home = tmp_path / "home"
    monkeypatch.setenv("CRV_HOME", str(home))
    monkeypatch.setattr(daemons, "up", lambda *_, **__: pytest.fail("the daemons started"))
    r = crv("autoscale", "enable", "x", *args)
    assert r.exit_code == 2, r.stdout
    assert r.stderr.startswith(line) and r.stderr.count("\n") == 1, r.stderr
    assert not home.exists()
