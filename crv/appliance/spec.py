"""The appliance format (`appliance.yaml`, apiVersion crv/v1) as pydantic models.

These models check structure and types only, strictly (unknown keys and type confusion are
errors; no silent coercion of "3" into 3). Rules that span fields or files (roles that exist,
local dependencies, bounds after parameters are applied, recipe paths) live in
`crv.appliance`, where the error can name the exact field. The JSON Schema for editors is
generated from these models (`crv schema`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from crv.base.errors import SpecError, brief

API_VERSION = "crv/v1"
MAX_NODES = 20_000  # per cluster; refused before any expansion
NAME_PATTERN = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_RULE = (
    "use 1-63 lowercase letters, digits and '-', starting with a letter and not ending with '-'"
)
ATTRIBUTE_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
STEP_KINDS = ("provision", "certify", "contextualize", "verify")

# C0 and C1 control characters: refused in any value that reaches a shell, a file or a cert
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAME_RE = re.compile(NAME_PATTERN)
_ATTRIBUTE_RE = re.compile(ATTRIBUTE_PATTERN)


def _check_name(value: str) -> str:
    # Names become host names, certificate subjects, environment variables and shell words.
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name: {NAME_RULE}")
    return value


def _check_attribute(value: str) -> str:
    # Attributes are read in templates as `self.<name>`, so they must be identifiers.
    if not _ATTRIBUTE_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid attribute name: use lowercase letters, digits and '_', "
            "starting with a letter"
        )
    return value


Name = Annotated[
    str,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": NAME_PATTERN, "maxLength": 63}),
]
AttributeName = Annotated[
    str,
    AfterValidator(_check_attribute),
    WithJsonSchema({"type": "string", "pattern": ATTRIBUTE_PATTERN}),
]
Text = Annotated[str, Field(max_length=4096)]


def _check_param_value(value: object) -> int | float | bool | str:
    # One validator instead of a pydantic union, so an error names the field, not union arms.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    if not isinstance(value, int | float | bool | str):
        raise ValueError(f"{value!r} is not a number, boolean or string")
    return value


ParamLiteral = Annotated[
    int | float | bool | str,
    PlainValidator(_check_param_value),
    WithJsonSchema({"type": ["integer", "number", "boolean", "string"]}),
]
Seconds = Annotated[float, Field(ge=0, le=86_400)]
ParamValue = int | float | bool | str


def _check_count(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('must be a whole number or a template such as "{{ workers }}"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if "{{" not in value:
        raise ValueError(
            f"{value!r} is a string: write a number without quotes, "
            'or a template such as "{{ workers }}"'
        )
    if len(value) > 256:
        raise ValueError("template is longer than 256 characters")
    return value


Count = Annotated[
    int | str,
    PlainValidator(_check_count),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_NODES},
                {"type": "string", "pattern": r"\{\{.*\}\}", "maxLength": 256},
            ],
            "description": "A number, or a Jinja2 template over the parameters.",
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class Parameter(_Model):
    """A typed input of the appliance: a CLI `--set` key and a field of the Prefect run form."""

    type: Literal["integer", "number", "string", "boolean"]
    default: ParamLiteral | None = None
    description: Text = ""
    minimum: int | float | None = None
    maximum: int | float | None = None
    enum: list[ParamLiteral] | None = Field(default=None, min_length=1, max_length=256)
    max_length: int = Field(default=1024, ge=1, le=65_536)

    @field_validator("minimum", "maximum", mode="before")
    @classmethod
    def _finite_bound(cls, value: object) -> object:
        # Before the int | float union, so an error names the field, not a union arm.
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{brief(value)} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return value


class Scale(_Model):
    min: int = Field(default=1, ge=0, le=MAX_NODES)
    max: int = Field(default=MAX_NODES, ge=0, le=MAX_NODES)


_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as "90s", "5m", "1h", "250ms"."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 60, "90s", "5m" or "1h"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]
    else:
        raise ValueError(f'{brief(value)} is not a duration such as 60, "90s", "5m" or "1h"')
    if not math.isfinite(seconds) or seconds < 0 or seconds > 7 * 86400:
        raise ValueError(f"{brief(value)} is not between 0 and 7 days")
    return seconds


Duration = Annotated[
    float,
    PlainValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?\s*(ms|s|m|h)?$"},
            ],
            "description": 'Seconds, or a string such as "90s", "5m", "1h".',
        }
    ),
]


class AttributeMetric(_Model):
    """A value every node hosting `role` publishes on the blackboard, aggregated over them."""

    role: Name
    key: AttributeName
    aggregate: Literal["sum", "mean", "max", "min"] = "sum"


class Metric(_Model):
    """Where the number comes from: a blackboard attribute or an HTTP endpoint answering a
    number (plain text, or JSON {"value": N}). A value older than `stale_after` is not used."""

    attribute: AttributeMetric | None = None
    http: Annotated[str, Field(pattern=r"^https?://[^\s]{1,2000}$")] | None = None
    stale_after: Duration = 300.0

    @model_validator(mode="after")
    def _one_source(self) -> Metric:
        if (self.attribute is None) == (self.http is None):
            raise ValueError("give exactly one of 'attribute' or 'http'")
        return self


class Policy(_Model):
    """Either a target (desired nodes = ceil(metric / target_per_node)) or thresholds on the
    metric per node (above `scale_up_above`: add `step_up`; below `scale_down_below`: remove
    `step_down`)."""

    target_per_node: float | None = Field(default=None, gt=0)
    # a shrink is taken only when the nodes left would be below target by this share (as the
    # Kubernetes HPA's 10 %): a shrink the next small rise would undo is not (FAULTS F13)
    tolerance: float = Field(default=0.1, ge=0, lt=1)
    scale_up_above: float | None = Field(default=None, ge=0)
    scale_down_below: float | None = Field(default=None, ge=0)
    step_up: int = Field(default=1, ge=1, le=MAX_NODES)
    step_down: int = Field(default=1, ge=1, le=MAX_NODES)

    @model_validator(mode="after")
    def _one_kind(self) -> Policy:
        thresholds = (self.scale_up_above, self.scale_down_below)
        if self.target_per_node is not None:
            if any(t is not None for t in thresholds):
                raise ValueError("give target_per_node or thresholds, not both")
        elif None in thresholds:
            raise ValueError("give target_per_node, or both scale_up_above and scale_down_below")
        elif thresholds[1] >= thresholds[0]:  # type: ignore[operator]
            raise ValueError("scale_down_below must be below scale_up_above")
        return self


# What a batch queue's role publishes on the blackboard (QueueMetric): nodes the waiting jobs
# ask for, jobs waiting, jobs running, and every node's state as `NODE=STATE` words (Slurm's
# long state names, as `sinfo -N -o "%N %T"` prints them).
QUEUE_KEYS = ("pending_nodes", "pending", "running", "node_states")


class QueueMetric(_Model):
    """A batch queue as the metric (the slurm appliance's controller): the role publishes
    QUEUE_KEYS; the group grows by the nodes its waiting jobs ask for (`jobs_per_node` such
    jobs to a node) and shrinks only nodes that run no job."""

    role: Name
    jobs_per_node: int = Field(default=1, ge=1, le=10_000)
    stale_after: Duration = 300.0


class Scaling(_Model):
    """How the autoscale flow sizes a node group (within its `scale` bounds): from a `metric`
    with a `policy`, or from a batch `queue`."""

    metric: Metric | None = None
    policy: Policy | None = None
    queue: QueueMetric | None = None
    cooldown: Duration = 300.0  # after any scale action, no other for this long (FAULTS F13)
    scale_down_delay: Duration = 600.0  # the metric must stay low this long before a shrink
    max_step: int = Field(default=10, ge=1, le=MAX_NODES)  # nodes added or removed per action

    @model_validator(mode="after")
    def _one_source(self) -> Scaling:
        if self.queue is not None:
            if self.metric is not None or self.policy is not None:
                raise ValueError("give a queue, or a metric with a policy, not both")
        elif self.metric is None or self.policy is None:
            raise ValueError("give a metric with a policy, or a queue")
        return self

    @property
    def stale_after(self) -> float:
        source = self.queue or self.metric
        assert source is not None
        return source.stale_after

    def measured(self) -> tuple[str, tuple[str, ...]] | None:
        """The role and the attribute keys this scaling reads (measurements, not settings)."""
        if self.queue is not None:
            return self.queue.role, QUEUE_KEYS
        assert self.metric is not None
        a = self.metric.attribute
        return None if a is None else (a.role, (a.key,))


class NodeGroup(_Model):
    """Machines of one shape; each node of the group hosts every role listed."""

    count: Count = 1
    roles: list[Name] = Field(min_length=1, max_length=64)
    scale: Scale | None = None  # none: the group keeps its count (resize refuses to change it)
    scaling: Scaling | None = None  # autoscaling (the `autoscale` flow); needs `scale`
    # the resource pool its nodes go to (one named in pools.yaml, or local/sim); none: the
    # deploy's --pool. `crv deploy --pool-for GROUP=POOL` overrides it.
    pool: Name | None = None
    # or pools in order of preference: growth fills the first with capacity, shrinking
    # releases from the last (crv.engine.placement); not together with `pool`
    pools: list[Name] | None = Field(
        default=None, min_length=1, max_length=8, json_schema_extra={"uniqueItems": True}
    )
    description: Text = ""


class Dependency(_Model):
    """`role` (remote: every node hosting it) or `{role, local: true}` (the same node)."""

    role: Name
    local: bool = False
    min_ready: int | None = Field(default=None, ge=1, le=MAX_NODES)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"role": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _local_is_one_node(self) -> Dependency:
        if self.local and self.min_ready is not None:
            raise ValueError("min_ready applies to remote dependencies, not local ones")
        return self


DependencyEntry = Annotated[
    Dependency,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": NAME_PATTERN, "description": "a remote dependency"},
                {
                    "type": "object",
                    "properties": {
                        "role": {"type": "string", "pattern": NAME_PATTERN},
                        "local": {"type": "boolean", "default": False},
                        "min_ready": {"type": "integer", "minimum": 1, "maximum": MAX_NODES},
                    },
                    "required": ["role"],
                    "additionalProperties": False,
                },
            ]
        }
    ),
]


class OnNode(_Model):
    """A check the node's own agent runs (`sh -c`, in the role's directory, with the recipe's
    environment) and reports: for a node crv cannot reach (behind NAT), whose agent calls out."""

    command: Annotated[str, Field(min_length=1, max_length=4096)]


class Verify(_Model):
    """How crv checks a role; exactly one of the four kinds. `http`, `tcp` and `command` run on
    crv's side and reach the node; `on_node` runs on the node."""

    http: Annotated[str, Field(max_length=2048)] | None = None
    tcp: Annotated[str, Field(max_length=512)] | None = None
    command: Annotated[str, Field(max_length=4096)] | None = None
    on_node: OnNode | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Verify:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of http, tcp, command or on_node")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def template(self) -> str:
        value = getattr(self, self.kind)
        return value.command if isinstance(value, OnNode) else str(value)


