"""The crv service: enrolment, the blackboard, recipe delivery, agent reports, the admin side.

`create_app` puts together the routers, one per caller (crv/service/routes/: public, node,
admin), the state they share (crv/service/state.py), the wire models (crv/service/models.py),
a body-size limit and the answers to refused requests. Long polls wait on in-process
notifications, not on timers, so an agent hears about a release within milliseconds and an idle
one costs nothing.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crv.service.pki import CertificateAuthority
from crv.service.routes import admin, node, public
from crv.service.state import ServiceState
from crv.service.store import REJOIN_GRACE, Store, StoreError
from crv.service.wakeups import Bus

log = logging.getLogger("crv.service")

MAX_BODY = 1 << 20
MAX_ADMIN_BODY = 16 << 20
NODE_CERT_TTL = timedelta(hours=24)


class BodyLimit:
    """Refuse oversized bodies before they are read whole (413), chunked ones included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_ADMIN_BODY if scope["path"].startswith("/v1/admin/") else MAX_BODY
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await _too_large(send, limit)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # raised inside FastAPI's body reading: an HTTPException is passed through
                raise HTTPException(413, f"request body over {limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail": "request body over {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    store: Store,
    ca: CertificateAuthority,
    *,
    node_ttl: timedelta = NODE_CERT_TTL,
    rejoin_grace: timedelta = REJOIN_GRACE,
    threads: int = 1,
    bus: str | None = None,
    processes: int = 1,
) -> FastAPI:
    """The service's app. `threads`: the store's worker threads; `bus`: the PostgreSQL to
    tell the other service processes through (crv.service.wakeups), none with one process."""
    state = ServiceState(store, ca, node_ttl, rejoin_grace, threads=threads)
    state.processes = processes

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if bus is not None:
            state.bus = Bus(bus, state.deliver)
            await state.bus.start()
        try:
            yield
        finally:
            if state.bus is not None:
                await state.bus.stop()
            state.executor.shutdown(wait=True)
            store.engine.dispose()

    app = FastAPI(title="crv service", version="1", lifespan=lifespan, docs_url=None)
    app.state.crv = state
    app.add_middleware(BodyLimit)
    app.add_exception_handler(StoreError, _store_error)  # type: ignore[arg-type]
    app.add_exception_handler(sa.exc.OperationalError, _own_state)
    app.add_exception_handler(OSError, _own_state)
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    for routes in (public, node, admin):
        app.include_router(routes.router)
    return app


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    if exc.status in (401, 403):
        log.warning("refused %s %s: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": "1"} if exc.status == 409 else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


async def _own_state(request: Request, exc: Exception) -> JSONResponse:
    """crv's own database or disk failed under a request (locked by another process, full,
    PostgreSQL gone: FAULTS F15): 503 saying so in one line, which the caller may try again;
    the transaction was rolled back, so nothing half-written stays."""
    cause = getattr(exc, "orig", None) or exc
    what = " ".join(str(cause).split())[:300] or type(cause).__name__
    log.error("%s %s: crv's state: %s", request.method, request.url.path, what)
    return JSONResponse(
        {"detail": f"crv's state database or disk failed: {what}"},
        status_code=503,
        headers={"Retry-After": "2"},
    )


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400, except a body field over its length (characters, items): 413, as for a body
    or a value over its size in bytes, so that one limit gets one answer however it is
    counted."""
    errors = exc.errors()
    too_long = [
        e
        for e in errors
        if e.get("type") in ("string_too_long", "too_long") and e.get("loc", ("",))[0] == "body"
    ]
    first = too_long[0] if too_long else errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse(
        {"detail": f"{where}: {first.get('msg', 'invalid request')}"},
        status_code=413 if too_long else 400,
    )


__all__ = ["create_app"]
