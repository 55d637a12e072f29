"""crv/service/store.py directly: the node upsert the flows rely on (done in bulk) and the throttled
heartbeat. The service's routes over the store are tested through real TLS in
test_service_security.py and end to end in test_deploy_e2e.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from crv.service import store as store_module
from crv.service.store import Issued, Store, StoreError
from tests.conftest import STORE_ROLES as ROLES


def node(name: str, roles: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "group": "g", "roles": roles, "pool": "local", **extra}


def events(store: Store) -> list[tuple[str | None, str, str | None]]:
    return [(e["node"], e["kind"], e.get("state")) for e in store.events_after("c", 0)]


def test_put_nodes_inserts_updates_and_reports_changed_work(store: Store) -> None:
    assert store.put_nodes("c", [node("c-g-0", ["web"]), node("c-g-1", ["web"])]) == {
        "c-g-0",
        "c-g-1",
    }
    # nothing new: no work changed, no generation bump
    gen = store.generation("c", "c-g-0")
    assert store.put_nodes("c", [node("c-g-0", ["web"])]) == set()
    assert store.generation("c", "c-g-0") == gen
    # a new address is new work (the agent must learn it); a state change is an event
    changed = store.put_nodes(
        "c", [node("c-g-0", ["web"], address="127.0.1.9", state="provisioned")]
    )
    assert changed == {"c-g-0"}
    assert store.generation("c", "c-g-0") == gen + 1
    work = store.work("c", "c-g-0")
    assert work["address"] == "127.0.1.9"
    assert [r["role"] for r in work["roles"]] == ["web"]
    assert ("c-g-0", "node", "provisioned") in events(store)
    assert store.status("c")["nodes"][0]["state"] == "provisioned"
    assert store.status("c")["nodes"][1]["state"] == "planned"


def test_put_nodes_gives_new_roles_pending_state_and_purges_roles_a_node_left(
    store: Store,
) -> None:
    store.put_nodes("c", [node("c-g-0", ["web", "mon"])])
    store.update_roles("c", [{"node": "c-g-0", "role": "mon", "op": "release"}])
    store.set_attribute("c", "c-g-0", "mon", "port", "8649")
    store.set_attribute("c", "c-g-0", "web", "url", "http://x")
    assert store.get_attribute("c", "mon", "port") == [("c-g-0", "8649")]

    store.put_nodes("c", [node("c-g-0", ["web"])])  # the node leaves `mon`
    assert store.get_attribute("c", "mon", "port") == []  # it no longer feeds mon
    assert store.get_attribute("c", "web", "url") == [("c-g-0", "http://x")]  # web kept
    roles = store.status("c")["nodes"][0]["roles"]
    assert set(roles) == {"web"} and roles["web"]["state"] == "pending"

    store.put_nodes("c", [node("c-g-0", ["web", "mon"])])  # and comes back: fresh state
    assert store.status("c")["nodes"][0]["roles"]["mon"]["state"] == "pending"


def test_an_enrolled_node_stays_enrolled_when_the_flow_says_provisioned_again(
    store: Store,
) -> None:
    store.put_nodes("c", [node("c-g-0", ["web"], address="127.0.1.2", state="provisioned")])
    token = store.issue_tokens("c", ["c-g-0"], timedelta(minutes=5))
    store.enrol(
        "c", "c-g-0", token["c-g-0"], "csr", lambda e: Issued("abc1", store_module.now(), "pem")
    )
    assert store.status("c")["nodes"][0]["state"] == "enrolled"
    store.put_nodes("c", [node("c-g-0", ["web"], address="127.0.1.2", state="provisioned")])
    assert store.status("c")["nodes"][0]["state"] == "enrolled"
    store.put_nodes("c", [node("c-g-0", ["web"], address="127.0.1.2", state="failed")])
    assert store.status("c")["nodes"][0]["state"] == "failed"


def test_put_nodes_in_bulk_keeps_every_node(store: Store) -> None:
    items = [node(f"c-g-{i}", ["web"]) for i in range(500)]
    assert len(store.put_nodes("c", items)) == 500
    items = [
        dict(n, address=f"127.0.2.{i % 250}", state="provisioned") for i, n in enumerate(items)
    ]
    assert len(store.put_nodes("c", items)) == 500
    status = store.status("c")
    assert [n["name"] for n in status["nodes"]] == [f"c-g-{i}" for i in range(500)]
    assert {n["state"] for n in status["nodes"]} == {"provisioned"}
    assert sum(1 for e in events(store) if e[1] == "node") == 500


def test_touch_writes_last_seen_at_most_every_few_seconds(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_nodes("c", [node("c-g-0", ["web"])])
    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    store.touch("c", "c-g-0")
    first = store.status("c")["nodes"][0]["last_seen"]
    assert first is not None
    clock[0] += store_module.TOUCH_EVERY / 2
    store.touch("c", "c-g-0")
    assert store.status("c")["nodes"][0]["last_seen"] == first  # throttled: no write
    clock[0] += store_module.TOUCH_EVERY
    store.touch("c", "c-g-0")
    assert store.status("c")["nodes"][0]["last_seen"] != first


def test_refresh_reruns_a_converged_role_only_when_its_inputs_changed(store: Store) -> None:
    roles = {**ROLES, "lb": {**ROLES["web"], "depends_on": [{"role": "web", "local": False,
                                                              "min_ready": None}]}}  # fmt: skip
    store.put_cluster(
        "c", appliance="x", source="dir", pool="local", parameters={}, roles=roles, bundle=b"b"
    )
    store.put_nodes("c", [node("c-g-0", ["web"]), node("c-g-1", ["web"]), node("c-f-0", ["lb"])])
    for n in ("c-g-0", "c-g-1"):
        store.update_roles("c", [{"node": n, "role": "web", "op": "release"}])
        store.set_attribute("c", n, "web", "url", f"http://{n}")
        store.update_roles("c", [{"node": n, "role": "web", "op": "verified"}])
    (first,), _ = store.update_roles("c", [{"node": "c-f-0", "role": "lb", "op": "release"}])
    store.report_status("c", "c-f-0", "lb", release=first["release"], state="done",
                        exit_code=0, output="")  # fmt: skip

    def refresh() -> dict[str, Any]:
        (r,), _ = store.update_roles("c", [{"node": "c-f-0", "role": "lb", "op": "refresh"}])
        return r

    assert refresh()["released"] is False  # nothing it reads changed
    store.update_roles("c", [{"node": "c-f-0", "role": "lb", "op": "verify_failed"}])
    assert refresh()["released"] is False  # verify checks it again; the recipe is not re-run
    # a web node leaves (a shrink): the lb's inputs changed, so it runs again
    store.put_nodes("c", [node("c-g-1", ["web"], state="leaving")])
    again = refresh()
    assert again["released"] is True and again["release"] == first["release"] + 1
    assert store.get_attribute("c", "web", "url") == [("c-g-0", "http://c-g-0")]


def test_a_drain_is_a_release_of_the_drain_recipe_and_its_outcome_is_drained(
    store: Store,
) -> None:
    roles = {**ROLES, "web": {**ROLES["web"], "drain": "roles/web-drain.sh"}}
    store.put_cluster(
        "c", appliance="x", source="dir", pool="local", parameters={}, roles=roles, bundle=b"b"
    )
    store.put_nodes("c", [node("c-g-0", ["web", "mon"])])
    (rel,), _ = store.update_roles("c", [{"node": "c-g-0", "role": "web", "op": "release"}])
    store.report_status("c", "c-g-0", "web", release=rel["release"], state="done",
                        exit_code=0, output="")  # fmt: skip
    # a role without a drain recipe cannot be drained
    with pytest.raises(store_module.StoreError, match="no drain recipe"):
        store.update_roles("c", [{"node": "c-g-0", "role": "mon", "op": "drain"}])

    gen = store.generation("c", "c-g-0")
    (d,), woken = store.update_roles("c", [{"node": "c-g-0", "role": "web", "op": "drain"}])
    assert d == {"node": "c-g-0", "role": "web", "release": rel["release"] + 1,
                 "state": "draining", "released": True}  # fmt: skip
    assert woken == {"c-g-0"} and store.generation("c", "c-g-0") == gen + 1
    work = {r["role"]: r for r in store.work("c", "c-g-0")["roles"]}
    assert work["web"]["recipe"] == "roles/web-drain.sh"
    assert work["web"]["env"]["CRV_ACTION"] == "drain"
    assert work["mon"]["recipe"] == "roles/mon.sh" and "CRV_ACTION" not in work["mon"]["env"]
    # asked again while it runs (a resumed shrink): the same release, nothing new
    (again,), _ = store.update_roles("c", [{"node": "c-g-0", "role": "web", "op": "drain"}])
    assert again["release"] == d["release"] and again["released"] is False

    # the agent reports as for any release; the store records what it was
    for reported, recorded in (("running", "draining"), ("failed", "drain_failed")):
        store.report_status("c", "c-g-0", "web", release=d["release"], state=reported,
                            exit_code=None if reported == "running" else 3, output="busy")  # fmt: skip
        assert store.status("c")["nodes"][0]["roles"]["web"]["state"] == recorded
    # a failed drain can be tried again; this time it drains
    (d2,), _ = store.update_roles("c", [{"node": "c-g-0", "role": "web", "op": "drain"}])
    assert d2["release"] == d["release"] + 1
    store.report_status("c", "c-g-0", "web", release=d2["release"], state="done",
                        exit_code=0, output="")  # fmt: skip
    assert store.status("c")["nodes"][0]["roles"]["web"]["state"] == "drained"
    (done,), _ = store.update_roles("c", [{"node": "c-g-0", "role": "web", "op": "drain"}])
    assert done["state"] == "drained" and done["released"] is False  # not run twice
    # a drained role that is wanted again (the node is kept) runs its recipe again
    (back,), _ = store.update_roles("c", [{"node": "c-g-0", "role": "web", "op": "refresh"}])
    assert back["released"] is True
    work = {r["role"]: r for r in store.work("c", "c-g-0")["roles"]}
    assert work["web"]["recipe"] == "roles/web.sh" and "CRV_ACTION" not in work["web"]["env"]


def test_a_leaving_node_that_is_wanted_again_is_enrolled_again_only_if_it_had_enrolled(
    store: Store,
) -> None:
    store.put_nodes("c", [node(n, ["web"], state="provisioned") for n in ("c-g-0", "c-g-1")])
    token = store.issue_tokens("c", ["c-g-0"], timedelta(minutes=5))["c-g-0"]
    issued = Issued("abc123", store_module.now() + timedelta(days=1), "pem")
    store.enrol("c", "c-g-0", token, "csr", lambda _: issued)
    store.put_nodes("c", [node(n, ["web"], state="leaving") for n in ("c-g-0", "c-g-1")])
    store.put_nodes("c", [node(n, ["web"], state="provisioned") for n in ("c-g-0", "c-g-1")])
    states = {n["name"]: n["state"] for n in store.status("c")["nodes"]}
    assert states == {"c-g-0": "enrolled", "c-g-1": "provisioned"}


def test_refresh_sees_a_change_of_nodes_even_when_they_publish_nothing(store: Store) -> None:
    roles = {**ROLES, "top": {**ROLES["web"], "depends_on": [{"role": "web", "local": False,
                                                               "min_ready": None}]}}  # fmt: skip
    store.put_cluster(
        "c", appliance="x", source="dir", pool="local", parameters={}, roles=roles, bundle=b"b"
    )
    store.put_nodes("c", [node("c-g-0", ["web"]), node("c-g-1", ["web"]), node("c-h-0", ["top"])])
    for n in ("c-g-0", "c-g-1"):  # web publishes no attribute at all
        store.update_roles("c", [{"node": n, "role": "web", "op": "release"}])
        store.update_roles("c", [{"node": n, "role": "web", "op": "verified"}])
    (first,), _ = store.update_roles("c", [{"node": "c-h-0", "role": "top", "op": "release"}])
    store.report_status("c", "c-h-0", "top", release=first["release"], state="done",
                        exit_code=0, output="")  # fmt: skip
    refresh = {"node": "c-h-0", "role": "top", "op": "refresh"}
    assert store.update_roles("c", [refresh])[0][0]["released"] is False
    store.put_nodes("c", [node("c-g-1", ["web"], state="leaving")])
    assert store.update_roles("c", [refresh])[0][0]["released"] is True


# -- autoscaling settings and decisions ----------------------------------------------------------


def put_other_cluster(store: Store, name: str) -> None:
    store.put_cluster(
        name, appliance="x", source="dir", pool="local", parameters={}, roles=ROLES, bundle=b"b"
    )


def decision(group: str, at: float, action: str = "none", **extra: Any) -> dict[str, Any]:
    return {"group": group, "at": at, "metric": 10.0, "current": 2, "desired": 2, "target": 2,
            "action": action, "reason": f"at {at:g}", **extra}  # fmt: skip


def test_autoscaling_settings_per_cluster_updated_in_place(store: Store) -> None:
    assert store.autoscaling() == [] and store.autoscaling("c") == []
    assert store.put_autoscaling("c", True, 60.0) == {"cluster": "c", "enabled": True, "every": 60}
    assert store.autoscaling("c") == [{"cluster": "c", "enabled": True, "every": 60.0}]
    store.put_autoscaling("c", False, 300.0)  # the same row, changed
    assert store.autoscaling("c") == [{"cluster": "c", "enabled": False, "every": 300.0}]
    put_other_cluster(store, "b")
    store.put_autoscaling("b", True, 5.0)
    assert store.autoscaling() == [  # by cluster name
        {"cluster": "b", "enabled": True, "every": 5.0},
        {"cluster": "c", "enabled": False, "every": 300.0},
    ]
    assert store.autoscaling("nope") == []
    with pytest.raises(StoreError) as err:
        store.put_autoscaling("nope", True, 60.0)
    assert err.value.status == 404 and "nope" in str(err.value)
    assert [r["cluster"] for r in store.autoscaling()] == ["b", "c"]


def test_decisions_newest_first_by_group_with_a_limit_and_their_outcome(store: Store) -> None:
    first = store.add_decision("c", decision("worker", 100.0))
    grow = store.add_decision(
        "c",
        decision("worker", 160.0, "grow", metric=None, target=4, desired=5, flow_run="fr-1",
                 last_scale_up=160.0, low_since=None),
    )  # fmt: skip
    other = store.add_decision("c", decision("db", 170.0, low_since=150.0))
    assert first < grow < other
    rows = store.decisions("c")
    assert [r["seq"] for r in rows] == [other, grow, first]
    assert rows[1] == {
        "seq": grow, "group": "worker", "at": 160.0, "metric": None, "current": 2,
        "desired": 5, "target": 4, "action": "grow", "reason": "at 160", "outcome": None,
        "flow_run": "fr-1", "last_scale_up": 160.0, "low_since": None, "last_action": None,
    }  # fmt: skip
    assert [r["seq"] for r in store.decisions("c", "worker")] == [grow, first]
    assert [r["seq"] for r in store.decisions("c", "worker", limit=1)] == [grow]
    assert [r["seq"] for r in store.decisions("c", limit=2)] == [other, grow]
    assert store.decisions("c", "nogroup") == []

    store.set_outcome("c", grow, "grew 2 -> 4")
    assert [r["outcome"] for r in store.decisions("c")] == [None, "grew 2 -> 4", None]
    store.set_outcome("c", grow, "failed: pool broken")  # an outcome can be replaced
    assert store.decisions("c", "worker", 1)[0]["outcome"] == "failed: pool broken"
    put_other_cluster(store, "d")
    for cluster, seq in (("c", other + 100), ("d", grow)):  # unknown, or another cluster's
        with pytest.raises(StoreError) as err:
            store.set_outcome(cluster, seq, "x")
        assert err.value.status == 404 and str(seq) in str(err.value)
    assert store.decisions("d") == []
    with pytest.raises(StoreError) as err:
        store.add_decision("nope", decision("worker", 1.0))
    assert err.value.status == 404
    assert store.decisions("nope") == []


def test_old_decisions_are_pruned_per_cluster(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "DECISIONS_KEPT", 3)
    put_other_cluster(store, "d")
    kept_d = [store.add_decision("d", decision("worker", float(t))) for t in range(2)]
    seqs = [store.add_decision("c", decision("worker" if t % 2 else "db", float(t)))
            for t in range(7)]  # fmt: skip
    assert [r["seq"] for r in store.decisions("c", limit=100)] == seqs[:-4:-1]
    assert [r["seq"] for r in store.decisions("d")] == kept_d[::-1]  # another cluster's stay


def test_pruning_counts_each_clusters_own_decisions_when_clusters_interleave(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seq counter is shared: two clusters deciding in turn each keep DECISIONS_KEPT."""
    monkeypatch.setattr(store_module, "DECISIONS_KEPT", 3)
    put_other_cluster(store, "d")
    for t in range(5):
        store.add_decision("c", decision("worker", float(t)))
        store.add_decision("d", decision("worker", float(t)))
    assert [r["at"] for r in store.decisions("c")] == [4.0, 3.0, 2.0]
    assert [r["at"] for r in store.decisions("d")] == [4.0, 3.0, 2.0]


