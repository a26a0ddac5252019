"""tierflow.yaml and the environment, validated into one ``Settings`` object.

The file is ``--config PATH``, else ``$TIERFLOW_CONFIG``, else ``./tierflow.yaml``.
With none of those, a built-in configuration runs everything on the embedded
model. Relative paths (the SQLite file, ``agents_dir``) are relative to the
configuration file's folder, so a project behaves the same from any directory.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator import locality, pricing
from orchestrator.errors import SpecError, UserError
from orchestrator.loading import YamlDoc, read_yaml, suggest, validate

# What a failed attempt may be; escalation.on lists those that climb the ladder.
Outcome = Literal["error", "timeout", "invalid_output", "low_confidence", "truncated"]
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"

# Bounds a configuration must keep, so that what validates also runs. Money is
# stored as integer pico-dollars in 64 bits (at most about $9.2 million a
# value), so prices and budgets stay far inside that.
MAX_TIMEOUT_S = 86_400.0  # a model call's timeout and a lease's TTL: one day at most
MAX_PRICE_USD = Decimal(10_000)  # per 1M tokens, or per hour of a local machine
MIN_BUDGET_USD = Decimal("0.000001")  # one micro-dollar; below it no call would fit
MAX_BUDGET_USD = Decimal(1_000_000)
DATABASE_KINDS = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg")
MAX_CALLS = 100_000  # max_steps: steps and for_each items that call a model, in one run
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "memory", "filesystem")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One model of a tier: where it lives and how to reach it. Keys come from the environment."""

    model: str = Field(pattern=r"^[a-z0-9_-]+/.+$")
    api_base: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=60.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    stream: bool = False  # ask for streamed answers; usage is recorded the same way
    # How the model takes a step's output schema: the schema itself, any JSON
    # object, or nothing. A server that refuses one form gets the next.
    structured: Literal["json_schema", "json_object", "none"] = "json_schema"
    # litellm's own stand-in for a provider: every request gets this text back and
    # nothing leaves the machine. Only on a tier marked simulated: true (a demo or a
    # test), so that a real tier can never answer with canned text.
    mock_response: str | None = Field(default=None, min_length=1, max_length=10_000)

    @property
    def provider(self) -> str:
        return pricing.provider_of(self.model)


QUEUE_PATTERN = r"^[A-Za-z0-9_.-]+$"


