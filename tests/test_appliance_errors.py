"""Bad appliances are refused before anything happens, with one exact line naming file and field.

Each case writes a small appliance into a temp dir, runs `crv validate` (or `crv plan`) through
the CLI, and asserts exit code 2, an empty stdout and the exact error line. `{F}` stands for the
appliance.yaml path and `{D}` for its directory.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.conftest import crv, write_appliance

BASE = """\
apiVersion: crv/v1
name: farm
parameters:
  workers: {type: integer, default: 2, minimum: 1, maximum: 10}
nodes:
  front:  {count: 1, roles: [lb]}
  worker: {count: "{{ workers }}", roles: [web], scale: {min: 1, max: 10}}
roles:
  web:
    recipe: web.sh
    publishes: [url]
    verify: {http: "{{ self.url }}/health"}
  lb:
    recipe: lb.sh
    depends_on: [web]
"""
RECIPES = ("web.sh", "lb.sh", "a.sh", "b.sh", "c.sh")


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (id, appliance.yaml text, extra CLI args, expected stderr line)
CASES: list[tuple[str, str, list[str], str]] = [
    (
        "malformed-yaml",
        "apiVersion: crv/v1\nnodes: [front\n",
        [],
        "error: {F}: invalid YAML: line 3, column 1: while parsing a flow sequence, "
        "expected ',' or ']', but got '<stream end>'",
    ),
    (
        "top-level-list",
        "- a\n- b\n",
        [],
        "error: {F}: expected a mapping (apiVersion, name, nodes, roles, ...)",
    ),
    ("empty-file", "", [], "error: {F}: empty document"),
    (
        "two-documents",
        BASE + "---\nname: other\n",
        [],
        "error: {F}: invalid YAML: line 16, column 1: expected a single document in the stream, "
        "but found another document",
    ),
    (
        "unknown-top-level-key",
        edit("nodes:", "node:"),
        [],
        "error: {F}: node: unknown field (did you mean 'nodes'?)",
    ),
    (
        "unknown-role-key",
        edit("    depends_on: [web]", "    dependson: [web]"),
        [],
        "error: {F}: roles.lb.dependson: unknown field (did you mean 'depends_on'?)",
    ),
    (
        "missing-recipe-field",
        edit("    recipe: lb.sh\n", ""),
        [],
        "error: {F}: roles.lb.recipe: required field is missing",
    ),
    (
        "wrong-api-version",
        edit("crv/v1", "crv/v2"),
        [],
        "error: {F}: apiVersion: Input should be 'crv/v1' (got 'crv/v2')",
    ),
    (
        "unknown-role-in-group",
        edit("roles: [lb]", "roles: [lbb]"),
        [],
        "error: {F}: nodes.front.roles[0]: unknown role 'lbb' (known: web, lb)",
    ),
    (
        "unknown-role-in-depends-on",
        edit("depends_on: [web]", "depends_on: [www]"),
        [],
        "error: {F}: roles.lb.depends_on[0]: unknown role 'www' (known: web, lb)",
    ),
    (
        "direct-cycle",
        edit(
            "    publishes: [url]\n    verify",
            "    publishes: [url]\n    depends_on: [lb]\n    verify",
        ),
        [],
        "error: {F}: roles.web.depends_on: dependency cycle: web -> lb -> web",
    ),
    (
        "self-dependency",
        edit("depends_on: [web]", "depends_on: [lb]"),
        [],
        "error: {F}: roles.lb.depends_on[0]: role lb depends on itself",
    ),
    (
        "three-role-cycle",
        """\
        apiVersion: crv/v1
        name: loop
        nodes:
          all: {count: 1, roles: [a, b, c]}
        roles:
          a: {recipe: a.sh, depends_on: [b]}
          b: {recipe: b.sh, depends_on: [{role: c, local: true}]}
          c: {recipe: c.sh, depends_on: [a]}
        """,
        [],
        "error: {F}: roles.a.depends_on: dependency cycle: a -> b -> c -> a",
    ),
    (
        "local-dependency-across-groups",
        """\
        apiVersion: crv/v1
        name: mon
        nodes:
          head: {count: 1, roles: [a]}
          compute: {count: 2, roles: [b]}
        roles:
          a: {recipe: a.sh}
          b: {recipe: b.sh, depends_on: [{role: a, local: true}]}
        """,
        [],
        "error: {F}: roles.b.depends_on[0]: local dependency on a, but node group compute "
        "hosts b without a",
    ),
    (
        "count-above-scale-max",
        edit('count: "{{ workers }}"', "count: 11"),
        [],
        "error: {F}: nodes.worker.count: 11 is above scale.max 10",
    ),
    (
        "count-below-scale-min",
        edit("scale: {min: 1, max: 10}", "scale: {min: 3, max: 10}"),
        [],
        "error: {F}: nodes.worker.count: 2 (from {{ workers }}) is below scale.min 3",
    ),
    (
        "scale-min-above-max",
        edit("scale: {min: 1, max: 10}", "scale: {min: 5, max: 4}"),
        [],
        "error: {F}: nodes.worker.scale.min: 5 is above max 4",
    ),
    (
        "count-template-renders-negative",
        edit("count: 1,", 'count: "{{ 1 - workers }}",'),
        [],
        "error: {F}: nodes.front.count: -1 (from {{ 1 - workers }}) is negative",
    ),
    (
        "negative-count",
        edit("count: 1,", "count: -1,"),
        [],
        "error: {F}: nodes.front.count: -1 is negative",
    ),
    (
        "quoted-count",
        edit("count: 1,", 'count: "1",'),
        [],
        "error: {F}: nodes.front.count: '1' is a string: write a number without quotes, "
        'or a template such as "{{ workers }}"',
    ),
    (
        "boolean-count",
        edit("count: 1,", "count: true,"),
        [],
        'error: {F}: nodes.front.count: must be a whole number or a template such as "{{ workers }}"',
    ),
    (
        "count-template-unknown-parameter",
        edit("{{ workers }}", "{{ wrkers }}"),
        [],
        "error: {F}: nodes.worker.count: template '{{ wrkers }}' failed: 'wrkers' is undefined",
    ),
    (
        "count-template-huge-power",
        edit("{{ workers }}", "{{ 10 ** 100000 }}"),
        [],
        "error: {F}: nodes.worker.count: template '{{ 10 ** 100000 }}' failed: exponent above 64",
    ),
    (
        "count-template-statement",
        edit('"{{ workers }}"', '"{% for i in range(9) %}{{ i }}{% endfor %}"'),
        [],
        "error: {F}: nodes.worker.count: templates may only use {{ expressions }}, "
        "not {% statements %}",
    ),
    (
        "recipe-dotdot",
        edit("recipe: lb.sh", "recipe: ../lb.sh"),
        [],
        "error: {F}: roles.lb.recipe: '../lb.sh' leaves the appliance directory ('..')",
    ),
    (
        "recipe-absolute",
        edit("recipe: lb.sh", "recipe: /etc/passwd"),
        [],
        "error: {F}: roles.lb.recipe: '/etc/passwd' must be relative to the appliance directory",
    ),
    (
        "recipe-missing",
        edit("recipe: lb.sh", "recipe: roles/lb.sh"),
        [],
        "error: {F}: roles.lb.recipe: no such file 'roles/lb.sh' in {D}",
    ),
    (
        "parameter-default-wrong-type",
        edit("default: 2,", "default: two,"),
        [],
        "error: {F}: parameters.workers.default: 'two' is not of type integer",
    ),
    (
        "parameter-default-quoted-number",
        edit("default: 2,", 'default: "2",'),
        [],
        "error: {F}: parameters.workers.default: '2' is not of type integer",
    ),
    (
        "parameter-default-out-of-bounds",
        edit("default: 2,", "default: 20,"),
        [],
        "error: {F}: parameters.workers.default: 20 is above the maximum 10",
    ),
    (
        "parameter-minimum-above-maximum",
        edit("minimum: 1, maximum: 10", "minimum: 10, maximum: 1"),
        [],
        "error: {F}: parameters.workers.minimum: 10 is above maximum 1",
    ),
    (
        "parameter-nan",
        edit(
            "parameters:\n",
            "parameters:\n  ratio: {type: number, default: .nan}\n",
        ),
        [],
        "error: {F}: parameters.ratio.default: nan is not a finite number",
    ),
    (
        "parameter-inf",
        edit(
            "parameters:\n",
            "parameters:\n  ratio: {type: number, default: .inf}\n",
        ),
        [],
        "error: {F}: parameters.ratio.default: inf is not a finite number",
    ),
    (
        "parameter-negative-inf",
        edit(
            "parameters:\n",
            "parameters:\n  ratio: {type: number, default: -.inf}\n",
        ),
        [],
        "error: {F}: parameters.ratio.default: -inf is not a finite number",
    ),
    (
        "parameter-enum-inf",
        edit(
            "parameters:\n",
            "parameters:\n  ratio: {type: number, default: 1.5, enum: [1.5, .Inf]}\n",
        ),
        [],
        "error: {F}: parameters.ratio.enum[1]: inf is not a finite number",
    ),
    (
        # a bound is int | float: the error names the field, not a union arm ("maximum.int")
        "parameter-maximum-inf",
        edit("minimum: 1, maximum: 10", "minimum: 1, maximum: .inf"),
        [],
        "error: {F}: parameters.workers.maximum: inf is not a finite number",
    ),
    (
        "parameter-minimum-negative-inf",
        edit("minimum: 1, maximum: 10", "minimum: -.inf, maximum: 10"),
        [],
        "error: {F}: parameters.workers.minimum: -inf is not a finite number",
    ),
    (
        "parameter-maximum-not-a-number",
        edit("minimum: 1, maximum: 10", "minimum: 1, maximum: true"),
        [],
        "error: {F}: parameters.workers.maximum: True is not a number",
    ),
    (
        "scaling-target-inf",
        edit(
            "scale: {min: 1, max: 10}}",
            "scale: {min: 1, max: 10},\n"
            "           scaling: {metric: {http: 'http://m/q'}, policy: {target_per_node: .inf}}}",
        ),
        [],
        "error: {F}: nodes.worker.scaling.policy.target_per_node: Input should be a finite number "
        "(got inf)",
    ),
    (
        "scaling-threshold-negative-inf",
        edit(
            "scale: {min: 1, max: 10}}",
            "scale: {min: 1, max: 10},\n"
            "           scaling: {metric: {http: 'http://m/q'},\n"
            "                     policy: {scale_up_above: 10, scale_down_below: -.inf}}}",
        ),
        [],
        "error: {F}: nodes.worker.scaling.policy.scale_down_below: Input should be a finite "
        "number (got -inf)",
    ),
    (
        "scaling-stale-after-inf",
        edit(
            "scale: {min: 1, max: 10}}",
            "scale: {min: 1, max: 10},\n"
            "           scaling: {metric: {http: 'http://m/q', stale_after: .inf},\n"
            "                     policy: {target_per_node: 5}}}",
        ),
        [],
        "error: {F}: nodes.worker.scaling.metric.stale_after: inf is not between 0 and 7 days",
    ),
    (
        "scaling-cooldown-negative-inf",
        edit(
            "scale: {min: 1, max: 10}}",
            "scale: {min: 1, max: 10},\n"
            "           scaling: {metric: {http: 'http://m/q'}, policy: {target_per_node: 5},\n"
            "                     cooldown: -.inf}}",
        ),
        [],
        "error: {F}: nodes.worker.scaling.cooldown: -inf is not between 0 and 7 days",
    ),
    (
        "set-inf",
        edit("parameters:\n", "parameters:\n  ratio: {type: number, default: 1.5}\n"),
        ["--set", "ratio=inf"],
        "error: --set: ratio: 'inf' is not a finite number",
    ),
    (
        "set-negative-infinity",
        edit("parameters:\n", "parameters:\n  ratio: {type: number, default: 1.5}\n"),
        ["--set", "ratio=-Infinity"],
        "error: --set: ratio: '-Infinity' is not a finite number",
    ),
    (
        "set-overflows-to-inf",
        edit("parameters:\n", "parameters:\n  ratio: {type: number, default: 1.5}\n"),
        ["--set", "ratio=1e999"],
        "error: --set: ratio: '1e999' is not a finite number",
    ),
    (
        "parameter-no-default-not-set",
        edit("default: 2, ", ""),
        [],
        "error: {F}: parameters.workers: has no default: give it with --set workers=VALUE",
    ),
    (
        "set-not-an-integer",
        BASE,
        ["--set", "workers=abc"],
        "error: --set: workers: 'abc' is not an integer",
    ),
    (
        "set-above-maximum",
        BASE,
        ["--set", "workers=11"],
        "error: --set: workers: 11 is above the maximum 10",
    ),
    (
        "set-unknown-parameter",
        BASE,
        ["--set", "wrokers=3"],
        "error: --set: wrokers: unknown parameter (this appliance has: workers)",
    ),
    ("set-without-equals", BASE, ["--set", "workers"], "error: --set: workers: expected KEY=VALUE"),
    (
        "uppercase-role-name",
        edit("  lb:\n", "  Lb:\n").replace("[lb]", "[Lb]"),
        [],
        "error: {F}: nodes.front.roles[0]: 'Lb' is not a valid name: use 1-63 lowercase letters, digits and "
        "'-', starting with a letter and not ending with '-' (and 1 more problems)",
    ),
    (
        "shell-metacharacters-in-group-name",
        edit("  front:", '  "front;rm -rf $(pwd)":'),
        [],
        "error: {F}: nodes.front;rm -rf $(pwd): 'front;rm -rf $(pwd)' is not a valid name: use "
        "1-63 lowercase letters, digits and '-', starting with a letter and not ending with '-'",
    ),
    (
        "template-syntax-in-name",
        edit("name: farm", 'name: "{{ evil }}"'),
        [],
        "error: {F}: name: '{{ evil }}' is not a valid name: use 1-63 lowercase letters, digits "
        "and '-', starting with a letter and not ending with '-'",
    ),
    (
        "homoglyph-in-name",
        edit("name: farm", "name: f\u0430rm"),  # Cyrillic a
        [],
        "error: {F}: name: 'f\u0430rm' is not a valid name: use 1-63 lowercase letters, digits "
        "and '-', starting with a letter and not ending with '-'",
    ),
    (
        "name-longer-than-dns-label",
        edit("name: farm", "name: " + "a" * 64),
        [],
        f"error: {{F}}: name: '{'a' * 64}' is not a valid name: use 1-63 lowercase letters, "
        "digits and '-', starting with a letter and not ending with '-'",
    ),
    (
        "duplicate-key",
        edit("  lb:\n", "  web:\n    recipe: web.sh\n  lb:\n"),
        [],
        "error: {F}: invalid YAML: line 13, column 3: duplicate key 'web'",
    ),
    (
        "group-without-roles",
        edit("roles: [lb]", "roles: []"),
        [],
        "error: {F}: nodes.front.roles: List should have at least 1 item after validation, not 0",
    ),
    (
        "role-listed-twice-in-group",
        edit("roles: [lb]", "roles: [lb, lb]"),
        [],
        "error: {F}: nodes.front.roles[1]: role 'lb' is listed twice",
    ),
    (
        "isolated-role",
        BASE + "  spare:\n    recipe: a.sh\n",
        [],
        "error: {F}: roles.spare: role 'spare' is not placed on any node group",
    ),
    (
        "min-ready-above-providers",
        edit("depends_on: [web]", "depends_on: [{role: web, min_ready: 5}]"),
        [],
        "error: {F}: roles.lb.depends_on[0]: needs 5 node(s) hosting web, the appliance has 2",
    ),
    (
        "verify-unpublished-attribute",
        edit("{{ self.url }}/health", "http://{{ self.host }}:{{ self.port }}/"),
        [],
        "error: {F}: roles.web.verify.http: self.host is not in the role's publishes",
    ),
    (
        "verify-two-kinds",
        edit('verify: {http: "{{ self.url }}/health"}', 'verify: {http: "x", tcp: "y:1"}'),
        [],
        "error: {F}: roles.web.verify: give exactly one of http, tcp, command or on_node",
    ),
    (
        "too-many-nodes",
        """\
        apiVersion: crv/v1
        name: huge
        nodes:
          a: {count: 15000, roles: [x]}
          b: {count: 15000, roles: [x]}
        roles:
          x: {recipe: a.sh}
        """,
        [],
        "error: {F}: nodes: 30000 nodes in all; a cluster has at most 20000",
    ),
    (
        "zero-count-without-scale",
        edit("count: 1,", "count: 0,"),
        [],
        "error: {F}: nodes.front.count: 0 leaves the group empty; allow that with scale: {min: 0}",
    ),
    (
        "a-million-nodes-in-scale",
        edit("scale: {min: 1, max: 10}", "scale: {min: 1, max: 1000000}"),
        [],
        "error: {F}: nodes.worker.scale.max: Input should be less than or equal to 20000 (got 1000000)",
    ),
    (
        "a-million-nodes",
        edit("count: 1,", "count: 1000000,"),
        [],
        "error: {F}: nodes.front.count: 1000000 is above 20000",
    ),
    (
        "cluster-name-invalid",
        BASE,
        ["--name", "My_Cluster"],
        "error: --name: My_Cluster: not a valid cluster name: use 1-63 lowercase letters, digits "
        "and '-', starting with a letter and not ending with '-'",
    ),
    (
        "node-names-too-long",
        BASE,
        ["--name", "c" * 55],
        f"error: {{F}}: nodes.worker: node names such as '{'c' * 55}-worker-9' are 64 characters"
        "; DNS labels allow 63: shorten the cluster or group name, or lower scale.max",
    ),
    (
        "pool-and-pools",
        edit("max: 10}}", "max: 10}, pool: vm, pools: [rack, vm]}"),
        [],
        "error: {F}: nodes.worker.pools: give either pool or pools, not both",
    ),
    (
        "pools-listed-twice",
        edit("max: 10}}", "max: 10}, pools: [rack, vm, rack]}"),
        [],
        "error: {F}: nodes.worker.pools[2]: pool 'rack' is listed twice",
    ),
    (
        "pools-empty",
        edit("max: 10}}", "max: 10}, pools: []}"),
        [],
        "error: {F}: nodes.worker.pools: List should have at least 1 item after validation, not 0",
    ),
    (
        "pools-too-many",
        edit("max: 10}}", "max: 10}, pools: [a, b, c, d, e, f, g, h, i]}"),
        [],
        "error: {F}: nodes.worker.pools: List should have at most 8 items after validation, not 9",
    ),
]


@pytest.mark.parametrize(
    ("text", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_appliance_is_refused_with_one_line(
    tmp_path: Path, text: str, args: list[str], expected: str
) -> None:
    directory = write_appliance(tmp_path, "app", textwrap.dedent(text), RECIPES)
    result = crv("validate", str(directory), *args)
    line = expected.replace("{F}", f"{directory}/appliance.yaml").replace("{D}", str(directory))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == line + "\n"


def test_the_same_errors_stop_plan(tmp_path: Path) -> None:
    directory = write_appliance(
        tmp_path,
        "app",
        edit(
            "    publishes: [url]\n    verify",
            "    publishes: [url]\n    depends_on: [lb]\n    verify",
        ),
        RECIPES,
    )
    result = crv("plan", str(directory), "--json")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.endswith("roles.web.depends_on: dependency cycle: web -> lb -> web\n")


def test_enough_cases() -> None:
    assert len(CASES) >= 25


def test_recipe_symlink_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.sh"
    outside.write_text("#!/bin/sh\n")
    directory = write_appliance(tmp_path, "app", BASE, ("web.sh",))
    (directory / "lb.sh").symlink_to(outside)
    result = crv("validate", str(directory))
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {directory}/appliance.yaml: roles.lb.recipe: "
        "'lb.sh' resolves outside the appliance directory\n"
    )


def test_not_an_appliance_directory(tmp_path: Path) -> None:
    assert (
        crv("validate", str(tmp_path / "nope")).stderr
        == f"error: {tmp_path}/nope: no such directory\n"
    )
    result = crv("validate", str(tmp_path))
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {tmp_path}: not an appliance directory (no appliance.yaml)\n",
    )


# --- includes ----------------------------------------------------------------------------------

CHILD = """\
apiVersion: crv/v1
name: {name}
parameters:
  replicas: {{type: integer, default: 1, minimum: 0, maximum: 4}}