def test_deleting_a_cluster_deletes_its_autoscaling_and_decisions(store: Store) -> None:
    put_other_cluster(store, "d")
    for cluster in ("c", "d"):
        store.put_autoscaling(cluster, True, 60.0)
        store.add_decision(cluster, decision("worker", 1.0))
    store.delete_cluster("c")
    assert [r["cluster"] for r in store.autoscaling()] == ["d"]
    assert store.decisions("c") == [] and len(store.decisions("d")) == 1
    put_other_cluster(store, "c")  # made again: it starts with no setting and no decisions
    assert store.autoscaling("c") == [] and store.decisions("c") == []


def test_a_node_without_an_address_gets_the_one_its_enrolment_came_from(store: Store) -> None:
    """A guest on a bridge takes its address by DHCP after its pool made it: the pool knew none.
    The enrolment's peer address becomes the node's, and its certificate names it (the first
    real mysql-ha: the replica refused the primary's certificate, which named no address)."""
    store.put_nodes("c", [node("c-g-0", ["web"], address=None, state="provisioned"),
                          node("c-g-1", ["web"], address="127.0.1.9", state="provisioned")])  # fmt: skip
    tokens = store.issue_tokens("c", ["c-g-0", "c-g-1"], timedelta(minutes=5))
    signed: list[str | None] = []

    def sign(e: store_module.Enrolment) -> Issued:
        signed.append(e.address)
        return Issued(f"ab{len(signed)}", store_module.now() + timedelta(days=1), "pem")

    store.enrol("c", "c-g-0", tokens["c-g-0"], "csr0", sign, peer="10.77.1.5")
    store.enrol("c", "c-g-1", tokens["c-g-1"], "csr1", sign, peer="10.77.1.6")
    assert signed == ["10.77.1.5", "127.0.1.9"]  # a known address is kept
    addresses = {n["name"]: n["address"] for n in store.status("c")["nodes"]}
    assert addresses == {"c-g-0": "10.77.1.5", "c-g-1": "127.0.1.9"}


