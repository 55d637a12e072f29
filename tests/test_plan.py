"""The plan through `crv plan`: the JSON contract, the DAG rules, critical path, readability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx
import pytest

from crv.appliance.loader import load_appliance
from crv.appliance.plan import expand
from tests.conftest import CATALOG, crv, crv_process, write_appliance


def plan_json(*args: str) -> dict[str, Any]:
    result = crv("plan", *args, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1  # exactly one JSON object on one line
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def graph_of(data: dict[str, Any]) -> nx.DiGraph[str]:
    g: nx.DiGraph[str] = nx.DiGraph()
    g.add_nodes_from(s["id"] for s in data["steps"])
    g.add_edges_from(tuple(e) for e in data["edges"])
    return g


def test_json_contract_shape_for_the_webfarm() -> None:
    data = plan_json(str(CATALOG / "webfarm"), "--name", "demo")
    assert set(data) == {"cluster", "steps", "edges", "critical_path"}
    assert data["cluster"] == "demo"
    for step in data["steps"]:
        assert set(step) == {"id", "kind", "node", "role"}
        assert step["kind"] in ("provision", "certify", "contextualize", "verify")
        expected = f"{step['node']}:{step['kind']}" + (f":{step['role']}" if step["role"] else "")
        assert step["id"] == expected
        assert (step["role"] is None) == (step["kind"] in ("provision", "certify"))
    nodes = sorted({s["node"] for s in data["steps"]})
    assert nodes == ["demo-front-0", "demo-worker-0", "demo-worker-1", "demo-worker-2"]
    assert len(data["steps"]) == 16
    edges = {tuple(e) for e in data["edges"]}
    assert len(edges) == len(data["edges"]) == 15
    for n in nodes:
        assert (f"{n}:provision", f"{n}:certify") in edges
    for i in range(3):
        assert (f"demo-worker-{i}:verify:web", "demo-front-0:contextualize:lb") in edges
        assert (f"demo-worker-{i}:certify", f"demo-worker-{i}:contextualize:web") in edges
    assert set(data["critical_path"]) == {"steps", "seconds"}
    assert isinstance(data["critical_path"]["seconds"], float)


def test_ganglia_local_edge_stays_on_the_node_and_remote_edges_reach_every_server() -> None:
    data = plan_json(str(CATALOG / "ganglia"), "--set", "servers=2", "--set", "clients=3")
    g = graph_of(data)
    servers = ["ganglia-server-0", "ganglia-server-1"]
    for i in range(3):
        node = f"ganglia-compute-{i}"
        # local: the proxy waits for gmond on the same node, and only that one
        proxy_preds = set(g.predecessors(f"{node}:contextualize:proxy"))
        assert proxy_preds == {f"{node}:certify", f"{node}:verify:gmond"}
        # remote: gmond waits for the collector on every server node
        gmond_preds = set(g.predecessors(f"{node}:contextualize:gmond"))
        assert gmond_preds == {f"{node}:certify"} | {f"{s}:verify:collector" for s in servers}
    for s in servers:  # local chains on the server nodes: collector -> gmetad -> web
        # gmetad also waits for every compute node's gmond: its verify checks they all report
        assert set(g.predecessors(f"{s}:contextualize:gmetad")) == {
            f"{s}:certify",
            f"{s}:verify:collector",
        } | {f"ganglia-compute-{i}:verify:gmond" for i in range(3)}
        assert f"{s}:verify:gmetad" in g.predecessors(f"{s}:contextualize:web")
    assert nx.is_directed_acyclic_graph(g)


def test_min_ready_waits_for_the_first_nodes_only(tmp_path: Path) -> None:
    directory = write_appliance(
        tmp_path,
        "mr",
        """\
        apiVersion: crv/v1
        name: mr
        nodes:
          store: {count: 5, roles: [osd]}
          head: {count: 2, roles: [mon]}
        roles:
          osd: {recipe: osd.sh}
          mon: {recipe: mon.sh, depends_on: [{role: osd, min_ready: 2}]}
        """,
        ("osd.sh", "mon.sh"),
    )
    g = graph_of(plan_json(str(directory)))
    for h in range(2):
        preds = set(g.predecessors(f"mr-head-{h}:contextualize:mon"))
        assert preds == {f"mr-head-{h}:certify", "mr-store-0:verify:osd", "mr-store-1:verify:osd"}


def test_critical_path_follows_estimates(tmp_path: Path) -> None:
    directory = write_appliance(
        tmp_path,
        "cp",
        """\
        apiVersion: crv/v1
        name: cp
        nodes:
          db: {count: 1, roles: [db]}
          app: {count: 3, roles: [app]}
        roles:
          db:
            recipe: db.sh
            estimates: {provision: 100, certify: 1, contextualize: 50, verify: 2}
          app:
            recipe: app.sh
            depends_on: [db]
            estimates: {provision: 10, certify: 1, contextualize: 7, verify: 3}
        """,
        ("db.sh", "app.sh"),
    )
    data = plan_json(str(directory))
    cp = data["critical_path"]
    assert cp["seconds"] == pytest.approx(100 + 1 + 50 + 2 + 7 + 3)
    assert cp["steps"][:4] == [
        "cp-db-0:provision",
        "cp-db-0:certify",
        "cp-db-0:contextualize:db",
        "cp-db-0:verify:db",
    ]
    assert cp["steps"][4].endswith(":contextualize:app")
    g = graph_of(data)
    assert all(g.has_edge(u, v) for u, v in zip(cp["steps"], cp["steps"][1:], strict=False))


def test_node_wide_steps_take_the_slowest_role_estimate(tmp_path: Path) -> None:
    directory = write_appliance(
        tmp_path,
        "mix",
        """\
        apiVersion: crv/v1
        name: mix
        nodes:
          n: {count: 1, roles: [fast, slow]}
        roles:
          fast: {recipe: f.sh, estimates: {provision: 5, contextualize: 1, verify: 1}}
          slow: {recipe: s.sh, estimates: {provision: 300, contextualize: 1, verify: 1}}
        """,
        ("f.sh", "s.sh"),
    )
    plan = expand(load_appliance(directory))
    assert plan.graph.nodes["mix-n-0:provision"]["seconds"] == 300
    assert plan.graph.nodes["mix-n-0:certify"]["seconds"] == 2  # the default
    assert plan.critical_seconds == 300 + 2 + 1 + 1


def test_include_prefixes_groups_roles_and_parameters() -> None:
    data = plan_json(str(CATALOG / "webshop"), "--set", "db-replicas=3", "--set", "apps=2")
    g = graph_of(data)
    nodes = {s["node"] for s in data["steps"]}
    assert {"webshop-db-primary-0", "webshop-db-replica-2", "webshop-app-1"} <= nodes
    assert "webshop-db-replica-3" not in nodes
    # the included dependency (replica -> primary) is renamed with the prefix
    assert g.has_edge(
        "webshop-db-primary-0:verify:db-primary", "webshop-db-replica-1:contextualize:db-replica"
    )
    # the including appliance depends on included roles by their prefixed names
    for r in range(3):
        assert g.has_edge(
            f"webshop-db-replica-{r}:verify:db-replica", "webshop-app-0:contextualize:app"
        )


def test_included_roles_keep_their_own_directory_and_parameters() -> None:
    a = load_appliance(CATALOG / "webshop", {"db-database": "orders"})
    primary = a.roles["db-primary"]
    assert primary.recipe == (CATALOG / "mysql-ha" / "roles" / "primary.sh").resolve()
    assert primary.params == {"replicas": 1, "database": "orders"}  # its own, unprefixed
    assert a.parameters["db-database"] == "orders"
    assert a.parameters["db-replicas"] == 1  # bound by the include, not mysql-ha's default
    assert a.roles["app"].params == {"apps": 2}


def test_include_found_through_the_search_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shelf = tmp_path / "shelf"
    write_appliance(
        shelf,
        "cache",
        """\
        apiVersion: crv/v1
        name: cache
        nodes:
          mc: {count: 2, roles: [memcached]}
        roles:
          memcached: {recipe: mc.sh}
        """,
        ("mc.sh",),
    )
    app = write_appliance(
        tmp_path / "mine",
        "site",
        """\
        apiVersion: crv/v1
        name: site
        include: [{appliance: cache, prefix: c}]
        nodes:
          web: {count: 1, roles: [web]}
        roles:
          web: {recipe: web.sh, depends_on: [c-memcached]}
        """,
        ("web.sh",),
    )
    assert crv("validate", str(app)).exit_code == 2
    monkeypatch.setenv("CRV_APPLIANCE_PATH", str(shelf))
    g = graph_of(plan_json(str(app)))
    assert g.has_edge("site-c-mc-1:verify:c-memcached", "site-web-0:contextualize:web")


def test_plan_is_deterministic() -> None:
    first = crv("plan", str(CATALOG / "ganglia"), "--set", "clients=50", "--json").stdout
    second = crv("plan", str(CATALOG / "ganglia"), "--set", "clients=50", "--json").stdout
    assert first == second


def test_a_thousand_node_plan_is_readable_and_folded() -> None:
    result = crv("plan", str(CATALOG / "webfarm"), "--set", "workers=1000")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Cluster webfarm: 1001 nodes in 2 groups, 4004 steps, 4003 edges" in " ".join(
        out.split()
    )
    assert "webfarm-worker-[0-999]" in out
    assert len(out.splitlines()) < 60  # not 4,000 lines
    # levels in order: provision, certify, contextualize web, verify web, contextualize lb, ...
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines()]
    kinds = [cells[1] for cells in rows if len(cells) == 5 and cells[0].isdigit()]
    assert kinds == ["provision", "certify", "contextualize", "verify", "contextualize", "verify"]


def test_a_thousand_node_plan_as_json() -> None:
    data = plan_json(str(CATALOG / "webfarm"), "--set", "workers=1000")
    assert len(data["steps"]) == 4004
    assert len({s["node"] for s in data["steps"]}) == 1001
    # the load balancer waits for every one of the 1,000 web nodes
    lb = "webfarm-front-0:contextualize:lb"
    assert sum(1 for _, v in data["edges"] if v == lb) == 1001  # 1,000 web + its own certify


def test_refuses_a_plan_whose_fan_in_would_explode(tmp_path: Path) -> None:
    directory = write_appliance(
        tmp_path,
        "fan",
        """\
        apiVersion: crv/v1
        name: fan
        nodes:
          a: {count: 2000, roles: [a]}
          b: {count: 2000, roles: [b]}
        roles:
          a: {recipe: a.sh}
          b: {recipe: b.sh, depends_on: [a]}
        """,
        ("a.sh", "b.sh"),
    )
    result = crv("plan", str(directory), "--json")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {directory}/appliance.yaml: roles.b.depends_on: b on 2000 nodes waiting for a "
        "on 2000 nodes makes 4000000 edges (at most 1000000); set min_ready\n"
    )


@pytest.mark.parametrize("name", ["webfarm", "ganglia", "htcondor", "mysql-ha", "webshop", "slurm"])
def test_every_catalog_appliance_plans(name: str) -> None:
    data = plan_json(str(CATALOG / name))
    g = graph_of(data)
    assert nx.is_directed_acyclic_graph(g)
    assert data["critical_path"]["seconds"] > 0


def test_cli_as_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "appliance.yaml").write_text("apiVersion: crv/v1\nname: Bad\n")
    result = crv_process("plan", str(tmp_path / "bad"))
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path}/bad/appliance.yaml: name: 'Bad' is not")
    ok = crv_process("plan", "appliances/webfarm", "--json")
    assert ok.exit_code == 0
    assert json.loads(ok.stdout)["cluster"] == "webfarm"


def test_a_very_deep_dependency_chain_plans_without_recursion_limits(tmp_path: Path) -> None:
    depth = 250
    roles = "\n".join(
        f"  r{i}: {{recipe: r.sh" + (f", depends_on: [r{i - 1}]}}" if i else "}")
        for i in range(depth)
    )
    groups = "\n".join(  # a group hosts at most 64 roles: spread the chain over 5 groups
        f"  g{g}: {{count: 1, roles: [{', '.join(f'r{i}' for i in range(g * 50, g * 50 + 50))}]}}"
        for g in range(depth // 50)
    )
    directory = write_appliance(
        tmp_path,
        "chain",
        f"apiVersion: crv/v1\nname: chain\nnodes:\n{groups}\nroles:\n{roles}\n",
        ("r.sh",),
    )
    data = plan_json(str(directory))
    assert len(data["critical_path"]["steps"]) == 2 + 2 * depth
    human = crv("plan", str(directory))
    assert human.exit_code == 0


def test_members_keep_the_oldest_and_fill_the_lowest_free_indices() -> None:
    from crv.appliance.loader import with_counts
    from crv.appliance.plan import members

    app = load_appliance(CATALOG / "webfarm")
    existing = [("w-front-0", "front"), *((f"w-worker-{i}", "worker") for i in (0, 2, 5, 7))]
    existing.append(("w-old-0", "old"))  # a group the appliance no longer has
    shrunk = members(with_counts(app, {"worker": 2}), "w", existing)
    assert shrunk == {"front": (0,), "worker": (0, 2)}
    planned = expand(with_counts(app, {"worker": 2}), "w", shrunk).nodes
    assert [n for n, _ in existing if n not in planned] == ["w-worker-5", "w-worker-7", "w-old-0"]
    grown = members(with_counts(app, {"worker": 6}), "w", existing)
    assert grown["worker"] == (0, 1, 2, 3, 5, 7)
    planned = expand(with_counts(app, {"worker": 6}), "w", grown).nodes
    assert [n for n, _ in existing if n not in planned] == ["w-old-0"]
    plan = expand(with_counts(app, {"worker": 6}), "w", grown)
    assert sorted(n for n in plan.nodes if "worker" in n) == [
        f"w-worker-{i}" for i in (0, 1, 2, 3, 5, 7)
    ]
    assert "w-worker-7:verify:web" in plan.graph  # the lb waits for the kept node too
    assert plan.graph.has_edge("w-worker-7:verify:web", "w-front-0:contextualize:lb")
    with pytest.raises(Exception, match="not 6 distinct node indices"):
        expand(with_counts(app, {"worker": 6}), "w", {"worker": (0, 1)})


def test_members_remove_the_named_nodes_first_in_order_then_the_newest() -> None:
    """The autoscaler's idle-first order (`remove_first`) picks a shrink's victims."""
    from crv.appliance.loader import with_counts
    from crv.appliance.plan import members

    app = load_appliance(CATALOG / "webfarm")
    existing = [("w-front-0", "front"), *((f"w-worker-{i}", "worker") for i in range(5))]

    def kept(count: int, remove_first: list[str]) -> tuple[int, ...]:
        got = members(with_counts(app, {"worker": count}), "w", existing, remove_first)
        assert got["front"] == (0,)
        return got["worker"]

    assert kept(3, []) == (0, 1, 2)  # no names: the newest go
    assert kept(3, ["w-worker-1", "w-worker-3"]) == (0, 2, 4)
    # one victim: the first named, not the other one
    assert kept(4, ["w-worker-1", "w-worker-3"]) == (0, 2, 3, 4)
    assert kept(4, ["w-worker-3", "w-worker-1"]) == (0, 1, 2, 4)
    # more victims than names: the named ones, then the newest of the others
    assert kept(2, ["w-worker-1"]) == (0, 2)
    assert kept(1, ["w-worker-0", "w-worker-2"]) == (1,)
    # names of another group's node, of no node, or not a node name at all change nothing
    for foreign in (["w-front-0"], ["w-worker-7", "x-worker-1", "zzz"], ["w-front-0", "w-web-1"]):
        for count in (1, 3, 5, 7):
            assert kept(count, foreign) == kept(count, []), (foreign, count)
    # a growth keeps every node, named or not, and fills the lowest free indices
    assert kept(7, ["w-worker-1", "w-worker-3"]) == (0, 1, 2, 3, 4, 5, 6)
    assert kept(5, ["w-worker-4"]) == (0, 1, 2, 3, 4)
    # the victims are what the plan leaves out
    shrunk = with_counts(app, {"worker": 3})
    plan = expand(shrunk, "w", members(shrunk, "w", existing, ["w-worker-2", "w-worker-0"]))
    assert [n for n, _ in existing if n not in plan.nodes] == ["w-worker-0", "w-worker-2"]
