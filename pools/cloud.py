"""The libcloud pool: nodes are instances of any apache-libcloud compute provider.

Every instance carries the crv tags (`crv-cluster`, `crv-node`, plus `crv-group` and `Name`), and
the pool finds its nodes by those tags only: nothing is recorded locally, so a reconciler sees
what a killed deploy left behind, and instances without crv tags are never listed nor touched.

Idempotency. `create_node` first looks the node up by tag and returns a live one as it is. On
EC2 it also sends a `ClientToken` derived from cluster and node name (`_client_token`), so a
create retried after a lost answer (the instance exists, but a describe may not show it yet) is
answered with the same instance by EC2 itself. A client token stays bound to its instance after
termination, so the token carries a generation: when EC2 answers with a terminated instance or
`IdempotentParameterMismatch`, the next generation is tried (after looking up by tag again).

Errors. Library errors become `PoolError` at the boundary: rate limits (HTTP 429/503, EC2
`RequestLimitExceeded`, throttling), server errors, insufficient capacity
(`InsufficientInstanceCapacity`: another zone or a later try may have room) and connection
errors are temporary; authentication failures, unknown image or size (naming the option),
account limits (`InstanceLimitExceeded`, `VcpuLimitExceeded`: only a person can raise them) and
other client errors are permanent. Messages are one line, cut to a reasonable length, and never
contain the bootstrap token nor the credentials (key and secret, in clear or URL-, JSON- or
XML-encoded: a provider's error text may echo the request). The PoolError a call raises has no
library exception in its chain (neither `__cause__` nor `__context__`): libcloud keeps an error
answer's body as its exception's text, and a logged traceback would print it
(tests/test_cloud_secrets.py).

Rate limits. A call the provider answers with a rate limit (HTTP 429 or 503, EC2's
`RequestLimitExceeded`, any `Throttling`) is made again by the pool itself, as the AWS SDKs'
standard retry mode does: after a jittered exponential backoff (`RetryPolicy`: 1 s doubling up to
20 s, each scaled by 0.5-1.5), or after the `Retry-After` the answer carries (seconds or an
HTTP-date, honoured up to 5 minutes) when that is longer, for at most `retry.attempts` attempts
(default 8) within `retry.deadline` seconds (default 120) of the first. When that is spent, or
when the provider asks to wait past the deadline (then at once, without sleeping), the call fails
with one permanent line naming the pool, the call and the rate limit: the pool has waited as long
as its deadline allows, and another layer retrying the step would only multiply that bound.
Errors that are temporary for another reason (no answer, a 500, no capacity) are not retried
here: they go up as temporary errors, for the step's own retries, with the `Retry-After` of the
answer, if any, as their `delay`.

The moto namespace pitfall (../shared/ENVIRONMENT.md): moto answers EC2 calls with
`xmlns="http://ec2.amazonaws.com/doc/2016-11-15"` while libcloud parses with the namespace that
ends in a slash, so every list comes back empty; moto also puts that namespace on error
documents, which AWS sends without one, so libcloud finds no error code in them. For EC2 the
pool always uses a response class that adds the slash (answers) or drops the namespace (errors)
when moto's form is seen; AWS's own answers do not match it, so the rewrite is a no-op there and
there is no option to forget.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import inspect
import json
import logging
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from libcloud.common.exceptions import BaseHTTPError, RateLimitReachedError
from libcloud.common.types import InvalidCredsError, LibcloudError
from libcloud.compute.base import Node, NodeImage, NodeLocation, NodeSize
from libcloud.compute.drivers.ec2 import (
    API_VERSION,
    EC2Connection,
    EC2NetworkSubnet,
    EC2NodeDriver,
    EC2NodeLocation,
    EC2Response,
    ExEC2AvailabilityZone,
    IdempotentParamError,
)
from libcloud.compute.providers import DRIVERS, get_driver
from libcloud.compute.types import NodeState
from pydantic import BaseModel, ConfigDict, Field, field_validator

from crv.base.retry import RetryPolicy, parse_retry_after
from pools import cloudinit
from pools.base import TAG_CLUSTER, TAG_NODE, MaxNodes, NodeInfo, NodeSpec, PoolError
from pools.credentials import SecretRef, check, resolve

TAG_GROUP = "crv-group"
CLIENT_TOKEN_MAX = 64  # EC2: at most 64 ASCII characters
GENERATIONS = 8  # client-token generations tried before giving up (re-creations of one node)
MESSAGE_MAX = 300
BACKOFF = RetryPolicy(base=1.0, factor=2.0, cap=20.0, jitter=0.5, asked_cap=300.0)

R = TypeVar("R")
log = logging.getLogger(__name__)

# Credentials go through SecretRef, never driver_args.
_SECRET_ARGS = {"key", "secret", "token", "password", "api_key", "ex_force_auth_token"}

_STATES = {
    NodeState.RUNNING: "running",
    NodeState.PENDING: "pending",
    NodeState.STARTING: "pending",
    NodeState.REBOOTING: "pending",
    NodeState.MIGRATING: "pending",
    NodeState.RECONFIGURING: "pending",
    NodeState.UPDATING: "pending",
    NodeState.UNKNOWN: "pending",  # a state libcloud cannot name: keep waiting, not failing
    NodeState.STOPPED: "stopped",
    NodeState.STOPPING: "stopped",
    NodeState.SUSPENDED: "stopped",
    NodeState.PAUSED: "stopped",
    NodeState.ERROR: "error",
}
_GONE_EC2 = {"terminated", "shutting-down"}

_TEMPORARY_CODES = re.compile(
    r"RequestLimitExceeded|Throttl|TooManyRequests|InsufficientInstanceCapacity"
    r"|InsufficientCapacity|InsufficientHostCapacity|ServiceUnavailable|Unavailable"
    r"|InternalError|InternalFailure|RequestTimeout|ServerInternal|SlowDown",
    re.IGNORECASE,
)
_THROTTLED_CODES = re.compile(
    r"RequestLimitExceeded|Throttl|TooManyRequests|SlowDown|RateLimit|Rate exceeded",
    re.IGNORECASE,
)
_THROTTLED_HTTP = (429, 503)
_IMAGE_CODES = re.compile(r"InvalidAMIID|InvalidImage|image .*not (be )?found", re.IGNORECASE)
_SIZE_CODES = re.compile(
    r"InvalidInstanceType|instance type|flavou?r .*not (be )?found|service ?offering",
    re.IGNORECASE,
)
_AUTH_CODES = re.compile(
    r"AuthFailure|UnauthorizedOperation|InvalidClientTokenId|SignatureDoesNotMatch"
    r"|Unauthorized|Forbidden|credentials",
    re.IGNORECASE,
)
_NOT_FOUND = re.compile(r"InvalidInstanceID\.NotFound|not found|does not exist", re.IGNORECASE)


class GroupOverride(BaseModel):
    """Another image or size for the nodes of one appliance group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = None
    size: str | None = None