def test_writers_of_one_cluster_take_turns(store: Store) -> None:
    """Eight threads (as the service's store threads, or several service processes) add
    attributes to one node's role at once, 320 keys against a cap of 256: exactly 256 are kept
    and 64 refused. A check-then-insert that did not take turns (READ COMMITTED without the
    cluster's lock on PostgreSQL) lets more through."""
    import concurrent.futures

    store.put_nodes("c", [node("n1", ["web"])])

    def add(t: int) -> tuple[int, int]:
        kept = refused = 0
        for k in range(40):
            try:
                store.set_attribute("c", "n1", "web", f"k{t}-{k}", "v")
                kept += 1
            except StoreError as e:
                assert e.status == 413
                refused += 1
        return kept, refused

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(add, range(8)))
    assert sum(k for k, _ in results) == store_module.MAX_KEYS_PER_ROLE == 256
    assert sum(r for _, r in results) == 320 - 256


def test_a_poll_while_its_cluster_is_destroyed_and_made_again_is_work_or_403(
    store: Store,
) -> None:
    """An agent's poll (`work`) reads its node, its cluster and its role states: each of those
    statements sees its own moment on PostgreSQL. A destroy (and the cluster made again, with
    other roles) between them is a 403 or the work of one consistent moment, never a 500 (the
    10-cluster day saw NoResultFound)."""
    import threading

    web_only = {"web": ROLES["web"]}
    stop = threading.Event()
    errors: list[BaseException] = []
    answers = {"work": 0, "403": 0}

    def poll() -> None:
        while not stop.is_set():
            try:
                work = store.work("c", "n1")
                assert {r["role"] for r in work["roles"]} <= {"web", "mon"}
                answers["work"] += 1
            except StoreError as e:
                if e.status != 403:
                    errors.append(e)
                answers["403"] += 1
            except BaseException as e:
                errors.append(e)
                return

    pollers = [threading.Thread(target=poll) for _ in range(3)]
    for t in pollers:
        t.start()
    try:
        for i in range(60):
            store.delete_cluster("c")
            roles = ROLES if i % 2 else web_only
            store.put_cluster(
                "c", appliance="x", source="dir", pool="local", parameters={}, roles=roles,
                bundle=b"b",
            )  # fmt: skip
            store.put_nodes("c", [node("n1", ["web", "mon"] if i % 2 else ["web"])])
    finally:
        stop.set()
        for t in pollers:
            t.join()
    assert errors == [], errors[:3]
    assert answers["work"] > 0 and answers["403"] > 0, answers