class Tier(_Strict):
    models: list[ModelEntry] = Field(min_length=1)
    local: bool = False
    # Workers started with `--tiers NAME` consume this tier's queue; without
    # one, the tier's steps go to the configuration's default queue.
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)
    # Served by a stand-in for a real model (a test server, or mock_response):
    # its calls are marked in the ledger, and every table that shows their
    # figures says "simulated".
    simulated: bool = False

    @field_validator("models", mode="before")
    @classmethod
    def _names_to_entries(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _mocks_are_simulated(self) -> Tier:
        for entry in self.models:
            mocked = entry.mock_response is not None
            if mocked and entry.provider in ("ollama", "llamacpp"):
                raise ValueError(f"{entry.model}: mock_response is litellm's; this model is not")
            if mocked and not self.simulated:
                raise ValueError(
                    f"{entry.model} answers with mock_response, so the tier must say simulated: true"
                )
            if self.simulated and not mocked and not _on_loopback(entry.api_base):
                raise ValueError(
                    f"{entry.model}: a simulated tier's models answer with mock_response or"
                    " from a test server on loopback (api_base), so that nobody is billed"
                )
        return self


def _on_loopback(url: str | None) -> bool:
    return url is not None and locality.is_loopback_url(url)


class PriceOverride(_Strict):
    """USD per 1M tokens, and for a local model the machine's USD per hour if it has one."""

    input: Decimal = Field(default=Decimal(0), ge=0, le=MAX_PRICE_USD, allow_inf_nan=False)
    output: Decimal = Field(default=Decimal(0), ge=0, le=MAX_PRICE_USD, allow_inf_nan=False)
    per_hour: Decimal = Field(default=Decimal(0), ge=0, le=MAX_PRICE_USD, allow_inf_nan=False)


class Budget(_Strict):
    """Spend limits in USD: per UTC day and per calendar month (UTC)."""

    daily_usd: Decimal | None = Field(
        default=None, ge=MIN_BUDGET_USD, le=MAX_BUDGET_USD, allow_inf_nan=False
    )
    monthly_usd: Decimal | None = Field(
        default=None, ge=MIN_BUDGET_USD, le=MAX_BUDGET_USD, allow_inf_nan=False
    )


class Escalation(_Strict):
    on: list[Outcome] = ["error", "timeout", "invalid_output", "low_confidence"]
    max_attempts: int = Field(default=3, ge=1, le=20)


class Privacy(_Strict):
    """Personal data found in a rendered prompt pins the call to local tiers
    (see ``orchestrator.privacy``); ``detect: []`` and no patterns turns it off."""

    detect: list[Literal["email", "phone", "card", "iban"]] = ["email", "phone", "card", "iban"]
    # More kinds: a name and a regular expression (Python's ``re``) that finds one.
    patterns: dict[Annotated[str, Field(pattern=NAME_PATTERN)], str] = {}
    # Phone numbers written without a +country prefix are read as this region's
    # (ISO 3166 code); None finds only numbers written internationally.
    region: str | None = Field(default="US", pattern=r"^[A-Z]{2}$")

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern '{name}' is not a regular expression: {exc}") from None
        return patterns

    @property
    def on(self) -> bool:
        return bool(self.detect or self.patterns)

    def compiled(self) -> dict[str, re.Pattern[str]]:
        return _compiled_patterns(tuple(self.patterns.items()))


@functools.cache
def _compiled_patterns(patterns: tuple[tuple[str, str], ...]) -> dict[str, re.Pattern[str]]:
    return {name: re.compile(pattern) for name, pattern in patterns}


class ToolEntry(_Strict):
    """A tool: a Python function (``module:function``, importable from the project's
    folder), how long a call may run and how much of its result the model sees."""

    call: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    max_output_bytes: int = Field(default=16 * 1024, ge=64, le=4 * 1024 * 1024)


class McpServer(_Strict):
    """An MCP server over stdio whose tools agents may call as ``SERVER.TOOL``: the
    command that starts it (run in the project's folder), the environment variables
    passed on to it by name (besides PATH, HOME and the like), and its calls' limits."""

    command: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    env: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = []
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    max_output_bytes: int = Field(default=16 * 1024, ge=64, le=4 * 1024 * 1024)


class Router(_Strict):
    """``tier: auto`` (see ``orchestrator.router``)."""

    explore: float = Field(default=0.05, ge=0, le=1, allow_inf_nan=False)
    # What a second of a local model's time counts as, for a tier priced at $0.
    latency_usd_per_s: float = Field(default=0.0001, ge=0, le=1, allow_inf_nan=False)


class Config(_Strict):
    database: str = "sqlite:///tierflow.db"
    broker: str | None = None
    tiers: dict[str, Tier] = Field(min_length=1)
    reference_model: str | None = None
    prices: dict[str, PriceOverride] = {}
    budget: Budget = Budget()  # across every workflow
    escalation: Escalation = Escalation()
    max_steps: int = Field(default=200, ge=1, le=MAX_CALLS)  # model-calling units in one run
    # A run's executor renews its lease every third of this; a lease older
    # than this means the executor died, and a sweeper hands the run on.
    lease_ttl_s: float = Field(default=60.0, ge=1, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    queue: str = Field(default="tierflow", pattern=QUEUE_PATTERN)  # Celery's default queue
    agents_dir: str = "agents"
    workflows_dir: str = "workflows"
    # Besides loopback and private addresses, the hosts a local tier may name.
    local_hosts: list[Annotated[str, AfterValidator(locality.check_local_host_entry)]] = []
    privacy: Privacy = Privacy()
    router: Router = Router()
    # Tools agents may call: a name and "module:function", or a ToolEntry mapping.
    tools: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)], ToolEntry] = {}
    # MCP servers over stdio: their tools are named SERVER.TOOL in an agent's tools.
    mcp: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$", max_length=40)], McpServer] = {}

    @field_validator("tools", mode="before")
    @classmethod
    def _paths_to_entries(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: {"call": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("database")
    @classmethod
    def _is_database_url(cls, url: str) -> str:
        return check_database_url(url)

    @field_validator("broker")
    @classmethod
    def _is_broker_url(cls, url: str | None) -> str | None:
        return None if url is None else check_broker_url(url)

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, Tier]) -> dict[str, Tier]:
        for name in tiers:
            if name == "auto":
                raise ValueError("'auto' is reserved: a step uses it to start at the cheapest tier")
        return tiers