KINDS = ("http", "tcp", "command", "on_node")


class Estimates(_Model):
    """Expected seconds per step kind; they only shape the plan's critical path."""

    provision: Seconds | None = None
    certify: Seconds | None = None
    contextualize: Seconds | None = None
    verify: Seconds | None = None


class Role(_Model):
    """A CloudCRV RoleDef: a recipe run on the node, the attributes it publishes, its checks."""

    recipe: Annotated[str, Field(min_length=1, max_length=1024)]
    # run on a node before a shrink removes it (stop taking work, hand it over); optional
    drain: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    # after the agent renewed the node's certificate (the files behind CRV_CERT_FILE and
    # CRV_KEY_FILE are new): "rerun" the recipe, or run this recipe (reload a daemon)
    renew: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    description: Text = ""
    depends_on: list[DependencyEntry] = Field(default_factory=list, max_length=64)
    publishes: list[AttributeName] = Field(default_factory=list, max_length=64)
    verify: Verify | None = None
    estimates: Estimates = Estimates()


class Include(_Model):
    """Another appliance of the catalog, its groups and roles renamed `<prefix>-<name>`."""

    appliance: Name
    prefix: Name | None = None
    parameters: dict[Name, ParamLiteral] = Field(default_factory=dict, max_length=256)


PackageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]{1,99}$")]