class RetryOptions(BaseModel):
    """How long the pool keeps asking a provider that answers with a rate limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(
        default=8, ge=1, le=50, description="attempts of one call, the first included"
    )
    deadline: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="seconds from a call's first attempt after which no attempt starts",
    )


class CloudOptions(BaseModel):
    """The `options:` of a `driver: libcloud` pool (see CloudPool for examples)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(description="a libcloud compute Provider name: ec2, openstack, ...")
    key: SecretRef = Field(description="the access key / user name / API key")
    secret: SecretRef | None = Field(default=None, description="the secret key / password")
    region: str | None = None
    image: str = Field(min_length=1, description="image id")
    size: str = Field(min_length=1, description="size (instance type, flavour) id")
    location: str | None = Field(default=None, description="availability zone / zone id")
    network: str | None = Field(default=None, description="network id (OpenStack, CloudStack)")
    subnet: str | None = Field(default=None, description="subnet id (EC2)")
    security_groups: list[str] = Field(default_factory=list)
    key_name: str | None = Field(default=None, description="an SSH key pair the cloud knows")
    address: Literal["public", "private"] = Field(
        default="public", description="which address NodeInfo gives (falls back to the other)"
    )
    driver_args: dict[str, str | int | bool] = Field(
        default_factory=dict, description="more keyword arguments for the driver's constructor"
    )
    groups: dict[str, GroupOverride] = Field(
        default_factory=dict, description="per appliance group: another image or size"
    )
    max_nodes: int | None = Field(
        default=None,
        ge=0,
        le=100_000,
        description="at most this many crv instances (of any cluster) at a time: capacity()",
    )
    retry: RetryOptions = Field(
        default_factory=RetryOptions,
        description="rate-limited calls: attempts and deadline (module doc, Rate limits)",
    )

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in _providers():
            raise ValueError(f"unknown libcloud compute provider {value!r}")
        return value

    @field_validator("image", "size", "location", "network", "subnet", mode="before")
    @classmethod
    def _id_as_text(cls, value: object) -> object:
        # YAML reads a numeric flavour id (`size: 3`) as an int; ids are text
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("driver_args")
    @classmethod
    def _no_credentials(cls, value: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        bad = sorted(k for k in value if k.lower() in _SECRET_ARGS)
        if bad:
            raise ValueError(f"{', '.join(bad)}: credentials go in key/secret as references")
        return value


def _providers() -> set[str]:
    """libcloud's compute provider names, from its table (no import of any driver module)."""
    return {str(getattr(p, "value", p)) for p in DRIVERS}


def _client_token(cluster: str, node: str, generation: int) -> str:
    """EC2's ClientToken for one node: deterministic, ASCII, at most 64 characters, and free of
    anything secret (cluster and node names only)."""
    digest = hashlib.sha256(f"crv\0{cluster}\0{node}\0{generation}".encode()).hexdigest()
    token = f"crv-{generation}-{digest}"
    return token[:CLIENT_TOKEN_MAX]


class _NamespaceFixingResponse(EC2Response):
    """EC2 responses with the API namespace libcloud expects (moto omits its trailing slash)."""

    _without = f'xmlns="http://ec2.amazonaws.com/doc/{API_VERSION}"'
    _with = f'xmlns="http://ec2.amazonaws.com/doc/{API_VERSION}/"'

    def parse_body(self) -> Any:
        if isinstance(self.body, str) and self._without in self.body:
            self.body = self.body.replace(self._without, self._with)
        return super().parse_body()  # type: ignore[no-untyped-call]

    def parse_error(self) -> Any:
        # libcloud reads Retry-After with float() (429) after this, on the same dictionary: a
        # value that is neither seconds nor an HTTP-date would raise ValueError from the driver
        _normalise_retry_after(self.headers)
        # AWS sends errors without a namespace, and libcloud reads them so ("Errors/Error");
        # moto puts its namespace on errors too, which hides the error code from libcloud.
        if isinstance(self.body, str) and self._without in self.body:
            self.body = self.body.replace(" " + self._without, "", 1)
        return super().parse_error()  # type: ignore[no-untyped-call]


def _normalise_retry_after(headers: Any) -> None:
    """`retry-after` in libcloud's lower-cased headers as seconds, or dropped if unreadable."""
    if not isinstance(headers, dict) or "retry-after" not in headers:
        return
    seconds = parse_retry_after(str(headers["retry-after"]))
    if seconds is None:
        del headers["retry-after"]
    else:
        headers["retry-after"] = str(seconds)


def _retry_after(exc: BaseException) -> float | None:
    """The wait a provider's error answer asked for: its `Retry-After` header (seconds or an
    HTTP-date), else libcloud's `retry_after` (a 429); None when it asked for none."""
    headers = getattr(exc, "headers", None)
    if isinstance(headers, Mapping):
        for key, value in headers.items():
            if str(key).lower() == "retry-after":
                seconds = parse_retry_after(str(value))
                if seconds is not None:
                    return seconds
    asked = getattr(exc, "retry_after", None)
    if isinstance(asked, int | float) and not isinstance(asked, bool) and asked > 0:
        return float(asked)
    return None


class _Throttled(PoolError):
    """The provider answered with a rate limit: `CloudPool._call` asks again (module doc)."""

    def __init__(self, pool: str, action: str, text: str, delay: float | None) -> None:
        self.action = action
        self.cause = text + (f"; Retry-After {delay:g} s" if delay is not None else "")
        super().__init__(
            pool, f"{action}: rate limited ({self.cause})", temporary=True, delay=delay
        )


class _TokenReused(PoolError):
    """EC2 answered `IdempotentParameterMismatch`: `create_node` tries the next generation."""


class _NamespaceFixingConnection(EC2Connection):
    responseCls = _NamespaceFixingResponse


def _driver_class(provider: str) -> type[Any]:
    cls: type[Any] = get_driver(provider)
    if issubclass(cls, EC2NodeDriver):
        return type(f"Crv{cls.__name__}", (cls,), {"connectionCls": _NamespaceFixingConnection})
    return cls


def _one_line(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` on one line, at most MESSAGE_MAX characters, each secret (as written in clear,
    URL-encoded, JSON-, XML- or repr-escaped) replaced by `<redacted>`."""
    for secret in secrets:
        if not secret:
            continue
        written = {
            secret,
            urllib.parse.quote(secret, safe=""),
            urllib.parse.quote_plus(secret),
            json.dumps(secret)[1:-1],
            json.dumps(secret)[1:-1].replace("/", "\\/"),
            html.escape(secret),
            html.escape(secret, quote=False),
            repr(secret)[1:-1],
        }
        for form in sorted(written, key=len, reverse=True):
            text = text.replace(form, "<redacted>")
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 3] + "..."


class CloudPool(MaxNodes):
    """A pool of instances of one libcloud compute provider, account and region.

    Options are `CloudOptions`. Credentials are references (`{env: VAR}` or
    `{prefect_secret: BLOCK}`), never values. Examples for `pools.yaml`::

        pools:
          aws:
            driver: libcloud
            options:
              provider: ec2
              key: {env: AWS_ACCESS_KEY_ID}
              secret: {prefect_secret: aws-secret-key}
              region: eu-west-1
              image: ami-0abcdef1234567890
              size: t3.small
              subnet: subnet-0123456789abcdef0
              security_groups: [sg-0123456789abcdef0]  # ids when a subnet is given
              key_name: ops
              groups:
                worker: {size: c6i.xlarge}

          openstack:
            driver: libcloud
            options:
              provider: openstack
              key: {env: OS_USERNAME}
              secret: {env: OS_PASSWORD}
              region: RegionOne
              image: 0b5f1c8e-3f7d-4c3e-9d6a-2f1c3a1b9e10   # image id
              size: 3                                      # flavour id
              network: 6e1c4b3a-8f0e-4d7e-a1f2-9c8d7b6a5e40
              security_groups: [default, crv]
              key_name: ops
              driver_args:
                ex_force_auth_url: https://keystone.example.org:5000
                ex_force_auth_version: 3.x_password
                ex_tenant_name: crv
                ex_domain_name: Default

          cloudstack:
            driver: libcloud
            options:
              provider: cloudstack
              key: {env: CLOUDSTACK_API_KEY}
              secret: {prefect_secret: cloudstack-secret}
              image: 5c3f1a7e-0d4b-4e1a-9b7c-2e8f6d5a4c31      # template id
              size: 9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d       # service offering id
              location: 1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d   # zone id
              network: 7f6e5d4c-3b2a-4190-8a7b-6c5d4e3f2a1b
              driver_args:
                host: cloud.example.org
                path: /client/api

    For moto (tests): `provider: ec2`, `region: us-east-1` and
    `driver_args: {host: 127.0.0.1, port: PORT, secure: false, signature_version: "4"}`.
    """

    def __init__(self, name: str, state_dir: Path, options: CloudOptions) -> None:
        self.name = name
        self.state_dir = state_dir  # nothing is kept there: the cloud's tags are the record
        self.options = options
        self.max_nodes = options.max_nodes
        self.backoff = dataclasses.replace(
            BACKOFF, retries=options.retry.attempts - 1, deadline=options.retry.deadline
        )
        self._local = threading.local()  # libcloud connections are not shared between threads

    # ---- the contract -------------------------------------------------------------------

    def validate(self) -> None:
        """Provider, required options and credential references, without network calls."""
        o = self.options
        if o.provider not in _providers():
            self._fail("provider", f"unknown libcloud compute provider {o.provider!r}")
        try:
            cls = _driver_class(o.provider)
        except Exception as exc:  # a driver module that does not import (a missing extra)
            self._fail("provider", f"driver for {o.provider!r} unavailable: {exc}")
        check(o.key, self.name, "key")
        if o.secret is not None:
            check(o.secret, self.name, "secret")
        elif o.provider in ("ec2", "openstack", "cloudstack"):
            self._fail("secret", f"required for provider {o.provider}")
        if issubclass(cls, EC2NodeDriver):
            if o.region is not None and o.region not in EC2NodeDriver.list_regions():  # type: ignore[no-untyped-call]
                self._fail("region", f"unknown EC2 region {o.region!r}")
            if o.network is not None:
                self._fail("network", "not used by EC2: give the subnet id as subnet")
        elif o.subnet is not None:
            self._fail("subnet", f"only used by EC2; give network for {o.provider}")
        if o.provider == "openstack" and "ex_force_auth_url" not in o.driver_args:
            self._fail("driver_args.ex_force_auth_url", "required for provider openstack")
        if o.provider == "cloudstack" and not ({"host", "url"} & set(o.driver_args)):
            self._fail("driver_args.host", "required for provider cloudstack (or url)")
        factory: Any = cls.__new__
        if factory is object.__new__:  # not a factory that picks the class by API version
            self._check_capabilities(cls)
        accepted = inspect.signature(cls.__init__).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        for arg in o.driver_args:
            if arg not in accepted and not takes_kwargs:
                self._fail(f"driver_args.{arg}", f"not accepted by the {o.provider} driver")

    def _check_capabilities(self, driver: Any) -> None:
        """The driver (class or instance) can pass user-data and tag what it creates."""
        params = inspect.signature(driver.create_node).parameters
        if "ex_userdata" not in params:
            self._fail("provider", f"{self.options.provider}: driver cannot pass user-data")
        if "ex_metadata" not in params and not hasattr(driver, "ex_create_tags"):
            self._fail("provider", f"{self.options.provider}: driver cannot tag nodes")

    def list_nodes(self, cluster: str | None = None) -> list[NodeInfo]:
        """Every live instance with crv tags (of `cluster`, if given); untagged ones never."""
        filters = {f"tag:{TAG_CLUSTER}": cluster} if cluster else {"tag-key": TAG_NODE}
        found = self._nodes(filters)
        infos = [self._info(n) for n in found]
        return sorted(
            (i for i in infos if cluster is None or i.cluster == cluster), key=lambda i: i.name
        )

    def get_node(self, name: str) -> NodeInfo | None:
        nodes = self._nodes({f"tag:{TAG_NODE}": name})
        return self._info(nodes[0]) if nodes else None

    def create_node(self, spec: NodeSpec) -> NodeInfo:
        """Idempotent on spec.name: a live instance tagged with it is returned as it is."""
        existing = self._existing(spec)
        if existing is not None:
            return existing
        secrets = (spec.bootstrap.get("token", ""),)  # the one secret in the bootstrap
        data = cloudinit.user_data(spec.bootstrap, spec.name, compress=True)
        driver = self._driver()
        ec2 = isinstance(driver, EC2NodeDriver)
        if ec2 and len(data) > cloudinit.EC2_USER_DATA_LIMIT:
            raise PoolError(self.name, f"node {spec.name}: user-data over EC2's 16 KiB")
        tags = self._tags(spec)
        image_id, size_id = self._image_size(spec.group)
        kwargs = self._create_args(driver, spec.name, image_id, size_id, data, tags)
        native_tags = "ex_metadata" in kwargs
        for generation in range(GENERATIONS if ec2 else 1):
            if ec2:
                kwargs["ex_clienttoken"] = _client_token(spec.cluster, spec.name, generation)
            try:
                node = self._call(
                    f"create {spec.name}", lambda: driver.create_node(**kwargs), secrets
                )
            except _TokenReused:
                # the token belongs to an earlier instance of this node with other user-data
                existing = self._existing(spec)
                if existing is not None:
                    return existing
                continue
            if ec2 and node.extra.get("status") in _GONE_EC2:
                continue  # the token's instance was terminated: the next generation is fresh
            if not native_tags:
                self._tag_or_destroy(driver, node, tags, spec.name, secrets)
            node.extra.setdefault("tags", tags)
            return self._info(node, default_tags=tags)
        raise PoolError(self.name, f"node {spec.name}: {GENERATIONS} client tokens used up")

    def destroy_node(self, name: str) -> None:
        """Terminate every live instance tagged with `name`; none is success."""
        driver = self._driver()
        for node in self._nodes({f"tag:{TAG_NODE}": name}):
            try:
                self._call(f"destroy {name}", functools.partial(driver.destroy_node, node))
            except PoolError as exc:
                if exc.temporary or not _NOT_FOUND.search(str(exc)):
                    raise  # gone in between: that is what was asked

    # ---- helpers ------------------------------------------------------------------------

    def driver(self) -> Any:
        """The libcloud driver of this thread (built on first use; resolves the credentials)."""
        driver = getattr(self._local, "driver", None)
        if driver is None:
            driver = self._local.driver = self._make_driver()
        return driver

    _driver = driver

    def _make_driver(self) -> Any:
        o = self.options
        cls = _driver_class(o.provider)
        args = [resolve(o.key, self.name, "key")]
        if o.secret is not None:
            args.append(resolve(o.secret, self.name, "secret"))
        self._local.credentials = tuple(args)  # redacted from this thread's errors
        kwargs: dict[str, Any] = dict(o.driver_args)
        if o.region is not None:
            if o.provider == "openstack":
                kwargs.setdefault("ex_force_service_region", o.region)
            elif "region" in inspect.signature(cls.__init__).parameters:
                kwargs["region"] = o.region
        try:
            return cls(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            text = _one_line(str(exc), tuple(args))
        raise PoolError(self.name, f"driver {o.provider}: {text}")  # outside: no chain

    def _fail(self, option: str, message: str) -> Any:
        raise PoolError(self.name, f"option {option}: {message}")

    def _image_size(self, group: str) -> tuple[str, str]:
        override = self.options.groups.get(group, GroupOverride())
        return override.image or self.options.image, override.size or self.options.size

    def _tags(self, spec: NodeSpec) -> dict[str, str]:
        tags = {k: str(v) for k, v in spec.tags.items() if not k.startswith("crv-")}
        tags.update(
            {
                "Name": spec.name,
                TAG_CLUSTER: spec.cluster,
                TAG_NODE: spec.name,
                TAG_GROUP: spec.group,
            }
        )
        return tags

    def _create_args(
        self,
        driver: Any,
        name: str,
        image_id: str,
        size_id: str,
        data: bytes,
        tags: dict[str, str],
    ) -> dict[str, Any]:
        o = self.options
        self._check_capabilities(driver)
        image = NodeImage(id=image_id, name=image_id, driver=driver)
        size = NodeSize(size_id, size_id, 0, 0, None, 0.0, driver)
        kwargs: dict[str, Any] = {"name": name, "image": image, "size": size, "ex_userdata": data}
        params = inspect.signature(driver.create_node).parameters
        if "ex_metadata" in params:
            kwargs["ex_metadata"] = tags
        if o.key_name is not None:
            kwargs["ex_keyname"] = o.key_name
        if isinstance(driver, EC2NodeDriver):
            if o.location is not None:
                zone = ExEC2AvailabilityZone(  # type: ignore[no-untyped-call]
                    o.location, "available", driver.region_name
                )
                kwargs["location"] = EC2NodeLocation(  # type: ignore[no-untyped-call]
                    o.location, o.location, driver.country, driver, zone
                )
            if o.subnet is not None:
                subnet = EC2NetworkSubnet(o.subnet, o.subnet, "available")  # type: ignore[no-untyped-call]
                kwargs["ex_subnet"] = subnet
                if o.security_groups:
                    kwargs["ex_security_group_ids"] = list(o.security_groups)
            elif o.security_groups:
                kwargs["ex_security_groups"] = list(o.security_groups)
            return kwargs
        if o.location is not None:
            kwargs["location"] = NodeLocation(o.location, o.location, "", driver)
        if o.network is not None:
            kwargs["networks"] = [_Ref(o.network)]
        if o.security_groups:
            kwargs["ex_security_groups"] = [_Ref(g) for g in o.security_groups]
        return kwargs

    def _tag_or_destroy(
        self, driver: Any, node: Node, tags: dict[str, str], name: str, secrets: tuple[str, ...]
    ) -> None:
        """Tag an instance the provider could not tag at creation; on failure, destroy it, so
        nothing untagged (invisible to list_nodes) is left behind."""
        if "resource_type" in inspect.signature(driver.ex_create_tags).parameters:
            tag = functools.partial(driver.ex_create_tags, [node.id], "UserVm", tags)  # CloudStack
        else:
            tag = functools.partial(driver.ex_create_tags, node, tags)
        try:
            self._call(f"tag {name}", tag, secrets)
        except PoolError:
            try:
                self._call(f"destroy untagged {name}", functools.partial(driver.destroy_node, node))
            except PoolError as cleanup:
                raise PoolError(
                    self.name,
                    f"node {name}: tagging failed and instance {node.id} could not be "
                    f"destroyed ({cleanup}); remove it by hand",
                    temporary=False,
                ) from cleanup
            raise

    def _existing(self, spec: NodeSpec) -> NodeInfo | None:
        for node in self._nodes({f"tag:{TAG_NODE}": spec.name}):
            info = self._info(node)
            if info.cluster != spec.cluster:
                raise PoolError(
                    self.name,
                    f"node {spec.name} belongs to cluster {info.cluster!r}, not {spec.cluster!r}",
                )
            return info
        return None

    def _nodes(self, ec2_filters: Mapping[str, str]) -> list[Node]:
        """Live instances with crv tags matching the filters (server-side on EC2)."""
        driver = self._driver()
        listing: Callable[[], list[Node]] = driver.list_nodes
        if isinstance(driver, EC2NodeDriver):
            filters: Any = dict(ec2_filters)  # libcloud's annotation says str; it takes a dict
            listing = functools.partial(driver.list_nodes, ex_filters=filters)
        nodes = self._call("list instances", listing)
        wanted = {k[4:]: v for k, v in ec2_filters.items() if k.startswith("tag:")}
        result = []
        for node in nodes:
            tags = _node_tags(node)
            if TAG_NODE not in tags or TAG_CLUSTER not in tags or _gone(node):
                continue
            if all(tags.get(k) == v for k, v in wanted.items()):
                result.append(node)
        return sorted(result, key=lambda n: str(n.id))

    def _info(self, node: Node, default_tags: Mapping[str, str] | None = None) -> NodeInfo:
        tags = _node_tags(node) or dict(default_tags or {})
        public = [a for a in node.public_ips or [] if a]
        private = [a for a in node.private_ips or [] if a]
        first, second = (public, private) if self.options.address == "public" else (private, public)
        candidates = first or second
        address = candidates[0] if candidates else None
        extra = {
            "id": str(node.id),
            "provider_state": str(node.extra.get("status") or node.state),
            "public_ips": public,
            "private_ips": private,
        }
        for key in ("image_id", "instance_type", "availability"):
            if node.extra.get(key):
                extra[key] = str(node.extra[key])
        return NodeInfo(
            name=tags.get(TAG_NODE, node.name),
            cluster=tags.get(TAG_CLUSTER, ""),
            state=_STATES.get(node.state, "pending"),
            address=address,
            tags={k: v for k, v in tags.items() if k.startswith("crv-") or k == "Name"},
            extra=extra,
        )

    def _call(self, action: str, fn: Callable[[], R], secrets: tuple[str, ...] = ()) -> R:
        """`fn()`, its errors translated (`_translated`); asked again while the provider answers
        with a rate limit, within `self.backoff`'s attempts and deadline (module doc). The
        PoolError raised carries no library exception, nor their frames (module doc, Errors)."""
        try:
            return self._attempts(action, fn, secrets)
        except PoolError as exc:
            failure = exc
        failure.__cause__ = failure.__context__ = None
        raise failure.with_traceback(None)

    def _attempts(self, action: str, fn: Callable[[], R], secrets: tuple[str, ...]) -> R:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                with self._translated(action, secrets):
                    return fn()
            except _Throttled as exc:
                elapsed = time.monotonic() - started
                step = self.backoff.after(attempt, exc, elapsed)
                if step.wait is None:
                    raise PoolError(
                        self.name,
                        f"{exc.action}: rate limited by the provider ({exc.cause}); "
                        f"gave up: {step.why}",
                        delay=exc.delay,
                    ) from exc
                log.info("%s; attempt %d again in %.1f s", exc, attempt + 2, step.wait)
                time.sleep(step.wait)
                attempt += 1

    @contextmanager
    def _translated(self, action: str, secrets: tuple[str, ...] = ()) -> Iterator[None]:
        """libcloud and connection errors become PoolError, temporary when a retry can help."""
        secrets = (*secrets, *getattr(self._local, "credentials", ()))
        try:
            yield
        except PoolError:
            raise
        except InvalidCredsError as exc:
            raise PoolError(self.name, f"{action}: authentication failed") from exc
        except RateLimitReachedError as exc:  # a 429: libcloud keeps no more of the answer
            text = _one_line(str(exc), secrets)
            raise _Throttled(self.name, action, text, _retry_after(exc)) from exc
        except IdempotentParamError as exc:
            raise _TokenReused(self.name, f"{action}: client token reused") from exc
        except (BaseHTTPError, LibcloudError) as exc:
            code = getattr(exc, "code", None) or getattr(exc, "http_code", None)
            text = _one_line(
                str(getattr(exc, "message", None) or getattr(exc, "value", exc)), secrets
            )
            code = code if isinstance(code, int) else None
            raise self._classified(action, text, code, _retry_after(exc)) from exc
        except ssl.SSLError as exc:  # a certificate the client refuses: a retry will not help
            raise PoolError(self.name, f"{action}: TLS: {_one_line(str(exc), secrets)}") from exc
        except OSError as exc:  # requests' ConnectionError and Timeout are OSErrors too
            raise PoolError(
                self.name,
                f"{action}: cannot reach the provider ({type(exc).__name__})",
                temporary=True,
            ) from exc

    def _classified(
        self, action: str, text: str, code: int | None, asked: float | None = None
    ) -> PoolError:
        if _IMAGE_CODES.search(text):
            return PoolError(self.name, f"{action}: option image: {text}")
        if _SIZE_CODES.search(text):
            return PoolError(self.name, f"{action}: option size: {text}")
        if code in _THROTTLED_HTTP or _THROTTLED_CODES.search(text):
            return _Throttled(self.name, action, text, asked)
        if _TEMPORARY_CODES.search(text) or code in (500, 502, 504):
            return PoolError(self.name, f"{action}: {text}", temporary=True, delay=asked)
        if code in (401, 403) or _AUTH_CODES.search(text):
            return PoolError(self.name, f"{action}: authentication or permission: {text}")
        return PoolError(self.name, f"{action}: {text}")


class _Ref:
    """A network or security group named by id/name only (what the drivers read of them)."""

    def __init__(self, ref: str) -> None:
        self.id = ref
        self.name = ref

    def __repr__(self) -> str:
        return f"<{self.id}>"


def _node_tags(node: Node) -> dict[str, str]:
    extra = node.extra or {}
    tags = extra.get("tags") or extra.get("metadata") or {}
    if isinstance(tags, list):  # CloudStack: [{"key": ..., "value": ...}]
        tags = {t.get("key"): t.get("value") for t in tags if isinstance(t, dict)}
    return {str(k): str(v) for k, v in dict(tags).items()}


def _gone(node: Node) -> bool:
    status = (node.extra or {}).get("status")
    return bool(node.state == NodeState.TERMINATED or status in _GONE_EC2)
