"""The admin side of the service, as the CLI and the flows call it (mutual TLS, admin cert).

Transport failures, 5xx and 409 are temporary (the service restarting, a release whose
dependencies are a moment early); other refusals are permanent and carry the service's reason.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from crv.base.errors import CrvError
from crv.base.home import Home
from crv.service.models import CLUSTER_STATUS, ClusterStatus


class ServiceError(CrvError):
    def __init__(self, message: str, *, status: int | None = None, temporary: bool = False):
        self.status = status
        self.temporary = temporary
        super().__init__(message)


def _ssl(home: Home) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(home.ca_file))
    ctx.load_cert_chain(home.admin_cert, home.admin_key)
    return ctx


def _check(r: httpx.Response) -> Any:
    if r.status_code < 300:
        return r.json() if r.content else None
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    temporary = r.status_code >= 500 or r.status_code == 409
    raise ServiceError(
        f"service: {r.request.method} {r.request.url.path}: {r.status_code} {detail}",
        status=r.status_code,
        temporary=temporary,
    )


def _transport_error(e: httpx.TransportError, url: str) -> ServiceError:
    return ServiceError(f"service at {url} unreachable: {type(e).__name__}: {e}", temporary=True)


class AsyncService:
    """One kept-alive connection pool for a whole flow run."""

    def __init__(self, home: Home, url: str, *, connections: int = 20) -> None:
        self.url = url
        self._http = httpx.AsyncClient(
            base_url=url,
            verify=_ssl(home),
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = await self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self.url) from None
        return _check(r)

    async def put_cluster(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("PUT", f"/v1/admin/clusters/{name}", json=body)
        return result

    async def put_nodes(self, cluster: str, nodes: list[dict[str, Any]]) -> None:
        await self.call("PUT", f"/v1/admin/clusters/{cluster}/nodes", json={"nodes": nodes})

    async def tokens(self, cluster: str, nodes: list[str], ttl: float) -> dict[str, str]:
        body = {"nodes": nodes, "ttl": ttl}
        result = await self.call("POST", f"/v1/admin/clusters/{cluster}/tokens", json=body)
        return dict(result["tokens"])

    async def update_roles(self, cluster: str, updates: list[dict[str, Any]]) -> list[Any]:
        body = {"updates": updates}
        result = await self.call("POST", f"/v1/admin/clusters/{cluster}/roles", json=body)
        return list(result["results"])

    async def events(self, cluster: str, after: int, wait: float) -> dict[str, Any]:
        params = {"after": after, "wait": wait}
        result: dict[str, Any] = await self.call(
            "GET",
            f"/v1/admin/clusters/{cluster}/events",
            params=params,
            timeout=wait + 30,
        )
        return result

    async def attribute_readings(self, cluster: str, role: str, key: str) -> list[dict[str, Any]]:
        """[{node, value, age}] of a role's attribute over the cluster's nodes."""
        path = f"/v1/admin/clusters/{cluster}/attributes/{role}/{key}"
        found: list[dict[str, Any]] = (await self.call("GET", path))["values"]
        return found

    async def status(self, cluster: str) -> ClusterStatus:
        return CLUSTER_STATUS.validate_python(
            await self.call("GET", f"/v1/admin/clusters/{cluster}")
        )

    async def liveness(self, cluster: str) -> dict[str, dict[str, str | None]]:
        """{node: {last_seen, certificate_ends}} (ISO times or None)."""
        result = await self.call("GET", f"/v1/admin/clusters/{cluster}/liveness")
        return dict(result["nodes"])

    async def decisions(
        self, cluster: str, group: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The cluster's autoscaling decisions, newest first."""
        params: dict[str, Any] = {"limit": limit, **({"group": group} if group else {})}
        path = f"/v1/admin/clusters/{cluster}/decisions"
        return list((await self.call("GET", path, params=params))["decisions"])

    async def add_decision(self, cluster: str, row: dict[str, Any]) -> int:
        path = f"/v1/admin/clusters/{cluster}/decisions"
        return int((await self.call("POST", path, json=row))["seq"])

    async def set_outcome(self, cluster: str, seq: int, outcome: str) -> None:
        path = f"/v1/admin/clusters/{cluster}/decisions/{seq}"
        await self.call("PATCH", path, json={"outcome": outcome[:4096]})

    async def autoscaling(self) -> list[dict[str, Any]]:
        """The autoscaling settings of every cluster that has one."""
        return list((await self.call("GET", "/v1/admin/autoscaling"))["clusters"])

    async def put_autoscaling(self, cluster: str, enabled: bool, every: float) -> None:
        body = {"enabled": enabled, "every": every}
        await self.call("PUT", f"/v1/admin/clusters/{cluster}/autoscaling", json=body)

    async def guards(self, cluster: str) -> dict[str, Any]:
        """The cluster's guards and their state (every key None when unset)."""
        path = f"/v1/admin/clusters/{cluster}/autoscaling/guards"
        return dict(await self.call("GET", path))

    async def put_guard_state(
        self, cluster: str, work_seen: float | None, notices: dict[str, Any]
    ) -> None:
        """What the autoscale flow keeps between runs for the guards (crv.engine.guards)."""
        body = {"work_seen": work_seen, "notices": notices}
        await self.call("PUT", f"/v1/admin/clusters/{cluster}/autoscaling/state", json=body)

    async def usage(self, cluster: str) -> dict[str, Any]:
        """{since, until, node_hours, nodes}: the cluster's usage ledger today (UTC) until now."""
        result: dict[str, Any] = await self.call("GET", f"/v1/admin/clusters/{cluster}/usage")
        return result

    async def quarantine(self, cluster: str, node: str, reason: str) -> list[str]:
        result = await self.call(
            "POST",
            f"/v1/admin/clusters/{cluster}/nodes/{node}/quarantine",
            json={"reason": reason[:4000]},
        )
        return list(result["revoked"])

    async def delete_node(self, cluster: str, node: str) -> list[str]:
        result = await self.call("DELETE", f"/v1/admin/clusters/{cluster}/nodes/{node}")
        return list(result["revoked"])

    async def delete_cluster(self, cluster: str) -> list[str]:
        result = await self.call("DELETE", f"/v1/admin/clusters/{cluster}")
        return list(result["revoked"])


