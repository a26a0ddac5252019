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

    model: str = Field(
        pattern=r"^[a-z0-9_-]+/.+$",
        description=(
            "PROVIDER/NAME: llamacpp/smollm2-135m runs in process, ollama/NAME on an Ollama"
            " server, any other name through litellm (openai/gpt-4.1)."
        ),
    )
    api_base: str | None = Field(
        default=None,
        description=(
            "URL the model is served at. For ollama/, the server (default $OLLAMA_HOST, else"
            " 127.0.0.1:11434); for litellm models, an OpenAI-compatible or provider endpoint."
        ),
    )
    api_key_env: str | None = Field(
        default=None,
        description=(
            "Name of the environment variable that holds the litellm model's API key; unset,"
            " litellm reads the provider's usual variable (OPENAI_API_KEY, ...)."
        ),
    )
    timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description=(
            "Seconds a call may take before it counts as a timeout; a step's timeout_s replaces it."
        ),
    )
    stream: bool = Field(
        default=False,
        description=(
            "Ask for streamed answers (litellm and Ollama models; not the turns of a tool"
            " loop). Usage is recorded the same way."
        ),
    )
    structured: Literal["json_schema", "json_object", "none"] = Field(
        default="json_schema",
        description=(
            "How a step's output schema is asked for: the schema itself, any JSON object, or"
            " nothing; a server that refuses one form is asked in the next. The answer is"
            " checked against the schema either way."
        ),
    )
    # Only on a tier marked simulated: true (a demo or a test), so that a real tier
    # can never answer with canned text.
    mock_response: str | None = Field(
        default=None,
        min_length=1,
        max_length=10_000,
        description=(
            "litellm's stand-in for a provider: every request gets this text back and nothing"
            " leaves the machine. Only on a tier marked simulated: true."
        ),
    )

    @property
    def provider(self) -> str:
        return pricing.provider_of(self.model)


QUEUE_PATTERN = r"^[A-Za-z0-9_.-]+$"


class Tier(_Strict):
    """One rung of the ladder: its models, tried in order. Tiers are listed cheapest first."""

    models: list[ModelEntry] = Field(
        min_length=1,
        description=(
            "Models tried in order on error or timeout; a plain string is {model: STRING}."
            " At least one."
        ),
    )
    local: bool = Field(
        default=False,
        description=(
            "The tier runs on this machine or network (checked at load). Sensitive and"
            " confidential steps, and prompts holding personal data, use only local tiers."
        ),
    )
    queue: str | None = Field(
        default=None,
        pattern=QUEUE_PATTERN,
        description=(
            "Celery queue of this tier's steps, consumed by workers started with --tiers NAME;"
            " none: the configuration's default queue."
        ),
    )
    simulated: bool = Field(
        default=False,
        description=(
            "Served by a stand-in for a real model (a test server on loopback, or"
            " mock_response). Its calls are marked simulated in the ledger and in every table."
        ),
    )

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

    input: Decimal = Field(
        default=Decimal(0),
        ge=0,
        le=MAX_PRICE_USD,
        allow_inf_nan=False,
        description="USD per 1M prompt tokens.",
    )
    output: Decimal = Field(
        default=Decimal(0),
        ge=0,
        le=MAX_PRICE_USD,
        allow_inf_nan=False,
        description="USD per 1M completion tokens.",
    )
    per_hour: Decimal = Field(
        default=Decimal(0),
        ge=0,
        le=MAX_PRICE_USD,
        allow_inf_nan=False,
        description=(
            "USD per hour of the machine that runs the model: each call also costs its"
            " seconds of it."
        ),
    )


class Budget(_Strict):
    """Spend limits in USD: per UTC day and per calendar month (UTC)."""

    # A workflow's budget inherits these, so they say what they limit in either file.
    daily_usd: Decimal | None = Field(
        default=None,
        ge=MIN_BUDGET_USD,
        le=MAX_BUDGET_USD,
        allow_inf_nan=False,
        description=(
            "Most USD spent per UTC day: by every workflow together in tierflow.yaml, by this"
            " workflow in a workflow file. A call that would pass it is refused; none: no limit."
        ),
    )
    monthly_usd: Decimal | None = Field(
        default=None,
        ge=MIN_BUDGET_USD,
        le=MAX_BUDGET_USD,
        allow_inf_nan=False,
        description=(
            "Most USD spent per calendar month (UTC): by every workflow together in"
            " tierflow.yaml, by this workflow in a workflow file. A call that would pass it is"
            " refused; none: no limit."
        ),
    )


