"""The service's wire models, shared by the service (crv/service/app.py and its routers), its
store and its client (crv/service/client.py): request bodies as pydantic models (strict, no extra
fields, every length bounded), and the cluster status as TypedDicts, which pydantic checks on
both ends while the JSON stays exactly what the store builds and mypy checks every key a caller
reads.
"""

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from typing_extensions import NotRequired, TypedDict

from crv.appliance.spec import ATTRIBUTE_PATTERN, NAME_PATTERN, ParamValue

MAX_VALUE = 64 * 1024  # bytes of one attribute value
PAIR_TTL = timedelta(minutes=10)  # default life of a pairing PIN

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
RolePath = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=63)]
KeyPath = Annotated[str, PathParam(pattern=ATTRIBUTE_PATTERN, max_length=63)]
ClusterPath = Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=63)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EnrolRequest(_Body):
    cluster: Name
    node: Name
    token: Annotated[str, Field(min_length=16, max_length=128)]
    csr: Annotated[str, Field(max_length=16 * 1024)]


class RenewRequest(_Body):
    csr: Annotated[str, Field(max_length=16 * 1024)]


class RejoinRequest(_Body):
    cluster: Name
    node: Name
    certificate: Annotated[str, Field(max_length=16 * 1024)]  # its last one, ended
    csr: Annotated[str, Field(max_length=16 * 1024)]  # for a new key made on the node
    signature: Annotated[str, Field(max_length=512)]  # base64 DER ECDSA by the last key


class PairingRequest(_Body):
    group: Name
    roles: list[Name]
    ttl: Annotated[float, Field(ge=30, le=86400)] = PAIR_TTL.total_seconds()


class PairRequest(_Body):
    pin: Annotated[str, Field(min_length=4, max_length=32)]
    csr: Annotated[str, Field(max_length=16 * 1024)]  # for a key made on the machine, no names
    address: Annotated[str, Field(max_length=64)] | None = None  # as other nodes reach it


class CheckReport(_Body):
    role: Name
    check: Annotated[int, Field(ge=1)]
    exit_code: int
    output: Annotated[str, Field(max_length=64 * 1024)] = ""


class AttributeValue(_Body):
    value: Annotated[str, Field(max_length=MAX_VALUE)]


class StatusReport(_Body):
    role: Name
    release: Annotated[int, Field(ge=1)]
    state: Literal["running", "done", "failed"]
    exit_code: int | None = None
    output: Annotated[str, Field(max_length=64 * 1024)] = ""


class DependsOn(_Body):
    role: Name
    local: bool = False
    min_ready: int | None = None


class RoleSpec(_Body):
    recipe: Annotated[str, Field(max_length=1024)]
    drain: Annotated[str, Field(max_length=1024)] | None = None
    # after the node's certificate is renewed: "rerun" the recipe, or run this recipe
    renew: Annotated[str, Field(max_length=1024)] | None = None
    appdir: Annotated[str, Field(max_length=64)]
    env: dict[str, str] = {}
    depends_on: list[DependsOn] = []
    # attributes that are measurements: left out of what a dependent is said to read
    metrics: list[Annotated[str, Field(pattern=ATTRIBUTE_PATTERN, max_length=63)]] = []


class ClusterSpec(_Body):
    appliance: Name
    source: Annotated[str, Field(max_length=4096)]
    pool: Name
    parameters: dict[str, Any] = {}
    counts: dict[Name, Annotated[int, Field(ge=0, le=100_000)]] = {}
    pools: dict[Name, Name] = {}  # group -> pool, where it is not `pool`
    roles: dict[str, RoleSpec]
    bundle: str


Phase = Literal[
    "provision", "power_on", "script", "kernel", "initrd", "callback", "created", "enrolled",
    "recipes", "verified",
]  # fmt: skip


PhaseTime = Annotated[float, Field(ge=0, le=1e11)]


