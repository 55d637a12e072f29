"""Loading an appliance directory into a resolved, checked `Appliance`.

Resolution happens scope by scope: an appliance resolves its own parameters (defaults,
`include` bindings, `--set` overrides), renders its counts, resolves its includes recursively
(each included appliance is checked on its own first, then its groups, roles and parameters
are renamed `<prefix>-<name>`), and finally checks the rules that span the merged scope. Every
refusal is a `SpecError` naming the file the user must edit and the field inside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import networkx as nx
from pydantic import ValidationError

from crv.appliance import spec, templating
from crv.appliance.parameters import Binding, resolve_parameters, template_variables
from crv.appliance.spec import CONTROL_RE, MAX_NODES, ParamValue
from crv.appliance.yamldoc import load_yaml_file
from crv.base.errors import SpecError

APPLIANCE_FILE = "appliance.yaml"
MAX_RECIPE_BYTES = 1 << 20
MAX_INCLUDE_DEPTH = 8
VERIFY_VARIABLES = ("self", "node", "params")
_BUILTIN_CATALOG = Path(__file__).resolve().parents[2] / "appliances"


@dataclass(frozen=True)
class Dependency:
    role: str
    local: bool = False
    min_ready: int | None = None


@dataclass(frozen=True)
class Role:
    name: str
    source: str  # the appliance.yaml that defines it (errors point there)
    field: str  # its path inside that file, `roles.<name as written>`
    directory: Path  # its own appliance's directory (resolved): what the node receives
    recipe: Path
    drain: Path | None  # run on a node before a shrink removes it
    depends_on: tuple[Dependency, ...]
    publishes: tuple[str, ...]
    verify: spec.Verify | None
    estimates: Mapping[str, float]  # only the kinds the role overrides
    params: Mapping[str, ParamValue]  # its own appliance's parameters, unprefixed
    # after the node's certificate is renewed: RERUN (the recipe again), a recipe, or nothing
    renew: Path | str | None = None
    # what the includes put before its name (`db-` for mysql-ha's roles in webshop): its recipes
    # name their own appliance's roles without it, and the agent adds it (CRV_ROLE_PREFIX)
    prefix: str = ""


RERUN = "rerun"


@dataclass(frozen=True)
class Group:
    name: str
    source: str
    field: str
    count: int
    roles: tuple[str, ...]
    scale_min: int
    scale_max: int
    scalable: bool = False  # it has a `scale` section: a resize may change its count
    pool: str | None = None  # the pool its nodes go to; None: the deploy's default pool
    scaling: spec.Scaling | None = None  # how the autoscale flow sizes it
    # its pools in order of preference (`pools:`); `pool` is then the first. Empty: just `pool`
    pools: tuple[str, ...] = ()


@dataclass(frozen=True)
class Appliance:
    name: str
    description: str
    directory: Path
    source: str
    parameters: Mapping[str, ParamValue]  # resolved values, included ones as `<prefix>-<name>`
    parameter_specs: Mapping[str, spec.Parameter]
    groups: Mapping[str, Group]  # in document order, own groups first
    roles: Mapping[str, Role]
    on_failure: str = "keep"  # the top appliance's; an included one's is not used
    max_unhealthy: int | str = "40%"  # the top appliance's too (crv.engine.converge.brake)
    approval: spec.Approval | None = None  # the top appliance's gate (flows.approval)
    packages: tuple[str, ...] = ()  # image.packages, its included appliances' too, sorted

    @property
    def node_count(self) -> int:
        return sum(g.count for g in self.groups.values())

    def hosts(self, role: str) -> list[Group]:
        return [g for g in self.groups.values() if role in g.roles]

    @property
    def scaled(self) -> list[Group]:
        """The node groups that have a `scaling` section: the ones the autoscale flow sizes."""
        return [g for g in self.groups.values() if g.scaling is not None]


NOT_SCALED = "no node group has a scaling section"


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings from the command line; the last one of a key wins."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError("--set", item, "expected KEY=VALUE")
        out[key.strip()] = value
    return out


def default_search_path() -> list[Path]:
    env = os.environ.get("CRV_APPLIANCE_PATH", "")
    return [Path(p) for p in env.split(os.pathsep) if p] + [_BUILTIN_CATALOG]


def locate(ref: str | Path) -> Path:
    """An appliance directory, or the name of one on the search path (`webfarm`); what the
    Prefect run form and `crv deploy` accept. An unknown name is left for the loader to report."""
    path = Path(ref)
    if path.exists() or len(path.parts) != 1:
        return path
    for base in default_search_path():
        if (base / path / APPLIANCE_FILE).is_file():
            return base / path
    return path


def load_appliance(
    directory: str | Path,
    overrides: Mapping[str, str] | None = None,
    *,
    search_path: Sequence[Path] | None = None,
) -> Appliance:
    """Load, resolve and check an appliance; `overrides` are `--set` values as text."""
    overrides = dict(overrides or {})
    if search_path is None:
        search_path = default_search_path()
    resolver = _Resolver(list(search_path))
    appliance, used = resolver.resolve(Path(directory), Binding(), overrides, ())
    unknown = sorted(set(overrides) - used)
    if unknown:
        known = ", ".join(appliance.parameter_specs) or "none"
        raise SpecError("--set", unknown[0], f"unknown parameter (this appliance has: {known})")
    if appliance.node_count > MAX_NODES:
        raise SpecError(
            appliance.source,
            "nodes",
            f"{appliance.node_count} nodes in all; a cluster has at most {MAX_NODES}",
        )
    return appliance


# --- the resolver ------------------------------------------------------------------------------


class _Resolver:
    def __init__(self, search_path: list[Path]) -> None:
        self.search_path = search_path

    def find_included(self, name: str, including_dir: Path) -> Path | None:
        for base in [including_dir.parent, *self.search_path]:
            candidate = base / name
            if (candidate / APPLIANCE_FILE).is_file():
                return candidate
        return None

    def resolve(
        self,
        directory: Path,
        binding: Binding,
        overrides: Mapping[str, str],
        stack: tuple[tuple[Path, str], ...],
    ) -> tuple[Appliance, set[str]]:
        """Resolve one scope; returns it and the override keys it consumed."""
        source = str(directory / APPLIANCE_FILE)
        if not directory.is_dir():
            what = "not a directory" if directory.exists() else "no such directory"
            raise SpecError(str(directory), "", what)
        if not (directory / APPLIANCE_FILE).is_file():
            raise SpecError(str(directory), "", f"not an appliance directory (no {APPLIANCE_FILE})")
        raw = load_yaml_file(directory / APPLIANCE_FILE, shown_as=source)
        if not isinstance(raw, dict):
            raise SpecError(source, "", "expected a mapping (apiVersion, name, nodes, roles, ...)")
        try:
            s = spec.ApplianceSpec.model_validate(raw)
        except ValidationError as exc:
            raise spec.validation_error(source, exc) from None
        stack = (*stack, (directory.resolve(), s.name))

        params = resolve_parameters(source, s, binding, overrides)
        used = {k for k in s.parameters if k in overrides}
        scope = _Scope(source, s.name, dict(s.parameters), params)

        for i, inc in enumerate(s.include):
            used |= self._include(scope, directory, i, inc, binding, overrides, stack)

        for name, g in s.nodes.items():
            scope.add_group(name, self._group(source, name, g, params))
        for name, r in s.roles.items():
            scope.add_role(name, self._role(source, directory, name, r, params))
        scope.check(s)
        return (
            Appliance(
                name=s.name,
                description=s.description,
                directory=directory,
                source=source,
                parameters=scope.param_values,
                parameter_specs=scope.param_specs,
                groups=scope.groups,
                roles=scope.roles,
                on_failure=s.on_failure,
                max_unhealthy=s.max_unhealthy,
                approval=s.approval,
                packages=tuple(sorted(scope.packages | set(s.image.packages))),
            ),
            used,
        )

    def _include(
        self,
        scope: _Scope,
        directory: Path,
        i: int,
        inc: spec.Include,
        binding: Binding,
        overrides: Mapping[str, str],
        stack: tuple[tuple[Path, str], ...],
    ) -> set[str]:
        at = f"include[{i}]"
        found = self.find_included(inc.appliance, directory)
        if found is None:
            raise SpecError(
                scope.source,
                f"{at}.appliance",
                f"no appliance {inc.appliance!r} next to {directory} or in CRV_APPLIANCE_PATH",
            )
        names = [n for _, n in stack]
        if found.resolve() in {p for p, _ in stack}:
            cycle = " -> ".join([*names, inc.appliance])
            raise SpecError(scope.source, f"{at}.appliance", f"include cycle: {cycle}")
        if len(stack) > MAX_INCLUDE_DEPTH:
            raise SpecError(scope.source, at, f"includes nest deeper than {MAX_INCLUDE_DEPTH}")
        bound: dict[str, ParamValue] = {}
        for key, value in inc.parameters.items():
            if isinstance(value, str) and "{{" in value:
                try:
                    value = templating.render(value, template_variables(scope.own_params))
                except ValueError as exc:
                    raise SpecError(scope.source, f"{at}.parameters.{key}", str(exc)) from None
            bound[key] = value
        pre = f"{inc.prefix}-" if inc.prefix else ""
        child_overrides = {k[len(pre) :]: v for k, v in overrides.items() if k.startswith(pre)}
        child, child_used = self.resolve(
            found,
            Binding(bound, scope.source, at, binding.namespace + pre),
            child_overrides,
            stack,
        )
        scope.merge(child, pre, at)
        scope.packages |= set(child.packages)
        return {pre + k for k in child_used}

    @staticmethod
    def _group(
        source: str, name: str, g: spec.NodeGroup, params: Mapping[str, ParamValue]
    ) -> Group:
        at = f"nodes.{name}"
        count = g.count
        origin = ""
        if isinstance(count, str):
            try:
                text = templating.render(count, template_variables(params)).strip()
            except ValueError as exc:
                raise SpecError(source, f"{at}.count", str(exc)) from None
            if not re.fullmatch(r"-?\d{1,9}", text):
                raise SpecError(
                    source, f"{at}.count", f"{count!r} renders to {text!r}, not a count"
                )
            origin = f" (from {count.strip()})"
            count = int(text)
            if count < 0:
                raise SpecError(source, f"{at}.count", f"{count}{origin} is negative")
        if g.scale is None:
            if count == 0:
                raise SpecError(
                    source,
                    f"{at}.count",
                    f"0{origin} leaves the group empty; allow that with scale: {{min: 0}}",
                )
            if count > MAX_NODES:
                raise SpecError(source, f"{at}.count", f"{count}{origin} is above {MAX_NODES}")
            low, high = count, count
        else:
            low, high = g.scale.min, g.scale.max
            if low > high:
                raise SpecError(source, f"{at}.scale.min", f"{low} is above max {high}")
            if count < low:
                raise SpecError(source, f"{at}.count", f"{count}{origin} is below scale.min {low}")
            if count > high:
                raise SpecError(source, f"{at}.count", f"{count}{origin} is above scale.max {high}")
        for i, role in enumerate(g.roles):
            if role in g.roles[:i]:
                raise SpecError(source, f"{at}.roles[{i}]", f"role {role!r} is listed twice")
        if g.scaling is not None and g.scale is None:
            raise SpecError(
                source, f"{at}.scaling", "autoscaling needs bounds: add scale: {min: N, max: M}"
            )
        if g.pools is not None and g.pool is not None:
            raise SpecError(source, f"{at}.pools", "give either pool or pools, not both")
        pools = tuple(g.pools or ())
        for i, pool in enumerate(pools):
            if pool in pools[:i]:
                raise SpecError(source, f"{at}.pools[{i}]", f"pool {pool!r} is listed twice")
        return Group(
            name,
            source,
            at,
            count,
            tuple(g.roles),
            low,
            high,
            g.scale is not None,
            g.pools[0] if g.pools else g.pool,
            g.scaling,
            pools,
        )

    @staticmethod
    def _role(
        source: str,
        directory: Path,
        name: str,
        r: spec.Role,
        params: Mapping[str, ParamValue],
    ) -> Role:
        at = f"roles.{name}"
        recipe = _recipe_path(directory, r.recipe, source, f"{at}.recipe")
        drain = _recipe_path(directory, r.drain, source, f"{at}.drain") if r.drain else None
        renew: Path | str | None = r.renew
        if r.renew is not None and r.renew != RERUN:
            renew = _recipe_path(directory, r.renew, source, f"{at}.renew")
        if r.verify is not None:
            _check_verify(source, f"{at}.verify.{r.verify.kind}", r.verify.template, r, params)
        seen: set[str] = set()
        for j, dep in enumerate(r.depends_on):
            if dep.role == name:
                raise SpecError(source, f"{at}.depends_on[{j}]", f"role {name} depends on itself")
            if dep.role in seen:
                raise SpecError(source, f"{at}.depends_on[{j}]", f"{dep.role!r} is listed twice")
            seen.add(dep.role)
        estimates = {k: v for k, v in r.estimates.model_dump().items() if v is not None}
        return Role(
            name=name,
            source=source,
            field=at,
            directory=directory.resolve(),
            recipe=recipe,
            drain=drain,
            depends_on=tuple(Dependency(d.role, d.local, d.min_ready) for d in r.depends_on),
            publishes=tuple(r.publishes),
            verify=r.verify,
            estimates=estimates,
            params=dict(params),
            renew=renew,
        )


def _recipe_path(directory: Path, recipe: str, source: str, at: str) -> Path:
    """A recipe is a regular file inside the appliance directory, symlinks resolved."""
    if CONTROL_RE.search(recipe) or "\\" in recipe:
        raise SpecError(source, at, "contains control characters or backslashes")
    rel = PurePosixPath(recipe)
    if rel.is_absolute() or recipe.startswith("~"):
        raise SpecError(source, at, f"{recipe!r} must be relative to the appliance directory")
    if ".." in rel.parts:
        raise SpecError(source, at, f"{recipe!r} leaves the appliance directory ('..')")
    root = directory.resolve()
    full = (directory / rel).resolve()
    if not full.is_relative_to(root):
        raise SpecError(source, at, f"{recipe!r} resolves outside the appliance directory")
    if not full.is_file():
        raise SpecError(source, at, f"no such file {recipe!r} in {directory}")
    if full.stat().st_size > MAX_RECIPE_BYTES:
        raise SpecError(source, at, f"{recipe!r} is larger than {MAX_RECIPE_BYTES} bytes")
    return full


def _check_verify(
    source: str, at: str, template: str, r: spec.Role, params: Mapping[str, ParamValue]
) -> None:
    """Catch typos in checks now rather than when the verify step runs."""
    try:
        tree = templating.parse(template)
    except ValueError as exc:
        raise SpecError(source, at, str(exc)) from None
    unknown = templating.undeclared(tree, VERIFY_VARIABLES)
    if unknown:
        raise SpecError(
            source, at, f"unknown variable {sorted(unknown)[0]!r} (use self, node or params)"
        )
    for attr in sorted(templating.attributes_used(tree, "self") - set(r.publishes)):
        raise SpecError(source, at, f"self.{attr} is not in the role's publishes")
    for attr in sorted(templating.attributes_used(tree, "node") - {"name", "address"}):
        raise SpecError(source, at, f"node.{attr} is unknown (node has name and address)")
    for attr in sorted(templating.attributes_used(tree, "params") - set(params)):
        raise SpecError(source, at, f"params.{attr} is not a parameter of this appliance")


class _Scope:
    """One appliance's merged namespace while it is being resolved."""

    def __init__(
        self,
        source: str,
        name: str,
        own_specs: dict[str, spec.Parameter],
        own_params: dict[str, ParamValue],
    ) -> None:
        self.source = source
        self.name = name
        self.own_params = own_params
        self.param_specs: dict[str, spec.Parameter] = dict(own_specs)
        self.param_values: dict[str, ParamValue] = dict(own_params)
        self.groups: dict[str, Group] = {}
        self.roles: dict[str, Role] = {}
        self.packages: set[str] = set()
        self.own_roles: list[str] = []
        self.origin: dict[tuple[str, str], str] = {  # (kind, name) -> where it was defined
            ("parameter", own): f"parameters.{own}" for own in own_params
        }

    def _claim(self, kind: str, name: str, at: str) -> None:
        owner = self.origin.get((kind, name))
        if owner is not None:
            raise SpecError(self.source, at, f"{kind} {name!r} is also defined by {owner}")
        self.origin[(kind, name)] = at

    def merge(self, child: Appliance, pre: str, at: str) -> None:
        def rename(name: str) -> str:
            return pre + name

        for name, p in child.parameter_specs.items():
            self._claim("parameter", rename(name), at)
            self.param_specs[rename(name)] = p
            self.param_values[rename(name)] = child.parameters[name]
        for g in child.groups.values():
            self._claim("node group", rename(g.name), at)
            scaling = g.scaling
            if scaling is not None and scaling.queue is not None:  # its role is renamed too
                queue = scaling.queue.model_copy(update={"role": rename(scaling.queue.role)})
                scaling = scaling.model_copy(update={"queue": queue})
            attribute = scaling.metric.attribute if scaling and scaling.metric else None
            if scaling is not None and scaling.metric is not None and attribute is not None:
                renamed = attribute.model_copy(update={"role": rename(attribute.role)})
                metric = scaling.metric.model_copy(update={"attribute": renamed})
                scaling = scaling.model_copy(update={"metric": metric})
            self.groups[rename(g.name)] = replace(
                g, name=rename(g.name), roles=tuple(map(rename, g.roles)), scaling=scaling
            )
        for r in child.roles.values():
            self._claim("role", rename(r.name), at)
            deps = tuple(replace(d, role=rename(d.role)) for d in r.depends_on)
            self.roles[rename(r.name)] = replace(
                r, name=rename(r.name), depends_on=deps, prefix=pre + r.prefix
            )

    def add_group(self, name: str, group: Group) -> None:
        self._claim("node group", name, f"nodes.{name}")
        self.groups[name] = group

    def add_role(self, name: str, role: Role) -> None:
        self._claim("role", name, f"roles.{name}")
        self.roles[name] = role
        self.own_roles.append(name)

    def check(self, s: spec.ApplianceSpec) -> None:
        """Rules over the merged scope: references, placement, providers, cycles."""
        src = self.source
        known = ", ".join(self.roles) or "none"
        for gname in s.nodes:
            for i, placed in enumerate(self.groups[gname].roles):
                if placed not in self.roles:
                    raise SpecError(
                        src,
                        f"nodes.{gname}.roles[{i}]",
                        f"unknown role {placed!r} (known: {known})",
                    )
        if not self.groups:
            raise SpecError(src, "nodes", "the appliance has no node groups")
        for gname in s.nodes:
            scaling = self.groups[gname].scaling
            measured = scaling.measured() if scaling else None
            if scaling is None or measured is None:
                continue
            at = f"nodes.{gname}.scaling." + ("queue" if scaling.queue else "metric.attribute")
            reader, keys = measured
            if reader not in self.roles:
                raise SpecError(src, f"{at}.role", f"unknown role {reader!r} (known: {known})")
            missing = [k for k in keys if k not in self.roles[reader].publishes]
            if missing:
                raise SpecError(
                    src,
                    at if scaling.queue else f"{at}.key",
                    f"role {reader} does not publish {', '.join(map(repr, missing))} (add "
                    f"{'them' if len(missing) > 1 else 'it'} to its publishes)",
                )
        for rname in self.own_roles:
            role = self.roles[rname]
            hosting = [g for g in self.groups.values() if rname in g.roles]
            if not hosting:
                raise SpecError(src, role.field, f"role {rname!r} is not placed on any node group")
            consumers = sum(g.count for g in hosting)
            for j, dep in enumerate(role.depends_on):
                at = f"{role.field}.depends_on[{j}]"
                if dep.role not in self.roles:
                    raise SpecError(src, at, f"unknown role {dep.role!r} (known: {known})")
                if dep.local:
                    for g in hosting:
                        if dep.role not in g.roles:
                            raise SpecError(
                                src,
                                at,
                                f"local dependency on {dep.role}, but node group {g.name} "
                                f"hosts {rname} without {dep.role}",
                            )
                    continue
                providers = sum(g.count for g in self.groups.values() if dep.role in g.roles)
                needed = dep.min_ready or 1
                if consumers and providers < needed:
                    raise SpecError(
                        src,
                        at,
                        f"needs {needed} node(s) hosting {dep.role}, the appliance has {providers}",
                    )
        self._check_cycles()

    def _check_cycles(self) -> None:
        graph: nx.DiGraph[str] = nx.DiGraph()
        for role in self.roles.values():
            graph.add_node(role.name)
            graph.add_edges_from((role.name, d.role) for d in role.depends_on)
        try:
            edges = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            return
        names = [u for u, _ in edges] + [edges[-1][1]]
        first = self.roles[names[0]]
        raise SpecError(
            first.source, f"{first.field}.depends_on", f"dependency cycle: {' -> '.join(names)}"
        )


