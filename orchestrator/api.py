"""The HTTP API and the dashboard, as ``tierflow serve`` runs them (FastAPI).

    POST /runs            queue a run: {"workflow": NAME, "inputs": {...}} → 201 {"run_id": ...}
    GET  /runs            recent runs (?workflow=&status=&limit=), as ``tierflow runs --json``
    GET  /runs/{run_id}   one run with its steps and ledger rows, as ``tierflow show --json``
    GET  /spend           ?by=&since=&until=&top=, as ``tierflow spend --json``
    GET  /openapi.json    the OpenAPI description of the routes above
    GET  /                the dashboard (HTML)

Every route needs the token (``TIERFLOW_API_TOKEN``). API clients send
``Authorization: Bearer TOKEN``. A browser opens ``/?token=TOKEN`` once: the
server answers with a cookie (HttpOnly, SameSite=Strict) holding a value
derived from the token, not the token, and redirects to ``/``, so the token
leaves the address bar. The cookie opens the dashboard only; the API takes the
bearer header alone, so a page on another site cannot queue runs. Bad input
is 400 or 422 with ``{"detail": message}``; a broker that refuses is 503.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jinja2 import Environment
from pydantic import BaseModel, ConfigDict, Field

from orchestrator import budgets, reports
from orchestrator.encoding import dumps
from orchestrator.errors import RunError, UserError
from orchestrator.settings import NAME_PATTERN, Settings
from orchestrator.store import Store

if TYPE_CHECKING:
    from orchestrator.client import Client

COOKIE = "tierflow_dashboard"
_TOKEN_PARAM = re.compile(r"(token=)[^&\s]*")
_bearer = HTTPBearer(auto_error=False, description="TIERFLOW_API_TOKEN")


@dataclass(frozen=True)
class Service:
    """What the routes share: configuration, the store, the token and the page templates."""

    settings: Settings
    client: Client
    token: bytes
    templates: Environment

    @property
    def store(self) -> Store:
        return self.client.store

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token)

    def cookie_value(self) -> str:
        """A value derived from the token: a stolen cookie is not the API token."""
        return hmac.new(self.token, b"tierflow dashboard", hashlib.sha256).hexdigest()


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str = Field(max_length=100, pattern=NAME_PATTERN, description="A workflow name.")
    inputs: dict[str, Any] = Field(default_factory=dict)


class JSONText(Response):
    """A body already encoded by ``orchestrator.encoding``, exactly as the CLI prints it."""

    media_type = "application/json"


def create_app(settings: Settings, *, token: str) -> FastAPI:
    """The application; it opens the configured store and closes it at shutdown."""
    from orchestrator.client import Client
    from orchestrator.web.dashboard import environment

    if not token:
        raise UserError("TIERFLOW_API_TOKEN is empty: set it to a secret the clients share")
    service = Service(
        settings=settings,
        client=Client(settings=settings),
        token=token.encode(),
        templates=environment(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.client.close()

    app = FastAPI(
        title="tierflow",
        summary="Queue workflow runs, read their state and the spend ledger.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN; we serve none
        redoc_url=None,
        openapi_url=None,  # served below, behind the token
    )
    app.state.service = service
    app.include_router(api)
    app.include_router(pages)
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(RunError, _run_error)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_bearer)])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    return app


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def require_bearer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None or not service_of(request).token_matches(credentials.credentials):
        raise HTTPException(
            status_code=401,
            detail="send Authorization: Bearer <the server's TIERFLOW_API_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


api = APIRouter(dependencies=[Depends(require_bearer)])
pages = APIRouter()


@api.post("/runs", status_code=201)
def create_run(body: RunRequest, request: Request) -> dict[str, str]:
    """Queue a run for a worker, as ``tierflow enqueue`` does; bad inputs are refused first."""
    from orchestrator.spec import find_workflow, load_workflow

    service = service_of(request)
    settings = service.settings
    loaded = load_workflow(find_workflow(body.workflow, settings), settings)
    return {"run_id": service.client.enqueue_loaded(loaded, body.inputs), "status": "queued"}


@api.get("/runs", response_class=JSONText)
def list_runs(
    request: Request,
    workflow: str | None = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> JSONText:
    """Recent runs, newest first."""
    rows = service_of(request).store.runs(workflow=workflow, status=status, limit=limit)
    return JSONText(dumps(rows))


@api.get("/runs/{run_id}", response_class=JSONText)
def get_run(run_id: str, request: Request) -> JSONText:
    """A run (or a unique id prefix) with its steps and ledger rows."""
    found = service_of(request).store.run(run_id)
    if found is None:
        raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
    return JSONText(dumps(found))


@api.get("/spend", response_class=JSONText)
def get_spend(
    request: Request,
    by: Annotated[
        str | None,
        Query(description="workflow, version, step, tier, model or day; or several, comma-joined"),
    ] = None,
    since: Annotated[str | None, Query(description="YYYY-MM-DD, or 30d")] = None,
    until: Annotated[str | None, Query(description="YYYY-MM-DD, inclusive")] = None,
    top: Annotated[int | None, Query(ge=1)] = None,
) -> JSONText:
    """Spend grouped as ``tierflow spend --json`` prints it."""
    service = service_of(request)
    found = reports.report(
        service.store.engine,
        by=by,
        since=reports.parse_when(since),
        until=reports.parse_when(until, end=True),
        top=top,
        budgets=budgets.status(service.settings, service.store),
    )
    return JSONText(dumps(found.as_dict()))


@pages.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard(
    request: Request,
    token: str | None = None,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> Response:
    service = service_of(request)
    if token is not None:
        if not service.token_matches(token):
            return _login_page(status_code=401)
        response = RedirectResponse("/" if days == 30 else f"/?days={days}", status_code=303)
        response.set_cookie(
            COOKIE, service.cookie_value(), httponly=True, samesite="strict", path="/"
        )
        return response
    cookie = request.cookies.get(COOKIE, "")
    if not hmac.compare_digest(cookie.encode(), service.cookie_value().encode()):
        return _login_page(status_code=401)
    from orchestrator.web.dashboard import render

    ladder = list(service.settings.config.tiers)
    in_force = budgets.status(service.settings, service.store)
    page = render(service.templates, service.store, ladder=ladder, days=days, budgets=in_force)
    return HTMLResponse(page)


def _login_page(*, status_code: int) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><title>tierflow</title><p>Open <code>/?token=…</code> with the"
        " server's TIERFLOW_API_TOKEN once; a cookie keeps you signed in.</p>",
        status_code=status_code,
    )


def _user_error(request: Request, exc: Exception) -> Response:
    return JSONText(dumps({"detail": str(exc)}), status_code=400)


def _run_error(request: Request, exc: Exception) -> Response:
    return JSONText(dumps({"detail": str(exc)}), status_code=503)


def serve(settings: Settings, *, token: str, host: str, port: int) -> None:
    """Run the application with uvicorn until interrupted.

    The socket is bound here first, so an address in use or an unknown host is
    one clear ``UserError`` before anything else starts.
    """
    import logging
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    with listener:
        server = uvicorn.Server(uvicorn.Config(create_app(settings, token=token)))
        # Config set up uvicorn's loggers; the access log must not keep a ?token=.
        logging.getLogger("uvicorn.access").addFilter(redact_tokens)
        server.run(sockets=[listener])


def redact_tokens(record: Any) -> bool:
    """A logging filter: ``token=…`` in a logged request line becomes ``token=***``."""
    if isinstance(record.args, tuple):
        record.args = tuple(
            _TOKEN_PARAM.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args
        )
    return True