def check_database_url(url: str) -> str:
    """``url`` if it names a database tierflow can use, else ``ValueError`` saying why."""
    kind = url.split("://", 1)[0] if "://" in url else None
    if kind is None or not re.fullmatch(r"[a-z0-9_]+(\+[a-z0-9_]+)?", kind):
        raise ValueError("not a database URL; use sqlite:///FILE or postgresql+psycopg://HOST/DB")
    backend = kind.split("+", 1)[0]
    if kind == "postgresql":
        raise ValueError("name the driver: postgresql+psycopg://HOST/DB")
    if kind not in DATABASE_KINDS:
        raise ValueError(f"{backend} is not supported; use sqlite:/// or postgresql+psycopg://")
    return url


def check_broker_url(url: str) -> str:
    """``url`` if it names a broker Celery can reach, else ``ValueError`` saying why."""
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme is None:
        raise ValueError(
            "not a broker URL; use redis://HOST:6379/0 or amqp://USER:PASS@HOST:5672//"
        )
    if scheme not in BROKER_SCHEMES:
        raise ValueError(f"broker {scheme}:// is not supported; use redis:// or amqp://")
    return url


CONFIG_NAME = "tierflow.yaml"
DEFAULT_CONFIG = {
    "tiers": {"light": {"models": ["llamacpp/smollm2-135m"], "local": True}},
}


@dataclass(frozen=True)
class Settings:
    """Validated configuration plus where it came from. Safe to share between runs."""

    config: Config
    root: Path
    path: Path | None
    database_url: str
    broker_url: str | None
    tool_lines: dict[str, int] = field(default_factory=dict)  # where tierflow.yaml names each

    def tool(self, name: str) -> Any:
        """The ``orchestrator.tools.Tool`` named ``name`` (``SERVER.TOOL`` for an MCP
        server's), imported or listed once per process; ``SpecError`` naming
        tierflow.yaml's line if it cannot be offered."""
        from orchestrator.tools import ToolProblem, cached_tool

        server, _, listed = name.partition(".")
        if listed:
            offered = {tool.name: tool for tool in self.mcp_tools(server)}
            if listed not in offered:
                from orchestrator.loading import suggest

                self._tool_problem(
                    f"mcp.{server}",
                    f"server {server} has no tool {listed!r}{suggest(listed, offered)};"
                    f" it lists {', '.join(offered) or 'none'}",
                )
            return offered[listed]
        try:
            entry = self.config.tools[name]
            return cached_tool(
                name, entry.call, str(self.root), entry.timeout_s, entry.max_output_bytes
            )
        except ToolProblem as exc:
            self._tool_problem(f"tools.{name}", str(exc))

    def mcp_tools(self, server: str) -> list[Any]:
        """Every tool MCP server ``server`` lists (it is started once per process);
        ``SpecError`` naming tierflow.yaml's line if it cannot start."""
        from orchestrator.mcptools import listed_tools
        from orchestrator.tools import ToolProblem

        try:
            return listed_tools(self._mcp_server(server))
        except ToolProblem as exc:
            self._tool_problem(f"mcp.{server}", str(exc))

    def _tool_problem(self, key: str, problem: str) -> NoReturn:
        raise SpecError(f"{self.path}:{self.tool_lines.get(key, 1)}: {key}: {problem}")

    def _mcp_server(self, name: str) -> Any:
        from orchestrator.mcptools import Server

        entry = self.config.mcp[name]
        return Server(
            name=name,
            command=tuple(entry.command),
            env=tuple(entry.env),
            cwd=str(self.root),
            timeout_s=entry.timeout_s,
            max_output_bytes=entry.max_output_bytes,
        )

    def knows_tool(self, name: str) -> bool:
        """Whether ``name`` is a tool of tierflow.yaml's ``tools:``, or ``SERVER.TOOL``
        of a server its ``mcp:`` names (whether that server lists it is found on loading)."""
        server, _, listed = name.partition(".")
        return name in self.config.tools if not listed else server in self.config.mcp

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file the database URL names; None for another database or memory."""
        prefix = "sqlite:///"
        url = self.database_url
        if not url.startswith(prefix) or ":memory:" in url:
            return None
        return Path(url[len(prefix) :].split("?", 1)[0])

    @property
    def tier_names(self) -> list[str]:
        return list(self.config.tiers)

    @property
    def key_names(self) -> tuple[str, ...]:
        """Every variable tierflow.yaml names as a key (``api_key_env``): their values are masked."""
        return tuple(
            sorted(
                {
                    entry.api_key_env
                    for tier in self.config.tiers.values()
                    for entry in tier.models
                    if entry.api_key_env
                }
            )
        )

    def queue_of(self, tier: str) -> str:
        """The queue whose workers run steps on ``tier``."""
        return self.config.tiers[tier].queue or self.config.queue

    def queues_of(self, tiers: list[str] | None) -> list[str]:
        """The queues a worker serving ``tiers`` (None: every tier) consumes, in order."""
        queues = [self.queue_of(tier) for tier in tiers or self.tier_names]
        if tiers is None:
            queues.insert(0, self.config.queue)
        return list(dict.fromkeys(queues))

    def price_of(self, model: str) -> pricing.Price:
        """Override, else free for local providers, else litellm's table."""
        override = self.config.prices.get(model)
        if override is not None:
            return pricing.Price.per_million(override.input, override.output, override.per_hour)
        if pricing.is_local_provider(model):
            return pricing.FREE
        price = pricing.litellm_price(model)
        if price is None:  # load() has already refused unpriced models
            raise SpecError(f"{self.path}:1: prices: no price for {model}")
        return price

    def reference_price(self) -> pricing.Price | None:
        model = self.config.reference_model
        return self.price_of(model) if model else None