class Service:
    """The blocking twin for the CLI (status, list, destroy)."""

    def __init__(self, home: Home, url: str) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, verify=_ssl(home), timeout=30.0)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self.url) from None
        return _check(r)

    def status(self, cluster: str) -> ClusterStatus | None:
        try:
            result = self.call("GET", f"/v1/admin/clusters/{cluster}")
        except ServiceError as e:
            if e.status == 404:
                return None
            raise
        return CLUSTER_STATUS.validate_python(result)

    def clusters(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/admin/clusters")["clusters"])

    def autoscaling(self, cluster: str | None = None) -> list[dict[str, Any]]:
        """Autoscaling settings: of every cluster that has one, or of one cluster."""
        if cluster is None:
            return list(self.call("GET", "/v1/admin/autoscaling")["clusters"])
        return [self.call("GET", f"/v1/admin/clusters/{cluster}/autoscaling")]

    def put_autoscaling(self, cluster: str, enabled: bool, every: float) -> None:
        body = {"enabled": enabled, "every": every}
        self.call("PUT", f"/v1/admin/clusters/{cluster}/autoscaling", json=body)

    def guards(self, cluster: str) -> dict[str, Any]:
        """The cluster's guards and their state (every key None when unset)."""
        return dict(self.call("GET", f"/v1/admin/clusters/{cluster}/autoscaling/guards"))

    def put_guards(self, cluster: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the guards in `changes` (None or 0 clears one); every guard after."""
        path = f"/v1/admin/clusters/{cluster}/autoscaling/guards"
        return dict(self.call("PATCH", path, json=changes))

    def usage(
        self, cluster: str, since: float | None = None, until: float | None = None
    ) -> dict[str, Any]:
        """{since, until, node_hours, nodes}: the cluster's usage ledger within [since, until]
        (default: today, UTC, until now); the ledger outlives the cluster."""
        params = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
        return dict(self.call("GET", f"/v1/admin/clusters/{cluster}/usage", params=params))

    def decisions(self, cluster: str, limit: int = 50) -> list[dict[str, Any]]:
        path = f"/v1/admin/clusters/{cluster}/decisions"
        return list(self.call("GET", path, params={"limit": limit})["decisions"])

    def delete_cluster(self, cluster: str) -> list[str]:
        return list(self.call("DELETE", f"/v1/admin/clusters/{cluster}")["revoked"])

    def create_pairing(self, cluster: str, group: str, roles: list[str], ttl: float) -> Any:
        """{id, pin, expires_at, ca_sha256}: a one-time PIN for a machine to join `group`."""
        body = {"group": group, "roles": roles, "ttl": ttl}
        return self.call("POST", f"/v1/admin/clusters/{cluster}/pairings", json=body)

    def pairing(self, ident: str) -> dict[str, Any]:
        """{id, cluster, group, state (open, paired, expired, locked), node, ...}."""
        return dict(self.call("GET", f"/v1/admin/pairings/{ident}"))
