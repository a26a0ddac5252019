"""Workflow and agent files: models, loading and every check made before a model is called.

``load_workflow`` reads a workflow, the agents it names and checks the whole
graph against the tiers in ``Settings``. What it returns is typed and trusted:
nothing past this module validates a spec again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator import schemas
from orchestrator.errors import SpecError, UserError
from orchestrator.loading import YamlDoc, format_loc, read_yaml, suggest, validate
from orchestrator.settings import (
    MAX_CALLS,
    MAX_TIMEOUT_S,
    NAME_PATTERN,
    Settings,
    WorkflowBudget,
)
from orchestrator.taint import Taint, taints
from orchestrator.templates import Expression, Read, Template, TemplateProblem

AUTO_TIER = "auto"
MAX_WORKFLOW_STEPS = 1000  # steps in one file; for_each items are counted by max_steps
NAME_LENGTH = 64
MAX_STEP_ID_LENGTH = 100  # the ledger's column: a sub-workflow's steps are STEP.CHILD_STEP
MAX_FILE_TOKENS = 40_000  # template and expression tokens of one workflow, all steps together
# Keywords by which an output schema may allow fields its ``properties`` do not list.
_SCHEMA_OPENERS = (
    "$ref",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "dependentSchemas",
    "unevaluatedProperties",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """One input of a workflow: the type its value must have, and a default that makes
    it optional (without one, every run must give it)."""

    type: Literal["string", "integer", "number", "boolean", "array", "object"] = Field(
        default="string", description="The JSON type a value must have."
    )
    description: str | None = Field(
        default=None, description="Free text for people reading the file."
    )
    # Whether it was written, not its value, makes the input optional (see required).
    default: Any = Field(
        default=None,
        description=(
            "The value when a run gives none; it must fit type, enum and items. Without a"
            " default, the input is required."
        ),
    )
    enum: list[Any] | None = Field(
        default=None, description="The allowed values; none: any value of the type."
    )
    items: dict[str, Any] | None = Field(
        default=None,
        description=(
            "JSON Schema (2020-12) of each item of an array input; a $ref may point only inside it."
        ),
    )
    confidential: bool = Field(
        default=False,
        description=(
            "Every step that reads it, directly or through other steps' outputs, runs only"
            " on tiers marked local: true."
        ),
    )

    @field_validator("items")
    @classmethod
    def _items_is_a_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            schemas.check_schema(schema)
        return schema

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema a value of this input must match."""
        return self.model_dump(
            exclude={"default", "description", "confidential"}, exclude_none=True
        )

    @property
    def required(self) -> bool:
        return "default" not in self.model_fields_set


class Confidence(_Strict):
    """How sure an answer must be to be accepted: below ``min``, its outcome is
    ``low_confidence`` and the step escalates (when ``escalation.on`` holds it).
    If no tier above answers with more confidence, the step takes its last answer."""

    signal: Literal["logprob", "consistency", "judge"] = Field(
        description=(
            "How an answer is scored: logprob from its tokens' log-probabilities, consistency"
            " from agreement among samples, judge by another agent's grade."
        )
    )
    min: float = Field(
        ge=0,
        le=1,
        allow_inf_nan=False,
        description=(
            "Lowest score (0 to 1) an answer may have to be accepted; compared with the"
            " calibrated score once the step has enough labelled answers on the model."
        ),
    )
    samples: int = Field(
        default=3,
        ge=2,
        le=10,
        description=(
            "consistency only: answers asked for in all, at temperature 0.7; the score is the"
            " share that agree with the most common one."
        ),
    )
    agent: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=NAME_LENGTH,
        description=(
            "judge only, and required there: the agent (agents_dir/NAME.yaml) that grades"
            " each answer from 0 to 1."
        ),
    )
    tier: str | None = Field(
        default=None,
        description=(
            "judge only, and required there: the tier the judge runs on, its models tried in"
            " order without escalating."
        ),
    )

    @model_validator(mode="after")
    def _judge_named(self) -> Confidence:
        judged = self.signal == "judge"
        if judged and (self.agent is None or self.tier is None):
            raise ValueError("signal judge needs agent: (the judge) and tier: (where it runs)")
        if not judged and (self.agent is not None or self.tier is not None):
            raise ValueError(f"agent: and tier: are for signal judge, not {self.signal}")
        return self


DEFAULT_MAX_TURNS = 4  # model turns of a tool loop: ask, call tools, ask again…
MAX_TURNS = 20
MAX_CACHE_TTL_S = 10 * 365 * 86_400  # ten years; no ttl_s keeps an answer until cleared


class Cache(_Strict):
    """Keep accepted answers and give them again for the same request (``orchestrator.cache``)."""

    ttl_s: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CACHE_TTL_S,
        description="Seconds an answer is kept; none: until tierflow cache clear.",
    )
    sensitive: bool = Field(
        default=False,
        description=(
            "Cache a sensitive or tainted step, or a prompt holding personal data, too: its"
            " answers are then stored in the database."
        ),
    )


def _cache_setting(value: object) -> object:
    """``cache: true`` is ``cache: {}``; ``false`` stays, to turn an agent's cache off
    (likewise ``trace:``, where false turns tierflow.yaml's trace off)."""
    return {} if value is True else value


class TraceSetting(_Strict):
    """Keep what the step sends each model and what comes back (``tierflow show --trace``)."""

    sensitive: bool = Field(
        default=False,
        description=(
            "Trace a sensitive or tainted step, or a prompt holding personal data, too: its"
            " messages and answers are then stored in the database."
        ),
    )


# The judge's answer, and the prompt of a judge agent that gives none of its own.
JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["score"],
}
JUDGE_PROMPT = (
    "Question:\n{{ question }}\n\nAnswer:\n{{ answer }}\n\n"
    "How likely is this answer to be correct and complete? Reply with JSON only:"
    ' {"score": a number from 0 (surely wrong) to 1 (surely right)}'
)