def with_counts(appliance: Appliance, counts: Mapping[str, int]) -> Appliance:
    """The appliance with some groups resized (`crv scale`, the scale-role flow, a resized
    cluster deployed again); each count must lie within the group's `scale` bounds."""
    if not counts:
        return appliance
    groups = dict(appliance.groups)
    for name, count in counts.items():
        group = groups.get(name)
        if group is None:
            known = ", ".join(groups) or "none"
            raise SpecError("count", name, f"unknown node group (this appliance has: {known})")
        if not group.scalable and count != group.count:
            raise SpecError(
                group.source,
                f"{group.field}.scale",
                f"the group has no scale section: its count ({group.count}) is fixed",
            )
        if count < group.scale_min:
            raise SpecError(
                group.source,
                f"{group.field}.scale.min",
                f"{count} is below scale.min {group.scale_min}",
            )
        if count > group.scale_max:
            raise SpecError(
                group.source,
                f"{group.field}.scale.max",
                f"{count} is above scale.max {group.scale_max}",
            )
        groups[name] = replace(group, count=count)
    resized = replace(appliance, groups=groups)
    if resized.node_count > MAX_NODES:
        raise SpecError(
            appliance.source, "nodes", f"{resized.node_count} nodes in all; at most {MAX_NODES}"
        )
    return resized


def load_recorded(
    source: str, parameters: Mapping[str, ParamValue], counts: Mapping[str, int]
) -> Appliance:
    """A deployed cluster's appliance again, from what the service recorded: its source, its
    resolved parameters (given back as `--set` text) and the counts a resize chose."""
    overrides = {
        k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in parameters.items()
    }
    return with_counts(load_appliance(source, overrides), counts)
