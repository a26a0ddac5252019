"""The HTTP API and the dashboard, as ``tierflow serve`` runs them (FastAPI).

    POST /runs            queue a run: {"workflow": NAME, "inputs": {...}} → 201 {"run_id": ...}
    GET  /runs            recent runs (?workflow=&status=&limit=), as ``tierflow runs --json``
    GET  /runs/{run_id}   one run with its steps and ledger rows, as ``tierflow show --json``
    GET  /spend           ?by=&since=&until=&top=&include_eval=&workflow=&step=&model=&tag=,
                          as ``tierflow spend --json``
    GET  /metrics         the ledger as Prometheus counters (``orchestrator.metrics``)
    GET  /openapi.json    the OpenAPI description of the routes above
    GET  /                the dashboard (HTML); ?days= or ?since=&until=
    GET  /run/{run_id}    one run's page (HTML): every attempt

Every route needs the token (``TIERFLOW_API_TOKEN``). API clients send
``Authorization: Bearer TOKEN``. A browser opens ``/?token=TOKEN`` once: the
server answers with a cookie (HttpOnly, SameSite=Strict, for
``COOKIE_MAX_AGE_S``) and redirects to ``/``, so the token leaves the address
bar. The cookie is signed with a key derived from the token and a salt drawn
when the server starts: it is not the token, it is new at each sign-in, and a
new token or a restart makes every old one worthless. The cookie opens the
dashboard only; the API takes the bearer header alone, so a page on another
site cannot queue runs.

Limits: a request body of at most 1 MiB (``guard.MAX_BODY_BYTES``), a run's
inputs of at most ``MAX_INPUTS_BYTES`` as JSON, nested at most
``MAX_INPUTS_DEPTH`` deep; strings must be valid Unicode and numbers finite.
``GET /runs`` leaves out a run's inputs, outputs or error over
``LIST_VALUE_BYTES`` and names them in ``omitted``; ``GET /runs/{run_id}``
returns them whole. Every response carries the security headers of
``security_headers``. Bad input is 400, 404, 413 or 422 with
``{"detail": ...}``; a broker that refuses is 503.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jinja2 import Environment
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator import budgets, reports
from orchestrator.encoding import dumps
from orchestrator.errors import RunError, UserError
from orchestrator.loading import suggest
from orchestrator.settings import NAME_PATTERN, Settings
from orchestrator.store import Store
from orchestrator.web.guard import Guard, check_json, json_depth, json_size

if TYPE_CHECKING:
    from orchestrator.client import Client

COOKIE = "tierflow_dashboard"
MAX_DAYS_SHOWN = 366  # the dashboard's longest date range
COOKIE_MAX_AGE_S = 8 * 3600  # a working day; then the browser opens /?token= again
MAX_INPUTS_BYTES = 256 * 1024
MAX_INPUTS_DEPTH = 32
LIST_VALUE_BYTES = 4096
_TOKEN_PARAM = re.compile(r"(token=)[^&\s]*")
_bearer = HTTPBearer(auto_error=False, description="TIERFLOW_API_TOKEN")


@dataclass(frozen=True)
class Service:
    """What the routes share: configuration, the store, the token, the page templates,
    the workflows folder and the key that signs dashboard cookies."""

    settings: Settings
    client: Client
    token: bytes
    templates: Environment
    workflows: Path
    cookie_key: bytes

    @property
    def store(self) -> Store:
        return self.client.store

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token)

    def cookie_value(self, *, issued_at: float | None = None) -> str:
        """A new signed cookie, ``ISSUED.NONCE.MAC``: never the token, never the same twice."""
        issued = int(time.time() if issued_at is None else issued_at)
        claim = f"{issued}.{secrets.token_hex(8)}"
        return f"{claim}.{self._sign(claim)}"

    def cookie_opens(self, value: str) -> bool:
        """Whether ``value`` is a cookie this server signed less than ``COOKIE_MAX_AGE_S`` ago."""
        claim, _, mac = value.rpartition(".")
        issued = claim.partition(".")[0]
        if not hmac.compare_digest(mac.encode(), self._sign(claim).encode()):
            return False
        return issued.isdigit() and 0 <= time.time() - int(issued) < COOKIE_MAX_AGE_S

    def _sign(self, claim: str) -> str:
        return hmac.new(self.cookie_key, claim.encode(), hashlib.sha256).hexdigest()


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str = Field(
        max_length=100,
        pattern=NAME_PATTERN,
        description="The name of a workflow in the project's workflows folder.",
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description=f"At most {MAX_INPUTS_BYTES // 1024} KiB as JSON, nested at most"
        f" {MAX_INPUTS_DEPTH} deep.",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description='The run\'s tags, {"team": "growth"}: spend groups and filters by them.',
    )

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        check_json(data)  # before any field is read: no surrogate reaches a message
        return data

    @field_validator("inputs")
    @classmethod
    def _shallow(cls, inputs: dict[str, Any]) -> dict[str, Any]:
        if json_depth(inputs) > MAX_INPUTS_DEPTH + 1:  # + the inputs object itself
            raise ValueError(f"nested deeper than {MAX_INPUTS_DEPTH} levels")
        return inputs


def security_headers(*, style_sources: list[str]) -> dict[str, str]:
    """The headers of every response: no sniffing, framing, referrer or caching, and a
    policy that allows the dashboard's own stylesheet and nothing else (no script,
    no image, no form, no frame, from anywhere)."""
    policy = "; ".join(
        [
            "default-src 'none'",
            f"style-src {' '.join(style_sources)}" if style_sources else "style-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


class JSONText(Response):
    """A body already encoded by ``orchestrator.encoding``, exactly as the CLI prints it."""

    media_type = "application/json"


def create_app(settings: Settings, *, token: str) -> FastAPI:
    """The application; it opens the configured store and closes it at shutdown."""
    from orchestrator.client import Client
    from orchestrator.web.dashboard import environment, style_sources

    if not token:
        raise UserError("TIERFLOW_API_TOKEN is empty: set it to a secret the clients share")
    templates = environment()
    service = Service(
        settings=settings,
        client=Client(settings=settings),
        token=token.encode(),
        templates=templates,
        workflows=settings.root / settings.config.workflows_dir,
        # Drawn at each start: a restart signs everyone out, a new token too.
        cookie_key=hmac.new(token.encode(), secrets.token_bytes(32), hashlib.sha256).digest(),
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
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_middleware(Guard, headers=security_headers(style_sources=style_sources(templates)))

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
    from orchestrator.spec import load_workflow

    size = json_size(body.inputs)
    if size > MAX_INPUTS_BYTES:
        raise HTTPException(
            status_code=413,
            detail=f"inputs are {size} bytes as JSON, over the {MAX_INPUTS_BYTES // 1024} KiB limit",
        )
    service = service_of(request)
    loaded = load_workflow(_workflow_file(service, body.workflow), service.settings)
    run_id = service.client.enqueue_loaded(loaded, body.inputs, tags=body.tags)
    return {"run_id": run_id, "status": "queued"}


def _workflow_file(service: Service, name: str) -> Path:
    """``NAME.yaml`` in the workflows folder, and nowhere else: the name is a name (its
    pattern has no dot and no slash), and the server's working directory plays no part."""
    path = service.workflows / f"{name}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in service.workflows.glob("*.yaml"))
    folder = service.settings.config.workflows_dir
    raise HTTPException(
        status_code=404, detail=f"no workflow '{name}' in {folder}/{suggest(name, known)}"
    )