def test_an_enrolment_replayed_is_answered_while_the_cluster_is_being_written(
    store: Store,
) -> None:
    """The same token with the same CSR again (the agent lost the first answer) gets the same
    certificate without waiting for the cluster's turn to write: a burst of enrolments that
    holds that turn must not hold up the retries too. Another CSR is still refused."""
    import concurrent.futures
    import threading

    store.put_nodes("c", [node("c-g-0", ["web"], address="127.0.1.2", state="provisioned")])
    token = store.issue_tokens("c", ["c-g-0"], timedelta(minutes=5))["c-g-0"]
    issued = Issued("abc1", store_module.now(), "the-pem")
    assert store.enrol("c", "c-g-0", token, "csr", lambda _: issued) == ("the-pem", [])

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._writing("c"):
            held.set()
            release.wait(30)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        holder = pool.submit(hold)
        assert held.wait(10)
        try:
            replay = pool.submit(store.enrol, "c", "c-g-0", token, "csr", lambda _: issued)
            assert replay.result(timeout=10) == ("the-pem", [])
        finally:
            release.set()
            holder.result(timeout=10)
    with pytest.raises(StoreError) as refused:
        store.enrol("c", "c-g-0", token, "other-csr", lambda _: issued)
    assert refused.value.status == 401


def test_a_quarantined_node_is_shut_out_and_made_again_by_the_next_change(store: Store) -> None:
    """F5: its certificate revoked (returned for the CRL), its token spent, what it published
    purged, every node call refused; put `provisioning` again (the next change remakes it),
    its roles start afresh."""
    store.put_nodes("c", [node("c-g-0", ["web"], address="127.0.1.9", state="provisioned"),
                          node("c-g-1", ["web"], address="127.0.1.8", state="provisioned")])  # fmt: skip
    tokens = store.issue_tokens("c", ["c-g-0", "c-g-1"], timedelta(minutes=5))

    serials = iter(["cd0", "cd1", "cd2"])

    def sign(e: store_module.Enrolment) -> Issued:
        return Issued(next(serials), store_module.now() + timedelta(days=1), "pem")

    store.enrol("c", "c-g-0", tokens["c-g-0"], "csr0", sign)
    store.set_attribute("c", "c-g-0", "web", "url", "http://127.0.1.9/")
    assert store.get_attribute("c", "web", "url") == [("c-g-0", "http://127.0.1.9/")]

    assert store.quarantine("c", "c-g-0", "c-g-0:contextualize:web failed: exit 3") == ["cd0"]
    assert store.quarantine("c", "c-g-1", "c-g-1:certify failed: timed out") == []
    assert {serial for serial, _ in store.revoked("c")} == {int("cd0", 16)}
    assert store.get_attribute("c", "web", "url") == []
    assert store.current_roles("cd0", "c", "c-g-0") == (None, [])  # every node route: 403
    with pytest.raises(StoreError) as refused:
        store.renew("c", "c-g-0", "cd0", sign)
    assert refused.value.status == 403 and "quarantined" in str(refused.value)
    with pytest.raises(StoreError, match="no unused token"):  # c-g-1's token is spent
        store.enrol("c", "c-g-1", tokens["c-g-1"], "csr1", sign)
    states = {n["name"]: n["state"] for n in store.status("c")["nodes"]}
    assert states == {"c-g-0": "quarantined", "c-g-1": "quarantined"}
    assert ("c-g-0", "node", "quarantined") in events(store)
    with pytest.raises(StoreError) as unknown:
        store.quarantine("c", "c-g-9", "no such node")
    assert unknown.value.status == 404

    # the next change makes it again: a new token enrols it, its roles run again
    store.put_nodes("c", [node("c-g-0", ["web"], state="provisioning")])
    store.put_nodes("c", [node("c-g-0", ["web"], state="provisioned")])
    again = store.issue_tokens("c", ["c-g-0"], timedelta(minutes=5))
    store.enrol("c", "c-g-0", again["c-g-0"], "csr2", sign)
    assert store.work("c", "c-g-0")["roles"][0]["state"] == "pending"