class NodeItem(_Body):
    name: Name
    group: Name
    roles: list[Name]
    pool: Name
    address: Annotated[str, Field(max_length=64)] | None = None
    state: Literal["planned", "provisioning", "provisioned", "failed", "leaving"] | None = None
    # when the node reached each phase of its making (UNIX times): the first time of a phase
    # is kept, and a `provision` time starts a new record (store.merge_timings)
    timings: Annotated[dict[Phase, PhaseTime], Field(max_length=16)] = {}


class NodesRequest(_Body):
    nodes: list[NodeItem]


class TokensRequest(_Body):
    nodes: list[Name]
    ttl: Annotated[float, Field(gt=0, le=7 * 86400)] = 3600.0


class RoleUpdate(_Body):
    node: Name
    role: Name
    op: Literal["release", "refresh", "verified", "verify_failed", "drain", "check"]
    message: Annotated[str, Field(max_length=64 * 1024)] | None = None


class RolesRequest(_Body):
    updates: list[RoleUpdate]


class AutoscalingSetting(_Body):
    enabled: bool
    every: Annotated[float, Field(gt=0, le=86400)] = 60.0


Text = Annotated[str, Field(max_length=4096)]
Seconds = Annotated[float, Field(ge=0, le=7 * 86400)]


class GuardSetting(_Body):
    """The guards of a cluster (crv.engine.guards): only the fields sent change; null or 0
    clears one (warn_before: null is the default, 0 acts right after announcing)."""

    lease: Seconds | None = None
    on_lease: Literal["destroy", "shrink"] | None = None
    idle_after: Seconds | None = None
    budget: Annotated[float, Field(ge=0, le=1e9)] | None = None  # node-hours per UTC day
    warn_before: Annotated[float, Field(ge=0, le=86400)] | None = None


class GuardNotice(_Body):
    """A guard's announcement that is out (crv.engine.guards.Notice)."""

    guard: Literal["lease", "idle", "budget"]
    action: Literal["destroy", "shrink", "hold"]
    due: float
    announced: float
    acts_at: float
    text: Text


class GuardState(_Body):
    """What the autoscale flow keeps between its runs for the guards."""

    work_seen: float | None = None
    notices: Annotated[dict[str, GuardNotice], Field(max_length=8)] = {}


class DecisionRecord(_Body):
    group: Name
    at: float
    metric: float | None = None
    current: Annotated[int, Field(ge=0)]
    desired: Annotated[int, Field(ge=0)]
    target: Annotated[int, Field(ge=0)]
    action: Literal["grow", "shrink", "none", "destroy"]  # destroy: a guard's (lease)
    reason: Text
    outcome: Text | None = None
    flow_run: Annotated[str, Field(max_length=64)] | None = None
    last_scale_up: float | None = None
    low_since: float | None = None
    last_action: float | None = None


class Outcome(_Body):
    outcome: Text


class QuarantineRequest(_Body):
    reason: Text  # the step's failure, kept in the node's event


# -- the cluster status: GET /v1/admin/clusters/{cluster}, `crv status --json` -----------------


class RoleStatus(TypedDict):
    """A role on a node. A role no change has reached yet is `{"state": "pending"}` alone."""

    state: str  # crv.base.states.RoleState
    release: NotRequired[int]
    exit_code: NotRequired[int | None]
    output: NotRequired[str]
    attributes: NotRequired[dict[str, str]]


class NodeStatus(TypedDict):
    name: str
    group: str
    pool: str
    address: str | None
    state: str  # crv.base.states.NodeState
    last_seen: str | None  # ISO time of the agent's last call
    roles: dict[str, RoleStatus]
    timings: NotRequired[dict[str, str]]  # phase -> ISO time (crv status --timings)


class ClusterStatus(TypedDict):
    name: str
    appliance: str
    source: str
    pool: str
    parameters: dict[str, ParamValue]  # the appliance's resolved parameters
    counts: dict[str, int]
    pools: dict[str, str]
    ready: bool
    nodes: list[NodeStatus]


CLUSTER_STATUS = TypeAdapter(ClusterStatus)