include: {include}
nodes:
  primary: {{count: 1, roles: [primary]}}
  replica: {{count: "{{{{ replicas }}}}", roles: [replica], scale: {{min: 0, max: 4}}}}
roles:
  primary: {{recipe: a.sh}}
  replica: {{recipe: b.sh, depends_on: [primary]}}
"""


def test_include_cycle_is_spelled_out(tmp_path: Path) -> None:
    write_appliance(tmp_path, "a", CHILD.format(name="a", include="[{appliance: b}]"), RECIPES)
    b = write_appliance(
        tmp_path, "b", CHILD.format(name="b", include="[{appliance: a, prefix: x}]"), RECIPES
    )
    result = crv("validate", str(tmp_path / "a"))
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"error: {b}/appliance.yaml: include[0].appliance: include cycle: a -> b -> a\n"
    )


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    a = write_appliance(
        tmp_path, "a", CHILD.format(name="a", include="[{appliance: a, prefix: x}]"), RECIPES
    )
    assert crv("validate", str(a)).stderr == (
        f"error: {a}/appliance.yaml: include[0].appliance: include cycle: a -> a\n"
    )


def test_include_of_unknown_appliance(tmp_path: Path) -> None:
    a = write_appliance(
        tmp_path, "a", CHILD.format(name="a", include="[{appliance: nothere}]"), RECIPES
    )
    result = crv("validate", str(a))
    assert result.stderr.startswith(
        f"error: {a}/appliance.yaml: include[0].appliance: no appliance 'nothere' next to {a}"
    )


def test_include_parameter_the_child_does_not_have(tmp_path: Path) -> None:
    write_appliance(tmp_path, "db", CHILD.format(name="db", include="[]"), RECIPES)
    a = write_appliance(
        tmp_path,
        "a",
        edit("nodes:", "include: [{appliance: db, prefix: db, parameters: {replicaz: 2}}]\nnodes:"),
        RECIPES,
    )
    assert crv("validate", str(a)).stderr == (
        f"error: {a}/appliance.yaml: include[0].parameters.replicaz: db has no parameter 'replicaz'\n"
    )


def test_include_name_clash(tmp_path: Path) -> None:
    write_appliance(tmp_path, "db", CHILD.format(name="db", include="[]"), RECIPES)
    a = write_appliance(
        tmp_path,
        "a",
        edit(
            "nodes:\n",
            "include: [{appliance: db, prefix: db}]\nnodes:\n  db-primary: {count: 1, roles: [web]}\n",
        ),
        RECIPES,
    )
    assert crv("validate", str(a)).stderr == (
        f"error: {a}/appliance.yaml: nodes.db-primary: node group 'db-primary' is also defined "
        "by include[0]\n"
    )


def test_error_inside_included_appliance_names_its_file(tmp_path: Path) -> None:
    child = write_appliance(
        tmp_path, "db", CHILD.format(name="db", include="[]").replace("b.sh", "missing.sh"), RECIPES
    )
    a = write_appliance(
        tmp_path, "a", edit("nodes:", "include: [{appliance: db, prefix: db}]\nnodes:"), RECIPES
    )
    assert crv("validate", str(a)).stderr == (
        f"error: {child}/appliance.yaml: roles.replica.recipe: no such file 'missing.sh' in {child}\n"
    )


def test_set_error_for_included_parameter_names_the_full_key(tmp_path: Path) -> None:
    write_appliance(tmp_path, "db", CHILD.format(name="db", include="[]"), RECIPES)
    a = write_appliance(
        tmp_path, "a", edit("nodes:", "include: [{appliance: db, prefix: db}]\nnodes:"), RECIPES
    )
    assert crv("validate", str(a), "--set", "db-replicas=9").stderr == (
        "error: --set: db-replicas: 9 is above the maximum 4\n"
    )


# --- hostile documents -------------------------------------------------------------------------


def _write_raw(tmp_path: Path, data: bytes) -> Path:
    directory = tmp_path / "hostile"
    directory.mkdir()
    (directory / "appliance.yaml").write_bytes(data)
    return directory


BOMB = b"""\
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