class Agent(_Strict):
    """An agent file (agents_dir/NAME.yaml): what the steps that name it share, a system
    prompt, a default prompt, sampling, tools, and defaults for confidence and caching."""

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=NAME_LENGTH,
        description="Must equal the file name without .yaml.",
    )
    description: str = Field(default="", description="Free text for people reading the file.")
    tier: str | None = Field(
        default=None,
        description=(
            "The tier its steps start on when a step gives none: a tier name, or auto (the"
            " router chooses). None: auto."
        ),
    )
    system: str | None = Field(
        default=None, description="Template of the system message of every step that uses it."
    )
    prompt: str | None = Field(
        default=None,
        description=(
            "Template of the default user message; a step's prompt replaces it, and must be"
            " given when the agent has none."
        ),
    )
    temperature: float = Field(
        default=0.0,
        ge=0,
        le=2,
        description=(
            "Sampling temperature; the samples of a consistency signal are drawn at 0.7 instead."
        ),
    )
    max_tokens: int = Field(
        default=512,
        ge=1,
        le=200_000,
        description="Most tokens the model may write per call; a step's max_tokens replaces it.",
    )
    confidence: Confidence | None = Field(
        default=None,
        description=(
            "How sure an answer must be; a step's confidence replaces it. None: any valid"
            " answer is taken."
        ),
    )
    cache: Cache | Literal[False] | None = Field(
        default=None,
        description=(
            "Keep accepted answers and give them again (true is {}); a step's cache replaces"
            " it. None or false: not cached."
        ),
    )
    tools: list[str] = Field(
        default=[],
        description=(
            "Tools the model may call: names from tierflow.yaml's tools:, or SERVER.TOOL of"
            " a server its mcp: names."
        ),
    )
    max_turns: int = Field(
        default=DEFAULT_MAX_TURNS,
        ge=1,
        le=MAX_TURNS,
        description=(
            "Model turns a step's tool loop has to reach an answer; a step's max_turns replaces it."
        ),
    )

    _cache_setting = field_validator("cache", mode="before")(_cache_setting)


MAX_APPROVAL_WAIT_S = 366 * 86_400  # a year: longer than any approval should wait


class Approval(_Strict):
    """A person decides before the run goes on: ``tierflow approve`` or the API.
    The run waits (status ``waiting``) holding no worker and no lease."""

    message: str = Field(
        min_length=1,
        max_length=10_000,
        description="Template shown to the person; it reads inputs, steps and run.",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_APPROVAL_WAIT_S,
        allow_inf_nan=False,
        description=(
            "Seconds the run may wait, counted from when the step was reached, before it"
            " fails; none: no limit."
        ),
    )


# What an approval step may not say: it calls no model.
_MODEL_ONLY = (
    "agent",
    "tier",
    "prompt",
    "output",
    "checks",
    "for_each",
    "max_tokens",
    "timeout_s",
    "max_turns",
)


# The agent of an approval step's record: a person, not a model.
APPROVER = Agent(name="approver", description="A person who approves or rejects.")
# The agent of a uses: step's record: the other workflow's steps do its work.
CHILD_RUNNER = Agent(name="workflow", description="Runs another workflow's steps.")


class Step(_Strict):
    """One step of a workflow. It calls a model (agent), waits for a person's decision
    (approval) or runs another workflow (uses): exactly one of the three."""

    id: str = Field(
        pattern=NAME_PATTERN,
        max_length=NAME_LENGTH,
        description="Unique in the workflow; later steps read its output as steps.ID.output.",
    )
    agent: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=NAME_LENGTH,
        description="The agent (agents_dir/NAME.yaml) whose prompts and settings the step uses.",
    )
    approval: Approval | None = Field(
        default=None,
        description="A person approves or rejects before the run goes on; no model is called.",
    )
    uses: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        max_length=NAME_LENGTH,
        description=(
            "Another workflow of the project (workflows_dir/NAME.yaml), run inside this run;"
            " the step's output is that workflow's outputs."
        ),
    )
    with_: dict[str, Any] = Field(
        default={},
        alias="with",
        description=(
            "The inputs of the uses workflow: strings are templates, a lone {{ expression }}"
            " keeps its value's type, other values are given as written."
        ),
    )
    tier: str | None = Field(
        default=None,
        description=(
            "The tier the step starts on: a tier name, or auto (the router chooses). None: the"
            " agent's tier, else auto."
        ),
    )
    prompt: str | None = Field(
        default=None, description="Template of the user message; none: the agent's prompt."
    )
    output: dict[str, Any] | None = Field(
        default=None,
        description=(
            "JSON Schema (2020-12) the answer must be JSON valid against; none: the output is"
            " the answer's text."
        ),
    )
    checks: list[str] = Field(
        default=[],
        description=(
            "Expressions that must each be true of the answer (read as output); a false one"
            " makes it invalid_output."
        ),
    )
    needs: list[str] = Field(
        default=[],
        description=(
            "Ids of steps that must finish first. Templates and expressions read steps.ID"
            " only of a step needed, directly or through the steps it needs."
        ),
    )
    when: str | None = Field(
        default=None,
        description="Expression; when false, the step is skipped and its output is null.",
    )
    for_each: str | None = Field(
        default=None,
        description=(
            "Expression giving a list: the step runs once per item (read as item), and its"
            " output is the list of answers."
        ),
    )
    sensitive: bool = Field(
        default=False, description="The step runs only on tiers marked local: true."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=200_000,
        description="Most tokens the model may write per call; none: the agent's max_tokens.",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description=(
            "Seconds one model call may take before it counts as a timeout; none: each"
            " model's timeout_s."
        ),
    )
    confidence: Confidence | None = Field(
        default=None, description="How sure an answer must be; none: the agent's confidence."
    )
    cache: Cache | Literal[False] | None = Field(
        default=None,
        description=(
            "Keep accepted answers and give them again (true is {}); false turns the agent's"
            " cache off; none: the agent's."
        ),
    )
    max_turns: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TURNS,
        description=(
            "Model turns the step's tool loop has to reach an answer; none: the agent's max_turns."
        ),
    )
    trace: TraceSetting | Literal[False] | None = Field(
        default=None,
        description=(
            "Store the rendered messages and each answer, secrets masked (true is {}); false"
            " turns tierflow.yaml's trace off for this step; none: tierflow.yaml's trace."
        ),
    )

    _cache_setting = field_validator("cache", "trace", mode="before")(_cache_setting)

    @field_validator("output")
    @classmethod
    def _output_is_a_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            schemas.check_schema(schema)
        return schema

    @model_validator(mode="after")
    def _agent_approval_or_uses(self) -> Step:
        kinds = [kind for kind in ("agent", "approval", "uses") if getattr(self, kind) is not None]
        if not kinds:
            raise ValueError(
                "give the step an agent: (or approval: for a person's decision,"
                " or uses: for another workflow)"
            )
        if "with_" in self.model_fields_set and self.uses is None:
            raise ValueError("with: gives a sub-workflow its inputs; it goes with uses:")
        if kinds == ["agent"]:
            return self
        given = [name for name in _MODEL_ONLY if name in self.model_fields_set]
        given += [name for name in ("confidence", "cache", "approval", "uses")]
        given = [name for name in given if name in self.model_fields_set and name != kinds[-1]]
        if given:
            what = (
                "an approval step calls no model" + ", so it takes no "
                if kinds[-1] == "approval"
                else "a uses: step runs another workflow, so it takes no "
            )
            who = " a person answers it" if kinds[-1] == "approval" else " that workflow's steps do"
            raise ValueError(f"{what}{', '.join(given)}:{who}")
        return self


CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


class Schedule(_Strict):
    """``tierflow beat`` enqueues the workflow with ``inputs`` when ``cron`` (UTC) is due."""

    cron: str = Field(
        description="Five fields, in UTC: minute, hour, day of month, month, day of week."
    )
    inputs: dict[str, Any] = Field(
        default={},
        description="The inputs of each run it enqueues, checked against the workflow's inputs.",
    )

    @field_validator("cron")
    @classmethod
    def _is_cron(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError("five fields: minute hour day-of-month month day-of-week (UTC)")
        crontab_of(cron)  # raises ValueError naming the bad field
        return cron


def crontab_of(cron: str) -> Any:
    """Celery's ``crontab`` for a five-field cron line."""
    from celery.schedules import crontab

    fields = dict(zip(CRON_FIELDS, cron.split(), strict=True))
    for name, value in fields.items():
        try:
            crontab(**{name: value})
        except ValueError as exc:
            raise ValueError(f"{name.replace('_', '-')} '{value}': {exc}") from None
    return crontab(**fields)


class Workflow(_Strict):
    """A workflow file (workflows_dir/NAME.yaml): its inputs and a graph of steps, with
    its limits and schedules."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        max_length=NAME_LENGTH,
        description=(
            "The name recorded with each run and in the ledger; keep it equal to the file"
            " name, by which commands find the workflow."
        ),
    )
    version: int | str | None = Field(
        default=None,
        description="Recorded with each run; tierflow spend --by version groups by it.",
    )
    description: str = Field(default="", description="Free text for people reading the file.")
    inputs: dict[str, InputSpec] = Field(default={}, description="What a run is given, by name.")
    steps: list[Step] = Field(
        min_length=1,
        description=(
            "The steps, 1 to 1,000; needs orders them, and steps whose needs are met run in"
            " parallel."
        ),
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CALLS,
        description=(
            "Most model-calling units one run may use: each step that calls a model, and each"
            " for_each item. None: tierflow.yaml's max_steps."
        ),
    )
    schedule: list[Schedule] = Field(
        default=[], description="Runs that tierflow beat enqueues when they are due."
    )
    budget: WorkflowBudget = Field(
        default=WorkflowBudget(),
        description="Spend limits of this workflow, and the tier cap as they run out.",
    )


@dataclass(frozen=True)
class StepPlan:
    """A step with everything resolved: its agent, tier ladder start and compiled text."""

    step: Step
    agent: Agent
    tier: str
    prompt: Template
    system: Template | None
    when: Expression | None
    for_each: Expression | None
    checks: tuple[Expression, ...]
    max_tokens: int
    taint: Taint | None = None  # how it reads a confidential input, if it does
    # A judge signal's grader: a plan of the same step id, on the judge's agent and tier.
    judge: StepPlan | None = None
    # A history of its own for ``tier: auto`` (tierflow eval's auto policy learns from
    # its cases alone); None: the step's history in the ledger.
    route_scope: str | None = None
    tools: tuple[Any, ...] = ()  # the agent's ``orchestrator.tools.Tool``s
    # A uses: step: the workflow it runs, and each of its inputs as a Template,
    # an Expression (a lone ``{{ expression }}``) or a value written as is.
    child: LoadedWorkflow | None = None
    child_inputs: tuple[tuple[str, Any], ...] = ()

    @property
    def max_turns(self) -> int:
        return self.step.max_turns or self.agent.max_turns

    @property
    def id(self) -> str:
        return self.step.id

    @property
    def confidence(self) -> Confidence | None:
        return self.step.confidence or self.agent.confidence

    @property
    def cache(self) -> Cache | None:
        """Its cache settings (the step's, else its agent's); None: not cached."""
        chosen = self.step.cache if self.step.cache is not None else self.agent.cache
        return chosen or None

    @property
    def local_only(self) -> bool:
        """Only tiers marked local may run it: it is sensitive or reads confidential data."""
        return self.step.sensitive or self.taint is not None

    def texts(self) -> list[tuple[str, frozenset[Read]]]:
        """Each text the step renders or evaluates, named, with what it reads."""
        found = [
            ("prompt" if self.step.prompt is not None else "agent's prompt", self.prompt.reads)
        ]
        if self.system is not None:
            found.append(("agent's system prompt", self.system.reads))
        for name, expression in (("when", self.when), ("for_each", self.for_each)):
            if expression is not None:
                found.append((name, expression.reads))
        found += [(f"checks[{i}]", check.reads) for i, check in enumerate(self.checks)]
        found += [
            (f"with.{name}", value.reads)
            for name, value in self.child_inputs
            if hasattr(value, "reads")
        ]
        if self.judge is not None:  # the judge sees the prompt and the answer too
            found += [(f"judge {name}", reads) for name, reads in self.judge.texts()]
        return found


@dataclass(frozen=True)
class LoadedWorkflow:
    """A checked workflow: steps in a valid order, ready to compile and run."""

    spec: Workflow
    path: Path
    content_hash: str
    steps: tuple[StepPlan, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def resolve_inputs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs with defaults applied, checked against the declared types."""
        values, problems = _resolve_inputs(self.spec.inputs, given)
        if problems:
            raise UserError(f"{self.path}: " + "; ".join(problems))
        return values


def _resolve_inputs(
    declared: dict[str, InputSpec], given: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``given`` with defaults applied, and what is wrong with it."""
    problems = []
    takes = f"inputs are {', '.join(declared)}" if declared else "the workflow takes no inputs"
    for name in given:
        if name not in declared:
            problems.append(f"input '{name}': not declared{suggest(name, declared)}; {takes}")
    values = {}
    for name, spec in declared.items():
        if name in given:
            values[name] = given[name]
        elif spec.required:
            problems.append(f"input '{name}': required ({spec.type})")
        else:
            values[name] = spec.default
    if not problems:
        schema = {
            "type": "object",
            "properties": {name: spec.json_schema() for name, spec in declared.items()},
        }
        for error in schemas.validator(schema).iter_errors(values):
            where = ".".join(str(part) for part in error.absolute_path)
            problems.append(f"input '{where}': {error.message}")
    return values, problems


def find_workflow(name_or_path: str, settings: Settings) -> Path:
    """A path as given, else ``workflows_dir/NAME.yaml`` next to the configuration."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    folder = settings.root / settings.config.workflows_dir
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise UserError(
        f"workflow '{name_or_path}' not found in {folder}{suggest(name_or_path, known)}"
    )


def load_agent(path: Path, settings: Settings | None = None) -> Agent:
    """Load and check an agent file; with ``settings``, its tier must be one of theirs."""
    doc = read_yaml(path)
    agent = validate(Agent, doc)
    if agent.name != path.stem:
        raise SpecError(
            doc.problem(("name",), f"'{agent.name}' must match the file name '{path.stem}'")
        )
    tier, tiers = agent.tier or AUTO_TIER, settings.tier_names if settings is not None else []
    if settings is not None and tier not in (AUTO_TIER, *tiers):
        raise SpecError(doc.problem(("tier",), _unknown_tier(tier, tiers)))
    for key in ("system", "prompt"):
        text = getattr(agent, key)
        if text is not None:
            _compile_template(doc, (key,), text, label=key)
    return agent


def load_workflow(
    path: str | Path,
    settings: Settings,
    *,
    stack: tuple[Path, ...] = (),
    confidential: frozenset[str] = frozenset(),
) -> LoadedWorkflow:
    """Load a workflow file and check it whole; raises ``SpecError`` listing every problem.

    ``stack`` holds the workflows that use this one (a cycle is refused), and
    ``confidential`` inputs that are confidential where it is used (taint flows in)."""
    path = Path(path)
    doc = read_yaml(path)
    spec = validate(Workflow, doc)
    if confidential:
        inputs = {
            name: given.model_copy(update={"confidential": True}) if name in confidential else given
            for name, given in spec.inputs.items()
        }
        spec = spec.model_copy(update={"inputs": inputs})
    if len(spec.steps) > MAX_WORKFLOW_STEPS:
        count = len(spec.steps)
        raise SpecError(
            doc.problem(("steps",), f"{count} steps is over the limit of {MAX_WORKFLOW_STEPS}")
        )
    checker = _Checker(doc, spec, settings, stack=stack)
    plans = checker.plan()
    if checker.problems:
        raise SpecError(*checker.problems)
    return LoadedWorkflow(
        spec=spec, path=path, content_hash=_identity(doc, plans, settings), steps=tuple(plans)
    )


def _unknown_tier(tier: str, tiers: list[str]) -> str:
    return f"unknown tier '{tier}'{suggest(tier, tiers)}; tiers are {', '.join(tiers)}"


def _identity(doc: YamlDoc, plans: list[StepPlan], settings: Settings) -> str:
    """The hash of everything a run of this workflow depends on: the file, its
    agents, and the tiers and escalation rules it climbs. A run resumed or handed
    off after any of them changed fails instead of mixing two versions."""
    canonical = {
        "workflow": doc.data,
        "agents": {
            each.agent.name: each.agent.model_dump(mode="json")
            for plan in plans
            for each in (plan, plan.judge)
            if each is not None
        },
        "tiers": settings.config.model_dump(mode="json", include={"tiers", "escalation"}),
        "tools": {
            tool.name: [tool.source, tool.parameters] for plan in plans for tool in plan.tools
        },
        "uses": {plan.id: plan.child.content_hash for plan in plans if plan.child is not None},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()


def project_path(path: Path, settings: Settings) -> str:
    """``path`` relative to the project root when it lies inside, so every machine
    with a checkout of the project finds it; else absolute."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(settings.root.resolve()))
    except ValueError:
        return str(resolved)


def dependents(workflow: LoadedWorkflow, step_id: str) -> set[str]:
    """``step_id`` and every step that needs it, directly or through others."""
    found = {step_id}
    for plan in workflow.steps:  # in dependency order: a step comes after what it needs
        if found.intersection(plan.step.needs):
            found.add(plan.id)
    return found


class WorkflowCache:
    """Loaded workflows, loaded again when the file or one of its agents changes.

    For processes that load the same workflows over and over: queue workers and
    repeated ``enqueue`` calls. A file is judged unchanged by its size and mtime.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: dict[str, tuple[tuple[tuple[int, int] | None, ...], LoadedWorkflow]] = {}

    def load(self, path: str | Path) -> LoadedWorkflow:
        cached = self._loaded.get(str(path))
        if cached is not None and cached[0] == self._stamps(cached[1]):
            return cached[1]
        workflow = load_workflow(path, self._settings)
        self._loaded[str(path)] = (self._stamps(workflow), workflow)
        return workflow

    def _stamps(self, workflow: LoadedWorkflow) -> tuple[tuple[int, int] | None, ...]:
        agents = self._settings.root / self._settings.config.agents_dir
        names = dict.fromkeys(  # each file once
            each.agent.name
            for plan in workflow.steps
            for each in (plan, plan.judge)
            if each is not None
        )
        files = [workflow.path, *(agents / f"{name}.yaml" for name in names)]
        used = [
            stamp for plan in workflow.steps if plan.child for stamp in self._stamps(plan.child)
        ]
        return (*(_stamp(path) for path in files), *used)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class _Checker:
    """Cross-file checks: agents, tiers, needs, cycles, templates and their references."""

    def __init__(
        self, doc: YamlDoc, spec: Workflow, settings: Settings, *, stack: tuple[Path, ...] = ()
    ) -> None:
        self.stack = stack
        self._reads: dict[str, list[tuple[str, frozenset[Read]]]] = {}
        self.doc = doc
        self.spec = spec
        self.settings = settings
        self.problems: list[str] = []
        self.agents_dir = settings.root / settings.config.agents_dir
        # Steps share agents and often prompts: each is loaded or compiled once.
        self._agents: dict[str, Agent | None] = {}
        self._compiled: dict[tuple[str, str, str], Template | Expression | TemplateProblem] = {}
        self._tokens = 0  # compiled so far; compiling is the slow part of a check
        self._budget_told = False

    def report(self, loc: Iterable[str | int], message: str) -> None:
        self.problems.append(self.doc.problem(loc, message))

    def plan(self) -> list[StepPlan]:
        ids = [step.id for step in self.spec.steps]
        first_index: dict[str, int] = {}
        for index, step_id in enumerate(ids):
            if first_index.setdefault(step_id, index) != index:
                self.report(("steps", index, "id"), f"duplicate step id '{step_id}'")
        for index, step in enumerate(self.spec.steps):
            for position, need in enumerate(step.needs):
                if need not in first_index:
                    self.report(
                        ("steps", index, "needs", position),
                        f"unknown step '{need}'{suggest(need, ids)}",
                    )
                elif need == step.id:
                    self.report(("steps", index, "needs", position), "a step cannot need itself")
        inputs_ok = self._check_inputs()
        for index, step in enumerate(self.spec.steps):
            if step.output is not None:
                for where, problem in schemas.outside_references(step.output):
                    self.report(("steps", index, "output", *where), problem)
        order = self._order()
        ancestors = self._ancestors(order)
        plans = []
        for index in order:
            plan = self._plan_step(index, ancestors.get(self.spec.steps[index].id, set()))
            if plan is not None:
                plans.append(plan)
        plans = self._taint(plans)
        cap = self.spec.budget.downgrade_to
        if cap is not None and cap not in self.settings.config.tiers:
            names = self.settings.tier_names
            self.report(("budget", "downgrade_to"), f"unknown tier '{cap}'{suggest(cap, names)}")
        for index, schedule in enumerate(self.spec.schedule if inputs_ok else ()):
            for problem in _resolve_inputs(self.spec.inputs, schedule.inputs)[1]:
                self.report(("schedule", index, "inputs"), problem)
        limit = self.spec.max_steps or self.settings.config.max_steps
        if len(self.spec.steps) > limit:
            self.report(("steps",), f"{len(self.spec.steps)} steps is over max_steps ({limit})")
        return plans

    def _check_inputs(self) -> bool:
        """Defaults that fit their own input, and item schemas that stay inside themselves."""
        ok = True
        for name, spec in self.spec.inputs.items():
            outside = schemas.outside_references(spec.items) if spec.items is not None else []
            for where, problem in outside:
                self.report(("inputs", name, "items", *where), problem)
                ok = False
            if outside:
                continue  # its references cannot be followed to check the default
            if not spec.required:
                errors = schemas.validator(spec.json_schema()).iter_errors(spec.default)
                for error in errors:
                    where = ("inputs", name, "default", *error.absolute_path)
                    self.report(where, error.message[:200])
                    ok = False
                    break
        return ok

    def _taint(self, plans: list[StepPlan]) -> list[StepPlan]:
        """``plans`` with their taint; reports a tainted step no local tier can run."""
        confidential = [name for name, spec in self.spec.inputs.items() if spec.confidential]
        self._reads = {plan.id: plan.texts() for plan in plans}
        found = taints(self._reads, confidential)
        index_of = {step.id: index for index, step in enumerate(self.spec.steps)}
        for plan in plans:
            taint = found.get(plan.id)
            if (
                taint is None
                or plan.step.sensitive
                or plan.step.approval is not None  # a person reads it, not a model
                or plan.child is not None  # its own steps are checked, taint and all
                or self._local_tier_from(plan.tier)
            ):
                continue  # a sensitive step without a local tier is reported already
            loc: tuple[str | int, ...] = ("steps", index_of[plan.id])
            if plan.step.tier is not None:
                loc = (*loc, "tier")
            elif plan.agent.tier is not None:
                loc = (*loc, "agent")
            where = "no tier is" if plan.tier == AUTO_TIER else f"none at or above '{plan.tier}' is"
            self.report(
                loc,
                f"step '{plan.id}' {taint}, so it may use only tiers marked local: true,"
                f" and {where} marked local",
            )
        planned = [
            self._child_tainted(replace(plan, taint=found.get(plan.id)), confidential)
            for plan in plans
        ]
        for plan in planned:
            judge = plan.judge
            if judge is None or not plan.local_only:
                continue
            if not self.settings.config.tiers[judge.tier].local:
                why = plan.taint if plan.taint is not None else "is sensitive"
                loc = (
                    "steps",
                    index_of[plan.id],
                    "confidence" if plan.step.confidence else "agent",
                )
                self.report(
                    loc,
                    f"step '{plan.id}' {why}, so its judge may use only tiers marked local:"
                    f" true, and judge tier '{judge.tier}' is not",
                )
        return planned

    def _child_tainted(self, plan: StepPlan, confidential: list[str]) -> StepPlan:
        """A uses: step whose inputs carry confidential data: its workflow loaded
        again with those inputs confidential, so every step of it that reads them stays local."""
        if plan.child is None or plan.taint is None:
            return plan
        tainted = []
        for name, value in plan.child_inputs:
            reads: frozenset[Read] = getattr(value, "reads", frozenset())
            if taints({"with": [("with", reads)], **self._reads}, confidential).get("with"):
                tainted.append(name)
        if not tainted:
            return plan
        stack = (*self.stack, self.doc.path.resolve())
        try:
            child = load_workflow(
                plan.child.path, self.settings, stack=stack, confidential=frozenset(tainted)
            )
        except SpecError as exc:
            self.problems.extend(exc.problems)
            return plan
        return replace(plan, child=child)

    def _order(self) -> list[int]:
        """Step indexes in dependency order; reports a cycle if there is one."""
        steps = self.spec.steps
        index_of = {step.id: i for i, step in enumerate(steps)}
        waiting = [
            {index_of[n] for n in step.needs if n in index_of and n != step.id} for step in steps
        ]
        dependents: list[list[int]] = [[] for _ in steps]
        for i, deps in enumerate(waiting):
            for dep in deps:
                dependents[dep].append(i)
        order: list[int] = []
        ready = deque(i for i, deps in enumerate(waiting) if not deps)
        while ready:
            current = ready.popleft()
            order.append(current)
            for i in dependents[current]:
                waiting[i].discard(current)
                if not waiting[i]:
                    ready.append(i)
        if len(order) < len(steps):
            placed = set(order)
            stuck = [i for i in range(len(steps)) if i not in placed]
            names = ", ".join(steps[i].id for i in stuck)
            self.report(("steps", stuck[0], "needs"), f"steps form a cycle: {names}")
            order.extend(stuck)
        return order

    def _ancestors(self, order: list[int]) -> dict[str, set[str]]:
        """Every step each step depends on, directly or not; built in dependency order."""
        steps = self.spec.steps
        known = {step.id for step in steps}
        result: dict[str, set[str]] = {}
        for index in order:
            step = steps[index]
            found: set[str] = set()
            for need in step.needs:
                if need in known and need != step.id:
                    found.add(need)
                    found |= result.get(need, set())  # absent only inside a cycle
            result[step.id] = found
        return result

    def _plan_step(self, index: int, ancestors: set[str]) -> StepPlan | None:
        step = self.spec.steps[index]
        loc = ("steps", index)
        if step.approval is not None:
            return self._approval(step, loc, ancestors)
        if step.uses is not None:
            return self._uses(step, loc, ancestors)
        agent = self._agent(step, loc)
        if agent is None:
            return None
        tier = step.tier or agent.tier or AUTO_TIER
        tiers = self.settings.tier_names
        if tier != AUTO_TIER and tier not in tiers:
            if step.tier:
                self.report((*loc, "tier"), _unknown_tier(tier, tiers))
            else:  # the agent's own tier: said at the agent file's line, once
                try:
                    load_agent(self.agents_dir / f"{step.agent}.yaml", self.settings)
                except SpecError as exc:
                    self.problems.extend(p for p in exc.problems if p not in self.problems)
            return None
        if step.sensitive and not self._local_tier_from(tier):
            self.report(
                (*loc, "sensitive"),
                f"no tier marked local: true at or above '{tier}' can run this sensitive step",
            )
        prompt_source = step.prompt if step.prompt is not None else agent.prompt
        if prompt_source is None:
            self.report(
                loc, f"no prompt: give the step a prompt or agent '{agent.name}' a default one"
            )
            return None
        allowed = {"inputs", "steps", "run"} | ({"item"} if step.for_each else set())
        prompt = self._template(
            (*loc, "prompt") if step.prompt is not None else (*loc, "agent"),
            prompt_source,
            allowed,
            ancestors,
            label="prompt",
        )
        system = (
            self._template((*loc, "agent"), agent.system, allowed, ancestors, label="system")
            if agent.system
            else None
        )
        when = self._expression(
            (*loc, "when"), step.when, allowed - {"item"}, ancestors, label="when"
        )
        for_each = self._expression(
            (*loc, "for_each"), step.for_each, allowed - {"item"}, ancestors, label="for_each"
        )
        checks = tuple(
            check
            for position, source in enumerate(step.checks)
            if (
                check := self._expression(
                    (*loc, "checks", position),
                    source,
                    allowed | {"output"},
                    ancestors,
                    label="check",
                )
            )
        )
        tools = self._tools(agent, loc)
        if prompt is None or tools is None:
            return None
        plan = StepPlan(
            tools=tools,
            step=step,
            agent=agent,
            tier=tier,
            prompt=prompt,
            system=system,
            when=when,
            for_each=for_each,
            checks=checks,
            max_tokens=step.max_tokens or agent.max_tokens,
        )
        if plan.confidence is not None and plan.confidence.signal == "judge":
            judge = self._judge(plan, loc, allowed, ancestors)
            plan = replace(plan, judge=judge)
        if plan.cache is not None and plan.confidence and plan.confidence.signal == "consistency":
            self.report(
                (*loc, "cache") if step.cache is not None else (*loc, "agent"),
                "cache and confidence signal consistency do not go together: cached"
                " samples would all agree; turn one off (cache: false)",
            )
        return plan

    def _tools(self, agent: Agent, loc: tuple[str | int, ...]) -> tuple[Any, ...] | None:
        """The tools ``agent`` lists, imported; None (with problems reported) if one
        is unknown or cannot be offered."""
        found: dict[str, Any] = {}
        config = self.settings.config
        known = [*config.tools, *(f"{server}.<tool>" for server in config.mcp)]
        for name in agent.tools:
            if not self.settings.knows_tool(name):
                server, dot, _ = name.partition(".")
                hint = suggest(server, config.mcp) if dot else suggest(name, known)
                self.report(
                    (*loc, "agent"),
                    f"agent '{agent.name}' lists unknown tool '{name}'{hint};"
                    " tools are named in tierflow.yaml's tools: and mcp:"
                    f" ({', '.join(known) or 'none'})",
                )
                return None
            try:
                tool = self.settings.tool(name)
            except SpecError as exc:
                self.problems.extend(exc.problems)
                return None
            if tool.name in found:
                self.report(
                    (*loc, "agent"),
                    f"agent '{agent.name}' lists two tools the model would know as"
                    f" '{tool.name}' ({found[tool.name].source} and {tool.source})",
                )
                return None
            found[tool.name] = tool
        return tuple(found.values())

    def _uses(self, step: Step, loc: tuple[str | int, ...], ancestors: set[str]) -> StepPlan | None:
        """A uses: step's plan: the other workflow, loaded and checked (cycles refused),
        and its inputs from ``with``, compiled against this workflow's names."""
        assert step.uses is not None
        allowed = {"inputs", "steps", "run"}
        when = self._expression((*loc, "when"), step.when, allowed, ancestors, label="when")
        folder = self.settings.root / self.settings.config.workflows_dir
        path = folder / f"{step.uses}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
            self.report(
                (*loc, "uses"), f"unknown workflow '{step.uses}'{suggest(step.uses, known)}"
            )
            return None
        chain = [*self.stack, self.doc.path.resolve()]
        if path.resolve() in chain:
            names = " → ".join([*(p.stem for p in chain[chain.index(path.resolve()) :]), step.uses])
            self.report((*loc, "uses"), f"workflows form a cycle: {names}")
            return None
        try:
            child = load_workflow(path, self.settings, stack=tuple(chain))
        except SpecError as exc:
            self.report((*loc, "uses"), f"workflow '{step.uses}' has problems:")
            self.problems.extend(exc.problems)
            return None
        inputs: list[tuple[str, Any]] = []
        for name, value in step.with_.items():
            if name not in child.spec.inputs:
                known = list(child.spec.inputs)
                self.report(
                    (*loc, "with", name),
                    f"workflow '{step.uses}' has no input '{name}'{suggest(name, known)}",
                )
                continue
            inputs.append(
                (name, self._child_input((*loc, "with", name), value, allowed, ancestors))
            )
        longest = max((len(plan.id) for plan in child.steps), default=0)
        if len(step.id) + 1 + longest > MAX_STEP_ID_LENGTH:
            self.report(
                (*loc, "id"),
                f"'{step.id}.' and the longest step id of workflow '{step.uses}' make a name"
                f" over {MAX_STEP_ID_LENGTH} characters; shorten one of them",
            )
        missing = [
            name
            for name, spec in child.spec.inputs.items()
            if spec.required and name not in step.with_
        ]
        if missing:
            self.report((*loc, "with"), f"workflow '{step.uses}' needs input {', '.join(missing)}")
        return StepPlan(
            step=step,
            agent=CHILD_RUNNER,
            tier=self.settings.tier_names[0],
            prompt=Template("", label="uses"),
            system=None,
            when=when,
            for_each=None,
            checks=(),
            max_tokens=1,
            child=child,
            child_inputs=tuple(inputs),
        )

    def _child_input(
        self, loc: tuple[str | int, ...], value: Any, allowed: set[str], ancestors: set[str]
    ) -> Any:
        """A ``with`` value: a lone ``{{ expression }}`` keeps its type, other text is a
        template, anything else is given as written."""
        if not isinstance(value, str):
            return value
        lone = re.fullmatch(r"\s*\{\{(.*)\}\}\s*", value, flags=re.DOTALL)
        if lone is not None and "{{" not in lone.group(1) and "}}" not in lone.group(1):
            return self._expression(loc, lone.group(1).strip(), allowed, ancestors, label="with")
        return self._template(loc, value, allowed, ancestors, label="with")

    def _approval(
        self, step: Step, loc: tuple[str | int, ...], ancestors: set[str]
    ) -> StepPlan | None:
        """An approval step's plan: its message is its prompt, shown to a person."""
        assert step.approval is not None
        allowed = {"inputs", "steps", "run"}
        message = self._template(
            (*loc, "approval"), step.approval.message, allowed, ancestors, label="approval message"
        )
        when = self._expression((*loc, "when"), step.when, allowed, ancestors, label="when")
        if message is None:
            return None
        return StepPlan(
            step=step,
            agent=APPROVER,
            tier=self.settings.tier_names[0],
            prompt=message,
            system=None,
            when=when,
            for_each=None,
            checks=(),
            max_tokens=1,
        )

    def _judge(
        self,
        plan: StepPlan,
        loc: tuple[str | int, ...],
        allowed: set[str],
        ancestors: set[str],
    ) -> StepPlan | None:
        """The plan that grades ``plan``'s answers: the judge agent's prompt (or
        ``JUDGE_PROMPT``) sees the step's names, ``question`` (the prompt sent)
        and ``answer`` (the answer, as JSON for a schema step)."""
        confidence = plan.confidence
        assert confidence is not None and confidence.agent and confidence.tier
        where = (*loc, "confidence") if plan.step.confidence else (*loc, "agent")
        tiers = self.settings.tier_names
        if confidence.tier not in tiers:
            self.report(
                where,
                f"unknown judge tier '{confidence.tier}'{suggest(confidence.tier, tiers)};"
                f" tiers are {', '.join(tiers)}",
            )
            return None
        agent = self._agent(Step(id=plan.id, agent=confidence.agent), where)
        if agent is None:
            return None
        seen = allowed | {"question", "answer"}
        prompt = self._template(
            where, agent.prompt or JUDGE_PROMPT, seen, ancestors, label="judge prompt"
        )
        system = (
            self._template(where, agent.system, seen, ancestors, label="judge system")
            if agent.system
            else None
        )
        if prompt is None:
            return None
        step = Step(id=plan.id, agent=agent.name, tier=confidence.tier, output=JUDGE_SCHEMA)
        return StepPlan(
            step=step,
            agent=agent,
            tier=confidence.tier,
            prompt=prompt,
            system=system,
            when=None,
            for_each=None,
            checks=(),
            max_tokens=agent.max_tokens,
        )

    def _agent(self, step: Step, loc: tuple[str | int, ...]) -> Agent | None:
        assert step.agent is not None  # an approval step has none, and is planned apart
        if step.agent in self._agents:
            return self._agents[step.agent]
        agent = self._load_agent(step, loc)
        self._agents[step.agent] = agent
        return agent

    def _load_agent(self, step: Step, loc: tuple[str | int, ...]) -> Agent | None:
        path = self.agents_dir / f"{step.agent}.yaml"
        if not path.exists():
            known = (
                sorted(p.stem for p in self.agents_dir.glob("*.yaml"))
                if self.agents_dir.is_dir()
                else []
            )
            self.report(
                (*loc, "agent"),
                f"unknown agent '{step.agent}'{suggest(step.agent, known)} (looked in {self.agents_dir})",
            )
            return None
        try:
            return load_agent(path)  # its tier matters only where a step takes it
        except SpecError as exc:
            self.problems.extend(exc.problems)
            return None

    def _local_tier_from(self, tier: str) -> bool:
        names = self.settings.tier_names
        start = 0 if tier == AUTO_TIER else names.index(tier)
        return any(self.settings.config.tiers[name].local for name in names[start:])

    def _template(
        self,
        loc: tuple[str | int, ...],
        source: str,
        allowed: set[str],
        ancestors: set[str],
        *,
        label: str,
    ) -> Template | None:
        key = ("template", label, source)
        cached = self._compiled.get(key)
        if isinstance(cached, Template):
            template: Template | None = cached
        elif self._over_budget(loc):
            return None
        else:
            template = _compile_template(self.doc, loc, source, label=label, problems=self.problems)
            if template is not None:
                self._compiled[key] = template
                self._tokens += template.tokens
        if template is not None:
            self._check_references(loc, template, allowed, ancestors)
        return template

    def _expression(
        self,
        loc: tuple[str | int, ...],
        source: str | None,
        allowed: set[str],
        ancestors: set[str],
        *,
        label: str,
    ) -> Expression | None:
        if source is None:
            return None
        key = ("expression", label, source)
        cached = self._compiled.get(key)
        if cached is None and self._over_budget(loc):
            return None
        try:
            if isinstance(cached, TemplateProblem):
                raise cached
            expression = (
                cached if isinstance(cached, Expression) else Expression(source, label=label)
            )
        except TemplateProblem as exc:
            self._compiled[key] = exc
            braces = (
                "; write it without {{ }}: it is an expression already" if "{{" in source else ""
            )
            self.report(loc, f"bad expression: {exc}{braces}")
            return None
        if cached is None:
            self._tokens += expression.tokens
        self._compiled[key] = expression
        self._check_references(loc, expression, allowed, ancestors)
        return expression

    def _over_budget(self, loc: tuple[str | int, ...]) -> bool:
        """Past ``MAX_FILE_TOKENS``, nothing more is compiled: say so once, where it happened."""
        if self._tokens <= MAX_FILE_TOKENS:
            return False
        if not self._budget_told:
            self._budget_told = True
            self.report(
                loc,
                f"the templates and expressions of this workflow come to more than"
                f" {MAX_FILE_TOKENS:,} tokens (the limit); the rest are not checked",
            )
        return True

    def _check_references(
        self,
        loc: tuple[str | int, ...],
        compiled: Template | Expression,
        allowed: set[str],
        ancestors: set[str],
    ) -> None:
        # A template of the agent's file is said as such: "steps[0].agent: system: ...".
        of_agent = f"{compiled.label}: " if loc[-1] == "agent" else ""

        def report(message: str) -> None:
            self.report(loc, of_agent + message)

        for name in sorted(compiled.names):
            if name not in allowed:
                report(
                    f"unknown name '{name}'{suggest(name, allowed)}; templates see {', '.join(sorted(allowed))}",
                )
        for name, key, _line in compiled.references:
            if name == "inputs" and key not in self.spec.inputs:
                report(f"unknown input '{key}'{suggest(key, self.spec.inputs)}")
            elif name == "steps" and key not in ancestors:
                ids = [step.id for step in self.spec.steps]
                if key in ids:
                    report(f"reads steps.{key} but does not need it (add it to needs)")
                else:
                    report(f"unknown step '{key}'{suggest(key, ids)}")
        for step_id, attr in compiled.step_misreads:
            if step_id in ancestors:
                misread = f"steps.{step_id}" + (f".{attr}" if attr else "")
                report(f"{misread}: a step's answer is steps.{step_id}.output")
        for step_id, field in compiled.output_fields:
            fields = self._output_fields(step_id)
            if step_id in ancestors and fields is not None and field not in fields:
                report(
                    f"steps.{step_id}.output has no field '{field}'{suggest(field, fields)};"
                    f" its output schema gives {', '.join(fields) or 'none'}",
                )

    def _output_fields(self, step_id: str) -> list[str] | None:
        """The fields a step's output can have, when its schema says so: an object
        schema with ``properties`` and no ``additionalProperties``. None when any
        field may come (no schema, extra properties allowed, a for_each or uses step)."""
        step = next((step for step in self.spec.steps if step.id == step_id), None)
        if step is None or step.for_each is not None or step.uses is not None:
            return None
        schema = step.output
        if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
            return None
        if schema.get("additionalProperties", False) is not False:
            return None
        if any(key in schema for key in _SCHEMA_OPENERS):
            return None
        return list(schema["properties"])


def _compile_template(
    doc: YamlDoc,
    loc: tuple[str | int, ...],
    source: str,
    *,
    label: str,
    problems: list[str] | None = None,
) -> Template | None:
    try:
        return Template(source, label=label)
    except TemplateProblem as exc:
        line = doc.text_line(loc, exc.line)
        message = f"{doc.path}:{line}: {format_loc(loc)}: bad template: {exc}"
        if problems is None:
            raise SpecError(message) from None
        problems.append(message)
        return None