class WorkflowBudget(Budget):
    """The workflow's limits, and a tier cap once any of them is ``downgrade_at`` used."""

    per_run_usd: Decimal | None = Field(
        default=None,
        ge=MIN_BUDGET_USD,
        le=MAX_BUDGET_USD,
        allow_inf_nan=False,
        description=(
            "Most USD one run may spend; a call that would pass it is refused. None: no limit."
        ),
    )
    downgrade_at: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Share of any of this workflow's limits which, once spent or reserved, caps its"
            " steps at downgrade_to. Goes with downgrade_to."
        ),
    )
    downgrade_to: str | None = Field(
        default=None,
        description=(
            "The highest tier steps may use once downgrade_at of a limit is used: a step above"
            " starts there, and none climbs past it."
        ),
    )

    @model_validator(mode="after")
    def _downgrade_needs_both(self) -> WorkflowBudget:
        if (self.downgrade_at is None) != (self.downgrade_to is None):
            raise ValueError("downgrade_at and downgrade_to go together")
        limited = (self.per_run_usd, self.daily_usd, self.monthly_usd)
        if self.downgrade_at is not None and all(usd is None for usd in limited):
            raise ValueError("downgrade_at needs per_run_usd, daily_usd or monthly_usd")
        return self


class Escalation(_Strict):
    """Which failed attempts move a step on to the next model or tier, and how many it gets."""

    on: list[Outcome] = Field(
        default=["error", "timeout", "invalid_output", "low_confidence"],
        description=(
            "Outcomes that move a step on: error and timeout to the next model, the others"
            " straight to the next tier. Another failure fails the step, but an unlisted"
            " low_confidence answer is taken."
        ),
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description=(
            "Most models asked per step (per item of a for_each step), across the ladder;"
            " a model skipped as unavailable uses none."
        ),
    )


class Privacy(_Strict):
    """Personal data found in a rendered prompt pins the call to local tiers
    (see ``orchestrator.privacy``); ``detect: []`` and no patterns turns it off."""

    detect: list[Literal["email", "phone", "card", "iban"]] = Field(
        default=["email", "phone", "card", "iban"],
        description="Kinds of personal data looked for in each rendered prompt; [] looks for none.",
    )
    patterns: dict[Annotated[str, Field(pattern=NAME_PATTERN)], str] = Field(
        default={},
        description=(
            "More kinds: a name and a regular expression (Python's re syntax) that finds one."
        ),
    )
    region: str | None = Field(
        default="US",
        pattern=r"^[A-Z]{2}$",
        description=(
            "ISO 3166 country whose national format phone numbers without a +country prefix"
            " are read in; null finds only numbers written internationally."
        ),
    )

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

    call: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description=(
            "module:function of a sync or async function importable from the project's folder;"
            " its parameters' type hints and docstring make the tool's schema."
        ),
    )
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description="Seconds a call of the tool may run before it counts as failed.",
    )
    max_output_bytes: int = Field(
        default=16 * 1024,
        ge=64,
        le=4 * 1024 * 1024,
        description="Bytes of the result the model sees; a longer result is cut, with a note.",
    )


class McpServer(_Strict):
    """An MCP server over stdio whose tools agents may call as ``SERVER.TOOL``: the
    command that starts it (run in the project's folder), the environment variables
    passed on to it by name (besides PATH, HOME and the like), and its calls' limits."""

    command: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        description="The command and arguments that start the server, run in the project's folder.",
    )
    env: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default=[],
        description=(
            "Names of environment variables passed on to the server; besides them it gets"
            " only a safe environment (PATH, HOME and the like)."
        ),
    )
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description=(
            "Seconds a tool call may take before it counts as failed; the server's start"
            " does not count."
        ),
    )
    max_output_bytes: int = Field(
        default=16 * 1024,
        ge=64,
        le=4 * 1024 * 1024,
        description="Bytes of a result the model sees; a longer result is cut, with a note.",
    )