class Image(_Model):
    """What the appliance's recipes need in a machine's image: Debian packages that `crv image
    build` puts in (the union over a deploy's appliances, included ones too), because guests
    in the lab, like many sites' machines, have no package mirror to install from."""

    packages: list[PackageName] = Field(default_factory=list, max_length=200)


Share = (
    Annotated[int, Field(ge=0, le=1_000_000)]
    | Annotated[str, Field(pattern=r"^(100|[1-9]?[0-9])%$")]
)


class Approval(_Model):
    """The approval gate: a resize (crv scale, the scale-role flow, autoscaling, a guard) that
    would remove more than `remove_more_than` nodes of a group (a number, or a share of the
    group such as "50%") pauses for a person to approve or reject it (the Prefect UI, `crv
    approve`, `crv reject`); no answer within `timeout` rejects it."""

    remove_more_than: Share
    timeout: Duration = 3600.0


class ApplianceSpec(_Model):
    """The whole `appliance.yaml`."""

    api_version: Literal["crv/v1"] = Field(alias="apiVersion")
    name: Name
    description: Text = ""
    # a deploy or resize that fails: keep what it made (run it again to resume), or roll back
    on_failure: Literal["keep", "rollback"] = "keep"
    # the brake (FAULTS F6, as Cluster API's MachineHealthCheck maxUnhealthy): when more of a
    # change's new nodes than this fail (a number of nodes, or a share such as "40%"), crv
    # stops making nodes and fails the change
    max_unhealthy: Share = "40%"
    # a change that would remove more nodes than this waits for a person's approval
    approval: Approval | None = None
    parameters: dict[Name, Parameter] = Field(default_factory=dict, max_length=256)
    include: list[Include] = Field(default_factory=list, max_length=32)
    nodes: dict[Name, NodeGroup] = Field(default_factory=dict, max_length=256)
    roles: dict[Name, Role] = Field(default_factory=dict, max_length=256)
    image: Image = Image()