@api.get("/runs", response_class=JSONText)
def list_runs(
    request: Request,
    workflow: str | None = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> JSONText:
    """Recent runs, newest first; large values are left out (see ``listed``)."""
    rows = service_of(request).store.runs(workflow=workflow, status=status, limit=limit)
    return JSONText(dumps([listed(row) for row in rows]))


def listed(row: dict[str, Any]) -> dict[str, Any]:
    """A run as the list shows it: its inputs, outputs or error, if over
    ``LIST_VALUE_BYTES`` as JSON, become null, and ``omitted`` gives their sizes."""
    omitted = {}
    for field in ("inputs", "outputs", "error"):
        size = json_size(row[field])
        if size > LIST_VALUE_BYTES:
            omitted[field] = size
    if not omitted:
        return row
    return {**row, **dict.fromkeys(omitted), "omitted": omitted}


@api.get("/runs/{run_id}", response_class=JSONText)
def get_run(run_id: str, request: Request) -> JSONText:
    """A run (or a unique id prefix) with its steps and ledger rows."""
    found = service_of(request).store.run(run_id)
    if found is None:
        raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
    return JSONText(dumps(found))


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # Run this step and every step that depends on it again, too.
    from_step: str | None = Field(default=None, alias="from", max_length=100)


@api.post("/runs/{run_id}/retry", status_code=201)
def retry_run(run_id: str, request: Request, body: RetryRequest | None = None) -> dict[str, str]:
    """Queue a retry of an ended run, as ``tierflow retry --enqueue`` does: a new run
    that reuses every step that finished and runs the rest."""
    service = service_of(request)
    if service.store.find_run_id(run_id) is None:
        raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
    from_step = body.from_step if body is not None else None
    return {
        "run_id": service.client.retry(run_id, from_step=from_step),
        "retry_of": service.store.find_run_id(run_id) or run_id,
        "status": "queued",
    }


class ApprovalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    approved: bool
    note: str | None = Field(default=None, max_length=2000)
    by: str = Field(default="api", min_length=1, max_length=200)  # who decides


@api.post("/runs/{run_id}/steps/{step_id}/approval", status_code=201)
def post_approval(
    run_id: str, step_id: str, body: ApprovalRequest, request: Request
) -> dict[str, Any]:
    """A person's decision on a waiting approval step, as ``tierflow approve`` records
    it: approved, the run is queued for a worker; rejected, it fails with the note."""
    service = service_of(request)
    if service.store.find_run_id(run_id) is None:
        raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
    found, status = service.client.decide(
        run_id, step_id, approved=body.approved, note=body.note, by=body.by
    )
    return {"run_id": found, "step_id": step_id, "approved": body.approved, "status": status}


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    good: bool
    note: str | None = Field(default=None, max_length=2000)


@api.post("/runs/{run_id}/steps/{step_id}/feedback", status_code=201)
def post_feedback(
    run_id: str, step_id: str, body: FeedbackRequest, request: Request
) -> dict[str, Any]:
    """A person's label on a step's answer, as ``tierflow feedback`` records it."""
    store = service_of(request).store
    found = store.find_run_id(run_id)
    if found is None:
        raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
    store.add_feedback(found, step_id, good=body.good, note=body.note)  # UserError: 400
    return {"run_id": found, "step_id": step_id, "good": body.good}


@api.get("/metrics", response_class=PlainTextResponse)
def get_metrics(request: Request) -> PlainTextResponse:
    """The ledger as Prometheus counters by workflow, tier and model (``orchestrator.metrics``)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from orchestrator.metrics import exposition

    body = exposition(service_of(request).store.engine)
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)


@api.get("/spend", response_class=JSONText)
def get_spend(
    request: Request,
    by: Annotated[
        str | None,
        Query(
            description="workflow, version, step, tier, model, day or tag:KEY; or several,"
            " comma-joined"
        ),
    ] = None,
    since: Annotated[str | None, Query(description="YYYY-MM-DD, or 30d")] = None,
    until: Annotated[str | None, Query(description="YYYY-MM-DD, inclusive")] = None,
    top: Annotated[int | None, Query(ge=1)] = None,
    include_eval: Annotated[bool, Query(description="count tierflow eval runs too")] = False,
    workflow: Annotated[str | None, Query(description="only this workflow's calls")] = None,
    step: Annotated[str | None, Query(description="only this step's calls")] = None,
    model: Annotated[str | None, Query(description="only this model's calls")] = None,
    tag: Annotated[
        list[str] | None, Query(description="key=value: only runs with this tag; repeatable")
    ] = None,
) -> JSONText:
    """Spend grouped as ``tierflow spend --json`` prints it."""
    service = service_of(request)
    pairs = reports.tag_pairs(tag)  # a UserError is a 400, as every route's
    found = reports.report(
        service.store.engine,
        by=by,
        since=_day("since", since),
        until=_day("until", until, end=True),
        top=top,
        budgets=budgets.status(service.settings, service.store),
        include_eval=include_eval,
        only=reports.Only(workflow, step, model, pairs),
    )
    return JSONText(dumps(found.as_dict()))


def _day(name: str, text: str | None, *, end: bool = False) -> date | None:
    try:
        return reports.parse_when(text, end=end)
    except (UserError, ValueError, OverflowError):  # a date past year 9999, or before 1
        raise HTTPException(
            status_code=400,
            detail=f"{name} {text!r}: expected a date YYYY-MM-DD or a number of days like 30d,"
            " within the years 1 to 9999",
        ) from None


@pages.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard(
    request: Request,
    token: str | None = None,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
    since: Annotated[date | None, Query(description="first day shown, YYYY-MM-DD")] = None,
    until: Annotated[date | None, Query(description="last day shown, YYYY-MM-DD")] = None,
) -> Response:
    service = service_of(request)
    if token is not None:
        if not service.token_matches(token):
            return _login_page(status_code=401)
        response = RedirectResponse("/" if days == 30 else f"/?days={days}", status_code=303)
        response.set_cookie(
            COOKIE,
            service.cookie_value(),
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            path="/",
        )
        return response
    if not service.cookie_opens(request.cookies.get(COOKIE, "")):
        return _login_page(status_code=401)
    from orchestrator.web.dashboard import render

    last = until or datetime.now(UTC).date()
    first = since or last - timedelta(days=days - 1)
    if first > last or (last - first).days >= MAX_DAYS_SHOWN:
        raise HTTPException(
            status_code=400,
            detail=f"since {first} to until {last}: a range of 1 to {MAX_DAYS_SHOWN} days",
        )
    ladder = list(service.settings.config.tiers)
    in_force = budgets.status(service.settings, service.store)
    page = render(
        service.templates,
        service.store,
        ladder=ladder,
        since=first,
        until=last,
        budgets=in_force,
    )
    return HTMLResponse(page)


@pages.get("/run/{run_id}", response_class=HTMLResponse, include_in_schema=False)
def run_page(request: Request, run_id: str) -> Response:
    """One run's page: every attempt with its tier, reason, tokens, cost and latency."""
    service = service_of(request)
    if not service.cookie_opens(request.cookies.get(COOKIE, "")):
        return _login_page(status_code=401)
    from orchestrator.web.dashboard import render_run

    page = render_run(service.templates, service.store, run_id)
    if page is None:
        raise HTTPException(status_code=404, detail=f"no run {run_id!r}")
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


def _invalid_request(request: Request, exc: Exception) -> Response:
    """FastAPI's 422, without echoing the input: it may be a megabyte, and text that
    cannot be encoded would turn the answer into a 500."""
    assert isinstance(exc, RequestValidationError)
    found = [
        {"type": error["type"], "loc": list(error["loc"]), "msg": error["msg"]}
        for error in exc.errors()
    ]
    return JSONText(dumps({"detail": found}), status_code=422)


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
        bound_host, bound_port = listener.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        sys.stderr.write(
            f"tierflow: dashboard and API at http://{shown}:{bound_port}/"
            " (open /?token=TOKEN once in a browser; API clients send it as a bearer token)\n"
        )
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