def find_config_path(explicit: str | Path | None = None) -> Path | None:
    """The configuration to use: ``explicit``, else ``$TIERFLOW_CONFIG``, else the
    first tierflow.yaml in the current folder or a parent of it (as git finds its
    repository); None when there is none (the built-in defaults apply)."""
    if explicit:
        return Path(explicit)
    if os.environ.get("TIERFLOW_CONFIG"):
        return Path(os.environ["TIERFLOW_CONFIG"])
    here = Path.cwd()
    for folder in (here, *here.parents):
        found = folder / CONFIG_NAME
        if found.is_file():
            return found if folder != here else Path(CONFIG_NAME)
    return None


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and check the configuration; raises ``SpecError`` naming file and line."""
    found = find_config_path(path)
    if found is None:
        doc = YamlDoc(path=Path("(built-in config)"), data=DEFAULT_CONFIG)
        root = Path.cwd()
    else:
        doc = read_yaml(found)
        root = found.resolve().parent
    config = validate(Config, doc)
    problems = [*_price_problems(config, doc), *_locality_problems(config, doc)]
    if problems:
        raise SpecError(*problems)
    database = _from_environment("TIERFLOW_DATABASE_URL", check_database_url) or config.database
    return Settings(
        tool_lines={
            **{f"tools.{name}": doc.line_of(("tools", name)) for name in config.tools},
            **{f"mcp.{name}": doc.line_of(("mcp", name)) for name in config.mcp},
        },
        config=config,
        root=root,
        path=found,
        database_url=_anchor_sqlite(database, root),
        broker_url=_from_environment("TIERFLOW_BROKER_URL", check_broker_url) or config.broker,
    )


def _from_environment(name: str, check: Callable[[str], str]) -> str | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return check(value)
    except ValueError as exc:
        raise UserError(f"${name}: {exc}") from None


def _locality_problems(config: Config, doc: YamlDoc) -> list[str]:
    """A tier marked local holds only local models: confidential data relies on it."""
    ollama_host = os.environ.get("OLLAMA_HOST")
    problems = []
    for tier_name, tier in config.tiers.items():
        if not tier.local:
            continue
        for index, entry in enumerate(tier.models):
            reason = locality.why_not_local(
                entry.model, entry.api_base, local_hosts=config.local_hosts, ollama_host=ollama_host
            )
            if reason is not None:
                problems.append(
                    doc.problem(
                        ("tiers", tier_name, "models", index),
                        f"tier is marked local but {reason}; move it to another tier",
                    )
                )
    return problems


def _price_problems(config: Config, doc: YamlDoc) -> list[str]:
    """Refuse a hosted model we cannot price: its spend would be recorded as $0."""
    problems = []
    wanted: list[tuple[tuple[str | int, ...], str]] = [
        (("tiers", tier_name, "models", index), entry.model)
        for tier_name, tier in config.tiers.items()
        for index, entry in enumerate(tier.models)
    ]
    if config.reference_model:
        wanted.append((("reference_model",), config.reference_model))
    for loc, model in wanted:
        if model in config.prices or pricing.is_local_provider(model):
            continue
        if pricing.litellm_price(model) is None:
            hint = suggest(model, pricing.known_models())
            problems.append(
                doc.problem(loc, f"no known price for {model}{hint}; add it under prices:")
            )
    return problems


def _anchor_sqlite(url: str, root: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(root / url[len(prefix) :])
    return url