class Router(_Strict):
    """``tier: auto`` (see ``orchestrator.router``)."""

    explore: float = Field(
        default=0.05,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "Share of tier: auto starts sent to a random tier below the chosen one, so a"
            " tier that got better is found again."
        ),
    )
    # Without it a $0 local model would look free however slow it is.
    latency_usd_per_s: float = Field(
        default=0.0001,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="USD a second of a call's latency counts as, for a tier priced at $0.",
    )


class Config(_Strict):
    """tierflow.yaml: the tier ladder and its models, prices, budgets, escalation,
    privacy, tools, the database and the queue."""

    database: str = Field(
        default="sqlite:///tierflow.db",
        description=(
            "sqlite:///FILE (relative to this file's folder) or postgresql+psycopg://HOST/DB;"
            " $TIERFLOW_DATABASE_URL overrides it."
        ),
    )
    broker: str | None = Field(
        default=None,
        description=(
            "Celery broker URL (redis://, amqp://, ...); $TIERFLOW_BROKER_URL overrides it."
            " None: the embedded broker in the project's .tierflow folder."
        ),
    )
    tiers: dict[str, Tier] = Field(
        min_length=1,
        description=(
            "The tier ladder by name, cheapest first in file order; a step climbs it upwards."
            " 'auto' is reserved."
        ),
    )
    reference_model: str | None = Field(
        default=None,
        description=(
            "The frontier model of the all-frontier counterfactual that savings are measured"
            " against; it must have a price. None: no savings are figured."
        ),
    )
    prices: dict[str, PriceOverride] = Field(
        default={},
        description=(
            "Prices by model name (PROVIDER/NAME), used before litellm's table; ollama/ and"
            " llamacpp/ models are otherwise free."
        ),
    )
    budget: Budget = Field(default=Budget(), description="Spend limits on every workflow together.")
    escalation: Escalation = Field(
        default=Escalation(),
        description="Which failures move a step up the ladder, and how many models it may ask.",
    )
    max_steps: int = Field(
        default=200,
        ge=1,
        le=MAX_CALLS,
        description=(
            "Most model-calling units in one run: each step that calls a model, and each"
            " for_each item. A workflow's max_steps replaces it."
        ),
    )
    lease_ttl_s: float = Field(
        default=60.0,
        ge=1,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description=(
            "Seconds a run's lease lasts. Its executor renews it every third of this; an"
            " older lease means the executor died, and a sweeper hands the run on."
        ),
    )
    queue: str = Field(
        default="tierflow",
        pattern=QUEUE_PATTERN,
        description="Celery's default queue, for the steps of tiers that name no queue.",
    )
    agents_dir: str = Field(
        default="agents",
        description="Folder of agent files (NAME.yaml), relative to this file's folder.",
    )
    workflows_dir: str = Field(
        default="workflows",
        description="Folder of workflow files (NAME.yaml), relative to this file's folder.",
    )
    local_hosts: list[Annotated[str, AfterValidator(locality.check_local_host_entry)]] = Field(
        default=[],
        description=(
            "Host names or IP addresses a local tier may name, besides loopback and private"
            " addresses. No scheme, port or path."
        ),
    )
    privacy: Privacy = Field(
        default=Privacy(),
        description="Personal data that keeps a prompt on local tiers.",
    )
    router: Router = Field(
        default=Router(), description="How tier: auto chooses where a step starts."
    )
    trace: bool = Field(
        default=False,
        description=(
            "Store every step's rendered messages and answers, secrets masked, for tierflow"
            " show --trace; never for sensitive or tainted steps unless the step says"
            " trace: {sensitive: true}. A step's trace: overrides it."
        ),
    )
    tools: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)], ToolEntry] = (
        Field(
            default={},
            description=(
                'Python functions agents may call, by name: "module:function" or a mapping'
                " with call, timeout_s and max_output_bytes."
            ),
        )
    )
    mcp: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$", max_length=40)], McpServer] = (
        Field(
            default={},
            description=(
                "MCP servers over stdio, by name; an agent lists a server's tools as SERVER.TOOL."
            ),
        )
    )

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