HOSTILE = [
    ("anchor-bomb", BOMB, "document expands to more than 100000 nodes (alias bomb?)"),
    (
        "deep-nesting",
        b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        "document is nested deeper than 64 levels",
    ),
    (
        "moderately-deep",
        b"a: " + b"[" * 100 + b"]" * 100 + b"\n",
        "document is nested deeper than 64 levels",
    ),
    (
        "binary",
        b"\x7fELF\x02\x01\x01\x00\x00\x00",
        "binary file (contains NUL bytes), expected YAML text",
    ),
    ("not-utf8", b"name: caf\xe9\n", "not UTF-8 text (byte 9)"),
    ("huge", b"# " + b"x" * (1 << 20) + b"\n", "file is larger than 1048576 bytes"),
    ("recursive-alias", b"a: &a [*a]\n", None),
    ("python-object-tag", b"a: !!python/object/apply:os.system ['true']\n", None),
]


@pytest.mark.parametrize(("data", "message"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_documents_are_refused_quickly(
    tmp_path: Path, data: bytes, message: str | None
) -> None:
    directory = _write_raw(tmp_path, data)
    result = crv("validate", str(directory))
    assert result.exit_code == 2
    prefix = f"error: {directory}/appliance.yaml: "
    assert result.stderr.startswith(prefix)
    assert result.stderr.count("\n") == 1
    if message is not None:
        assert result.stderr == prefix + message + "\n"
    else:
        assert re.match(re.escape(prefix) + r"invalid YAML: ", result.stderr)