_KNOWN_FIELDS = sorted(
    {
        f.alias or name
        for model in (
            ApplianceSpec,
            Parameter,
            Scale,
            NodeGroup,
            Dependency,
            Verify,
            Estimates,
            Role,
            Include,
            Image,
            Scaling,
            Metric,
            Policy,
            QueueMetric,
            Approval,
        )
        for name, f in model.model_fields.items()
    }
)


def _field_path(loc: Sequence[int | str]) -> str:
    path = ""
    for item in loc:
        if item == "[key]":
            continue
        if isinstance(item, int):
            path += f"[{item}]"
        else:
            path += f".{item}" if path else str(item)
    return path


# fields whose value is a credential: an error about them never quotes what was given
_SECRET_FIELD = re.compile(r"(\w+_)?(password|secret|token|key|credentials?)", re.I)


def validation_error(source: str, exc: ValidationError) -> SpecError:
    """The first pydantic error as one line naming the field; the count of the others."""
    errors = exc.errors()
    first = errors[0]
    loc = first["loc"]
    kind = first["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        close = difflib.get_close_matches(name, _KNOWN_FIELDS, n=1)
        message = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
    elif kind == "missing":
        message = "required field is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
        given = first.get("input")
        if kind != "value_error" and isinstance(given, int | float | str | bool):
            if any(isinstance(item, str) and _SECRET_FIELD.fullmatch(item) for item in loc):
                # a credential written where a reference belongs: never repeat it
                message = "must be a reference such as {env: NAME} or {file: PATH}, not a value"
            else:
                message += f" (got {brief(given)})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return SpecError(source, _field_path(loc), message)


def json_schema() -> dict[str, Any]:
    schema = ApplianceSpec.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://crv.dev/schema/appliance-v1.json",
        **schema,
    }
