"""The ``tierflow`` command: thin Typer commands over the package.

Exit codes: 0 success, 1 the run failed, 2 bad input or spec. A ``UserError``
prints one message and no traceback. Heavy modules load inside the commands,
so ``tierflow --help`` stays instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.util
import io
import json
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from orchestrator.encoding import usd
from orchestrator.errors import TierflowError, UserError, clip, redact

if TYPE_CHECKING:
    from rich.console import Console

    from orchestrator import reports
    from orchestrator.budgets import BudgetStatus
    from orchestrator.ledger import Call, StepRecord
    from orchestrator.runner import RunResult
    from orchestrator.settings import Settings
    from orchestrator.spec import LoadedWorkflow
    from orchestrator.store import Store

app = typer.Typer(
    name="tierflow",
    help="Run YAML workflows on tiered models: local first, frontier where it pays. Every call is costed in a SQL ledger.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"tierflow {version('tierflow')}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print tierflow's version."
        ),
    ] = False,
) -> None:
    """Run YAML workflows on tiered models: local first, frontier where it pays. Every call is costed in a SQL ledger."""


db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
cache_app = typer.Typer(help="Answers kept for steps that say cache:.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="tierflow.yaml to use (else $TIERFLOW_CONFIG, else the first tierflow.yaml"
        " here or in a folder above).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
WorkflowArgument = Annotated[
    str, typer.Argument(help="A workflow name (workflows/NAME.yaml) or a path.")
]
InputOption = Annotated[
    list[str] | None, typer.Option("--input", "-i", help="key=value; repeatable.")
]
TagOption = Annotated[
    list[str] | None,
    typer.Option("--tag", "-t", help="key=value, a tag of the run (team=growth); repeatable."),
]
InputsFileOption = Annotated[Path | None, typer.Option("--inputs", help="A JSON file of inputs.")]
T = TypeVar("T")


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (logs, CI) gets a width that fits a ledger line instead of 80.
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 140)


def escape(text: str) -> str:
    """``text`` printed as it is: answers, errors and names are data, never rich markup."""
    from rich.markup import escape as markup_escape

    return markup_escape(text)


_told_defaults = False


def _settings(config: str | None) -> Settings:
    """The project's settings; with no tierflow.yaml found, the built-in ones, said once."""
    from orchestrator.settings import load_settings

    global _told_defaults
    settings = load_settings(config)
    if settings.path is None and not _told_defaults:
        _told_defaults = True
        typer.echo(
            f"no tierflow.yaml in {Path.cwd()} or a folder above it: using built-in defaults"
            " (the embedded model on one tier); `tierflow init` makes a project",
            err=True,
        )
    return settings


def _store(settings: Settings) -> Store:
    from orchestrator.store import open_store

    return open_store(settings)


def _store_to_read(settings: Settings, nothing: Callable[[], None]) -> Store:
    """The store, for a command that only reads: a SQLite database that does not
    exist yet is not made; ``nothing`` says so, and the command ends (exit 0)."""
    path = settings.sqlite_path
    if path is not None and not path.exists():
        nothing()
        raise typer.Exit(0)
    return _store(settings)


def _nothing_ran(settings: Settings) -> None:
    typer.echo(f"nothing has run here yet (no database at {settings.sqlite_path})", err=True)


def _print_json(data: Any) -> None:
    from orchestrator.encoding import dumps

    sys.stdout.write(dumps(data, indent=2) + "\n")


@app.command()
def init(
    folder: Annotated[
        Path, typer.Argument(help="Where to make the project (default: here).")
    ] = Path("."),
) -> None:
    """Make a project: a commented tierflow.yaml, a workflow, its agent and a .gitignore."""
    from orchestrator.scaffold import init as make_project

    written = make_project(folder)
    for path in written:
        typer.echo(f"wrote {path}")
    where = "" if folder.resolve() == Path.cwd() else f"cd {folder} && "
    typer.echo(f"next: {where}tierflow run hello")
    if importlib.util.find_spec("llama_cpp") is None:
        typer.echo(
            "the light tier's embedded model needs llama-cpp-python:"
            " pip install 'tierflow[embedded]' (or uncomment the Ollama model)",
            err=True,
        )


@app.command()
def validate(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Workflow, agent or tierflow.yaml files, or folders of them (searched"
            " recursively). Default: the whole project."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Check files; print FILE:LINE: field: message for each problem. Exit 0 valid, 2 invalid.

    Checking the whole project also says which tiers cannot serve (see tierflow
    doctor), as warnings: files can be valid where no key is set."""
    from orchestrator.validation import validate_paths

    problems, checked = validate_paths(paths or [], config=config)
    if problems:
        for problem in problems:
            typer.echo(_from_here(problem), err=True)
        raise typer.Exit(2)
    if not paths:
        from orchestrator.doctor import readiness, tiers_that_cannot_serve

        for tier, reasons in tiers_that_cannot_serve(readiness(_settings(config))).items():
            typer.echo(f"warning: tier {tier} cannot serve: {'; '.join(reasons)}", err=True)
    typer.echo(f"ok: {checked} file{'' if checked == 1 else 's'} checked")


@app.command()
def doctor(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Can each tier serve? Each model: where it runs, reachable, key, price.
    Exit 0 when every tier can serve (one of its models), 1 when one cannot."""
    from dataclasses import asdict

    from orchestrator.doctor import readiness, tiers_that_cannot_serve

    found = readiness(_settings(config))
    unserved = tiers_that_cannot_serve(found)
    if as_json:
        _print_json({"models": [asdict(row) for row in found], "cannot_serve": unserved})
    else:
        from rich.table import Table

        table = Table()
        for column in ("tier", "model", "where", "reachable", "key", "price", "problem"):
            table.add_column(column)
        for row in found:
            table.add_row(
                row.tier,
                row.model,
                escape(row.where),
                row.reachable,
                row.key,
                row.price,
                escape(row.problem or ""),
            )
        console = _console()
        console.print(table)
        for tier in unserved:
            console.print(f"tier {tier} cannot serve: none of its models is ready", markup=False)
        if not unserved:
            console.print("every tier can serve", markup=False)
    if unserved:
        raise typer.Exit(1)


@app.command()
def schema(
    kind: Annotated[
        str | None, typer.Argument(help="workflow, agent or config; all three if omitted.")
    ] = None,
) -> None:
    """Print the JSON Schema of workflow, agent and tierflow.yaml files, for editors."""
    from orchestrator.validation import json_schemas

    schemas = json_schemas()
    if kind is None:
        _print_json(schemas)
    elif kind in schemas:
        _print_json(schemas[kind])
    else:
        raise UserError(f"schema {kind!r}: choose one of {', '.join(schemas)}")


@app.command()
def run(
    workflow: WorkflowArgument,
    inputs: InputOption = None,
    inputs_file: InputsFileOption = None,
    tags: TagOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Render each step's prompt and print its worst-case cost, and the"
            " budgets that would apply; call no model, record nothing.",
        ),
    ] = False,
) -> None:
    """Run a workflow here and now, then print its outputs and what it spent."""
    from orchestrator import reports
    from orchestrator.runner import Runner

    settings, loaded, values = _load_with_inputs(config, workflow, inputs, inputs_file)
    if dry_run:
        _dry_run(settings, loaded, values, as_json)
        return
    _warn_unserved(settings, loaded)
    store = _store(settings)
    console = _console(stderr=as_json)
    runner = Runner(
        settings=settings, store=store, on_step=None if as_json else _step_printer(console)
    )
    with (
        console.status(f"running {loaded.name}…", spinner="dots")
        if not as_json
        else contextlib.nullcontext()
    ):
        result = asyncio.run(runner.run(loaded, values, tags=dict(reports.tag_pairs(tags))))
    if as_json:
        _print_json(_run_json(result))
    else:
        _print_run_summary(console, store, result.run_id)
    _exit_unless_ok(result.status)


def _warn_unserved(settings: Settings, loaded: LoadedWorkflow) -> None:
    """Before a run: each tier its steps may climb to that cannot serve, and why
    (a missing key is found now, not after the local attempts)."""
    from orchestrator.doctor import readiness, tiers_that_cannot_serve
    from orchestrator.scheduler import ladder

    reached = {name for plan in _all_plans(loaded) for name, _ in ladder(settings, plan)}
    found = [row for row in readiness(settings) if row.tier in reached]
    for tier, reasons in tiers_that_cannot_serve(found).items():
        typer.echo(
            f"tier {tier} will be skipped: {'; '.join(reasons)} (tierflow doctor says more)",
            err=True,
        )


def _all_plans(loaded: LoadedWorkflow) -> list[Any]:
    """Its steps' plans, a sub-workflow's steps included; approvals have no ladder."""
    plans = []
    for plan in loaded.steps:
        if plan.child is not None:
            plans.extend(_all_plans(plan.child))
        elif plan.step.approval is None:
            plans.append(plan)
    return plans


def _dry_run(
    settings: Settings, loaded: LoadedWorkflow, values: dict[str, Any], as_json: bool
) -> None:
    from dataclasses import asdict

    from orchestrator import budgets, dryrun

    steps = dryrun.estimate(settings, loaded, loaded.resolve_inputs(values))
    total = sum((step.worst_usd for step in steps), Decimal(0))
    limits = budgets.limits(
        settings, loaded.name, loaded.spec.budget, None, datetime.now(UTC).date()
    )
    applying = [(limit.label, limit.usd) for limit in limits]
    per_run = loaded.spec.budget.per_run_usd
    if per_run is not None:
        applying.insert(0, (f"per-run budget of workflow '{loaded.name}'", per_run))
    per_item = any(step.per_item for step in steps)
    if as_json:
        _print_json(
            {
                "workflow": loaded.name,
                "steps": [asdict(step) for step in steps],
                "worst_usd": total,
                "per_item": per_item,
                "budgets": [{"budget": label, "limit_usd": usd_} for label, usd_ in applying],
            }
        )
        return
    console = _console()
    for step in steps:
        reach = " → ".join(step.tiers) or "no model"
        each = " per item" if step.per_item else ""
        calls = f"{step.calls} call{'' if step.calls == 1 else 's'}"
        console.print(
            f"[bold]{step.step_id}[/]  {reach}  up to {calls}, {usd(step.worst_usd)}{each}"
        )
        if step.note:
            console.print(f"  {escape(step.note)}")
        if step.when:
            console.print(f"  runs only when: {step.when}", markup=False)
        for check in step.checks:
            console.print(f"  its answer must pass: {check}", markup=False)
        if step.prompt:
            for line in step.prompt.splitlines():
                console.print(f"  | {line}", markup=False, soft_wrap=True)
    items = " (for_each steps counted for one item)" if per_item else ""
    console.print(f"worst case for the run: {usd(total)}{items}; no model was called")
    for label, limit in applying:
        console.print(f"budget: {label}: {usd(limit)}", markup=False)
    if not applying:
        console.print("no budget applies (budget: in the workflow or tierflow.yaml sets one)")


def _exit_unless_ok(status: str) -> None:
    """Exit 1 for a run that failed or was cancelled; one that waits for a person is fine."""
    if status not in ("succeeded", "waiting"):
        raise typer.Exit(1)


def _run_json(result: RunResult) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "workflow": result.workflow,
        "status": result.status,
        "error": result.error,
        "cost_usd": result.cost_usd,
        "outputs": result.outputs,
    }


@app.command()
def enqueue(
    workflow: WorkflowArgument,
    inputs: InputOption = None,
    inputs_file: InputsFileOption = None,
    tags: TagOption = None,
    config: ConfigOption = None,
) -> None:
    """Queue a run for a worker; prints the run id as the last line."""
    from orchestrator import reports
    from orchestrator.client import Client

    settings, loaded, values = _load_with_inputs(config, workflow, inputs, inputs_file)
    with Client(settings=settings) as client:
        typer.echo(client.enqueue_loaded(loaded, values, tags=dict(reports.tag_pairs(tags))))


@app.command("eval")
def eval_(
    workflow: WorkflowArgument,
    cases: Annotated[
        Path,
        typer.Option("--cases", help='JSON lines: {"inputs": {...}, "expect": {STEP: VALUE}}.'),
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", "-p", help="as-written (default), auto or tier:NAME; repeatable."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N cases.")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run labelled cases under tiering policies: quality, cost, escalations, signals' AUROC."""
    from orchestrator import evaluation
    from orchestrator.spec import find_workflow, load_workflow

    settings = _settings(config)
    loaded = load_workflow(find_workflow(workflow, settings), settings)
    policies = evaluation.policies_of(policy or [], settings)
    found = evaluation.load_cases(cases, loaded, limit=limit)
    store = _store(settings)
    with _eval_progress(len(found) * len(policies)) as advance:
        result = asyncio.run(
            evaluation.evaluate(settings, store, loaded, found, policies, on_case=advance)
        )
    figures = result.as_dict()
    if as_json:
        _print_json(figures)
    else:
        _print_eval(figures, settings)


@contextlib.contextmanager
def _eval_progress(total: int) -> Any:
    """A progress bar on a terminal's stderr; nothing when stderr is not one."""
    if not sys.stderr.isatty():
        yield lambda policy, done: None
        return
    from rich.progress import Progress

    with Progress(console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task("cases", total=total)

        def advance(policy: str, done: int) -> None:
            progress.update(task, advance=1, description=policy)

        yield advance


def _print_eval(figures: dict[str, Any], settings: Settings) -> None:
    from rich.table import Table

    simulated = [name for name, tier in settings.config.tiers.items() if tier.simulated]

    def tiers(counts: dict[str, int]) -> str:
        marked = ((f"{n} (simulated)" if n in simulated else n, c) for n, c in counts.items())
        return ", ".join(f"{name} {count}" for name, count in marked) or "-"

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    table = Table(title=f"{figures['workflow']}: {figures['cases']} cases")
    for heading in (
        "policy", "quality (95% CI)", "cost", "per case", "of strongest", "saved",
        "calls by tier", "esc/case", "false accepts", "wasted", "p50/p95 ms", "PGR",
    ):  # fmt: skip
        table.add_column(
            heading,
            justify="left" if heading in ("policy", "calls by tier") else "right",
            no_wrap=heading == "policy",
        )
    for row in figures["policies"]:
        low, high = row["quality_ci"]
        table.add_row(
            row["policy"]
            + (" (simulated)" if row["policy"].removeprefix("tier:") in simulated else ""),
            f"{row['quality']:.1%} ({low:.0%}-{high:.0%})",
            usd(Decimal(row["cost_usd"])),
            usd(Decimal(row["cost_per_case_usd"])),
            share(row["cost_share"]),
            usd(Decimal(row["savings_usd"])),
            tiers(row["calls_by_tier"]),
            f"{row['escalations_per_case']:.2f}",
            tiers(row["false_accepts"]),
            str(row["wasted_calls"]),
            f"{row['latency_ms_p50']:.0f}/{row['latency_ms_p95']:.0f}",
            share(row["pgr"]),
        )
    console = _console()
    console.print(table)
    if simulated:
        console.print(
            f"simulated: tier {', '.join(simulated)} is served by a stand-in, not a real model"
        )
    for name, signal in figures["signals"].items():
        told = "n/a" if signal["auroc"] is None else f"{signal['auroc']:.3f}"
        why = ""
        if signal["auroc"] is None:
            why = f" (needs --policy tier:{signal['tier']} and both right and wrong answers)"
        console.print(
            f"signal {name}: AUROC {told} on {signal['answers']} answers of tier"
            f" {signal['tier']}, {signal['right']} right{why}"
        )


@app.command()
def feedback(
    run_id: Annotated[str, typer.Argument(help="The run (or a unique prefix of its id).")],
    step: Annotated[str, typer.Argument(help="The step whose answer you label.")],
    good: Annotated[
        bool | None, typer.Option("--good/--bad", help="Was the step's answer right?")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Why, for whoever reads it later.")] = None,
    config: ConfigOption = None,
) -> None:
    """Label a step's answer good or bad: tier: auto counts it where the answer came from."""
    if good is None:
        raise UserError("say --good or --bad")
    store = _store(_settings(config))
    found = store.named_run_id(run_id)
    store.add_feedback(found, step, good=good, note=note)
    typer.echo(f"{'good' if good else 'bad'}: {found} {step}")


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="The run to stop (or a unique prefix of its id).")],
    config: ConfigOption = None,
) -> None:
    """Cancel a queued or running run; a running one stops within a second."""
    store = _store(_settings(config))
    run_id = store.named_run_id(run_id)
    status = store.cancel_run(run_id)
    if status != "cancelled":
        raise UserError(f"run {run_id} already {status}")
    typer.echo(f"cancelled {run_id}")


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    config: ConfigOption = None,
) -> None:
    """Carry on here a run whose process died; finished steps are not run again."""
    from orchestrator.errors import LeaseLost
    from orchestrator.runner import Runner
    from orchestrator.spec import load_workflow

    settings = _settings(config)
    store = _store(settings)
    row = store.named_run(run_id)
    if row["status"] not in ("queued", "running"):
        raise UserError(f"run {row['id']} already {row['status']}: nothing to resume")
    loaded = load_workflow(settings.root / row["workflow_path"], settings)
    console = _console()
    runner = Runner(settings=settings, store=store, on_step=_step_printer(console))
    try:
        result = asyncio.run(runner.execute(loaded, row["id"], row=row))
    except LeaseLost as exc:
        raise UserError(f"run {row['id']}: {exc}") from None
    if result is None:
        raise UserError(
            f"run {row['id']} is being executed by {row['lease_owner']}; its lease is live"
        )
    _print_run_summary(console, store, result.run_id)
    _exit_unless_ok(result.status)


@app.command()
def tools(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The tools tierflow.yaml names, and those its MCP servers list: where each comes
    from, its limits and its JSON schema. Each MCP server is started to ask it."""
    settings = _settings(config)
    found = [(name, settings.tool(name)) for name in settings.config.tools]  # SpecError: exit 2
    for server in settings.config.mcp:
        found.extend((f"{server}.{tool.name}", tool) for tool in settings.mcp_tools(server))
    listed = [
        {
            "name": name,
            "source": tool.source,
            "description": tool.description,
            "timeout_s": tool.timeout_s,
            "max_output_bytes": tool.max_output_bytes,
            "parameters": tool.parameters,
        }
        for name, tool in found
    ]
    if as_json:
        _print_json(listed)
        return
    console = _console()
    if not listed:
        console.print("no tools: name them in tierflow.yaml under tools: or mcp:")
    for entry in listed:
        console.print(
            f"[bold]{entry['name']}[/]  {escape(entry['source'])}"
            f"  (timeout {entry['timeout_s']:g}s, result cut at {entry['max_output_bytes']} bytes)"
        )
        if entry["description"]:
            console.print(f"  {escape(entry['description'])}")
        console.print(f"  {json.dumps(entry['parameters'])}", markup=False)


@app.command()
def approve(
    run_id: Annotated[str, typer.Argument(help="A waiting run's id, or a unique prefix of one.")],
    step: Annotated[str, typer.Argument(help="The approval step it waits on.")],
    reject: Annotated[
        bool, typer.Option("--reject", help="Reject instead: the run fails with the note.")
    ] = False,
    note: Annotated[
        str | None, typer.Option(help="Why; later steps see it as the step's note.")
    ] = None,
    by: Annotated[
        str | None, typer.Option(help="Who decides (default: this machine's user name).")
    ] = None,
    enqueue: Annotated[
        bool,
        typer.Option(
            "--enqueue", help="Carry on on the queue, not here (a queued run always does)."
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Decide on an approval step: the run carries on (here, or on the queue), or fails."""
    import getpass

    from orchestrator.client import Client
    from orchestrator.runner import Runner

    with Client(config=config) as client:
        row = client.store.named_run(run_id)
        queued = enqueue or row["queue"] is not None
        # Loaded before the decision: a workflow that no longer loads leaves the run waiting.
        workflow = None if queued else client.workflow_of_run(row["id"])[0]
        found, status = client.decide(
            row["id"],
            step,
            approved=not reject,
            note=note,
            by=by or getpass.getuser(),
            enqueue=queued,
        )
        if status == "failed":
            typer.echo(f"rejected: run {found} failed")
            return
        if queued:
            typer.echo(f"approved: run {found} is queued for a worker")
            return
        assert workflow is not None
        console = _console()
        runner = Runner(
            settings=client.settings, store=client.store, on_step=_step_printer(console)
        )
        result = asyncio.run(runner.execute(workflow, found))
        if result is None:
            raise UserError(f"run {found} is being executed elsewhere")
        _print_run_summary(console, client.store, found)
    _exit_unless_ok(result.status)


@app.command()
def retry(
    run_id: Annotated[str, typer.Argument(help="An ended run's id, or a unique prefix of one.")],
    from_step: Annotated[
        str | None,
        typer.Option("--from", help="Run this step and every step that needs it again too."),
    ] = None,
    enqueue: Annotated[
        bool, typer.Option("--enqueue", help="Queue the retry for a worker; print its id.")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """A new run with the same inputs that reuses every step that finished and runs the rest."""
    from orchestrator.client import Client

    with Client(config=config) as client:
        if enqueue:
            typer.echo(client.retry(run_id, from_step=from_step))
            return
        workflow, found = client.workflow_of_run(run_id)
        settings, store = client.settings, client.store
        console = _console(stderr=as_json)
        from orchestrator.runner import Runner

        runner = Runner(
            settings=settings, store=store, on_step=None if as_json else _step_printer(console)
        )
        result = asyncio.run(runner.retry(workflow, found, from_step=from_step))
        if as_json:
            _print_json(_run_json(result))
        else:
            _print_run_summary(console, store, result.run_id)
    _exit_unless_ok(result.status)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Runs executed at once by this worker.")] = 2,
    tiers: Annotated[
        str | None,
        typer.Option(help="Comma-separated tiers whose steps this worker runs (default: all)."),
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(help="Comma-separated queues (default: those of the tiers it runs)."),
    ] = None,
    events: Annotated[
        bool,
        typer.Option(
            "--events/--no-events",
            "-E",
            help="Send task events, which Flower and `celery events` show (Celery's -E).",
        ),
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Execute queued runs until stopped (Celery worker, with the stale-lease sweeper)."""
    from orchestrator.loading import suggest
    from orchestrator.queue import check_tier_queues, embedded_broker_warning, run_worker

    settings = _settings(config)
    served = tiers.split(",") if tiers else None
    if served is not None:
        for tier in served:
            if tier not in settings.config.tiers:
                hint = suggest(tier, settings.tier_names)
                raise UserError(f"--tiers: no tier '{tier}' in the configuration{hint}")
        check_tier_queues(settings, served)
    warning = embedded_broker_warning(settings)
    if warning is not None:
        typer.echo(f"warning: {warning}", err=True)
    run_worker(
        settings,
        concurrency=concurrency,
        queues=queues.split(",") if queues else None,
        tiers=served,
        events=events,
    )


@app.command()
def beat(config: ConfigOption = None) -> None:
    """Enqueue workflows on their `schedule:` (cron, UTC) until stopped (Celery beat)."""
    from orchestrator.queue import run_beat

    run_beat(_settings(config))


def _load_with_inputs(
    config: str | None, workflow: str, pairs: list[str] | None, inputs_file: Path | None
) -> tuple[Settings, LoadedWorkflow, dict[str, Any]]:
    """Settings, the checked workflow and its inputs; bad inputs stop here, before any run."""
    from orchestrator.spec import find_workflow, load_workflow

    settings = _settings(config)
    loaded = load_workflow(find_workflow(workflow, settings), settings)
    values = _gather_inputs(loaded.spec.inputs, pairs or [], inputs_file)
    try:
        loaded.resolve_inputs(values)
    except UserError as exc:
        declared = loaded.spec.inputs.items()
        missing = [
            f"-i {name}=..." for name, spec in declared if spec.required and name not in values
        ]
        raise UserError(f"{exc}; pass {' '.join(missing)}" if missing else str(exc)) from None
    return settings, loaded, values


def _gather_inputs(
    declared: dict[str, Any], pairs: list[str], inputs_file: Path | None
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if inputs_file is not None:
        try:
            loaded = json.loads(inputs_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{inputs_file}: cannot read inputs: {exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{inputs_file}: inputs must be a JSON object")
        values.update(loaded)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UserError(f"-i {pair!r}: expected key=value")
        kind = getattr(declared.get(key), "type", "string")
        if kind == "string":
            values[key] = text
        else:
            try:
                values[key] = json.loads(text)
            except ValueError:
                example = {"array": '["a", "b"]', "object": '{"k": 1}', "boolean": "true"}.get(
                    kind, "3"
                )
                raise UserError(
                    f"-i {key}: {text!r} is not a valid {kind}; {kind} inputs take JSON,"
                    f" e.g. -i '{key}={example}'"
                ) from None
    return values


def _step_printer(console: Console) -> Callable[[StepRecord], None]:
    """Prints each step as it ends; a model skipped for the same reason again (an
    Ollama that is not running, under every step) is said once per run."""
    from orchestrator.spec import APPROVER, CHILD_RUNNER

    said: set[tuple[str, str | None]] = set()

    def show(record: StepRecord) -> None:
        answer = record.answer
        marks = {"succeeded": "[green]✓[/]", "skipped": "[dim]–[/]", "waiting": "[yellow]…[/]"}
        mark = marks.get(record.status, "[red]✗[/]")
        if record.status == "waiting":
            message = (record.output or {}).get("message", "")
            console.print(
                f"{mark} [bold]{record.step_id}[/]  waits for approval: {escape(message)}"
            )
            return
        if record.agent == APPROVER.name and record.status == "succeeded":
            decision = record.output or {}
            note = f": {decision['note']}" if decision.get("note") else ""
            by = escape(decision["by"] + note)
            console.print(f"{mark} [bold]{record.step_id}[/]  approved by {by}")
            return
        where = (
            f"{_tier(answer.tier_used, answer.simulated)} · {answer.model}"
            + (" · cache hit" if answer.outcome == "cache_hit" else "")
            if answer
            else record.status
        )
        if record.agent == CHILD_RUNNER.name and record.status == "succeeded":
            where = f"ran its workflow: the {record.step_id}.* steps"
        if record.status == "skipped":
            where = "skipped: its when was false"
        tokens = sum(c.prompt_tokens + c.completion_tokens for c in record.calls)
        seconds = (record.finished_at - record.started_at).total_seconds()
        console.print(
            f"{mark} [bold]{record.step_id}[/]  {escape(where)}  {tokens} tok"
            f"  {usd(record.cost_usd)}  {seconds:.1f}s"
        )
        told_all = True  # every failed attempt of this step has its line below
        for call in record.calls:
            for tool in (t for t in record.tools if t.attempt == call.attempt):
                what = f"tool {tool.name} {tool.outcome} {tool.duration_ms:.0f} ms"
                console.print(
                    f"    [dim]{escape(what + (f': {tool.error}' if tool.error else ''))}[/]"
                )
            if call.outcome == "unavailable":
                if (call.model, call.error) not in said:
                    said.add((call.model, call.error))
                    console.print(f"    [dim]skipped {escape(f'{call.model}: {call.error}')}[/]")
                else:
                    told_all = False  # said under an earlier step
            elif call.outcome not in ("ok", "cache_hit", "tool_calls"):
                tier = _tier(call.tier_used, call.simulated)
                console.print(
                    f"    [yellow]{call.outcome}[/] {escape(f'{tier} · {call.model}: {call.error}')}"
                )
        if record.error:
            error = _beyond_attempts(record.error, record.calls) if told_all else record.error
            console.print(f"    [red]{escape(error)}[/]")

    return show


def _beyond_attempts(error: str, calls: list[Call]) -> str:
    """A failed step's ``error`` up to where it repeats its attempts' own errors,
    which the lines above it said already."""
    details = [d for c in calls if c.error for d in (f"{c.tier_used}/{c.model}: ", c.error)]
    cut = min((error.find(detail) for detail in details if detail in error), default=-1)
    return error[:cut].rstrip(": ;") if cut > 0 else error


def _tier(name: str, simulated: bool | None) -> str:
    """A tier's name as tables show it: a simulated one says so."""
    return f"{name} (simulated)" if simulated else name


def _simulated_note(cost: Decimal) -> str:
    return (
        f"{usd(cost)} of the cost is simulated: a tier marked simulated answered,"
        " priced as its real model would charge. Nobody was billed for it."
    )


def _print_run_summary(console: Console, store: Store, run_id: str) -> None:
    from rich.table import Table

    found = store.run(run_id)
    assert found is not None
    outputs = found["outputs"] or {}
    if outputs:
        console.print()
        for step_id, output in outputs.items():
            text = output if isinstance(output, str) else json.dumps(output, indent=2)
            console.print(f"[bold]{step_id}[/]:", escape(text))
    table = Table(title=f"spend for run {run_id[:12]}", title_justify="left")
    for column in ("step", "tier", "model", "tokens in", "tokens out", "cost", "all-frontier"):
        table.add_column(column, justify="left" if column in ("step", "tier", "model") else "right")
    for call in found["calls"]:
        if call["outcome"] == "unavailable":
            continue
        table.add_row(
            call["step_id"],
            _tier(call["tier_used"], call["simulated"]),
            call["model"] + (" (cache hit)" if call["outcome"] == "cache_hit" else ""),
            str(call["prompt_tokens"]),
            str(call["completion_tokens"]),
            usd(call["cost_usd"]),
            usd(call["reference_cost_usd"]),
        )
    total_cost, total_reference, simulated = _totals(found)
    table.add_section()
    table.add_row("total", "", "", "", "", usd(total_cost), usd(total_reference))
    if simulated:
        table.caption, table.caption_justify = _simulated_note(simulated), "left"
    console.print()
    console.print(table)
    if found["status"] == "waiting":
        for step in found["steps"]:
            if step["status"] == "waiting":
                console.print(
                    f"waiting · run id {run_id} · step {step['step_id']} waits for a person:"
                    f" tierflow approve {run_id[:12]} {step['step_id']} [--reject --note TEXT]",
                    markup=False,
                )
        return
    console.print(f"{found['status']} · run id {run_id} · {_outcome_of_spend(found)}")


def _totals(found: dict[str, Any]) -> tuple[Decimal, Decimal, Decimal]:
    """A recorded run's cost, its all-frontier counterfactual and the simulated part of its cost."""
    cost = reference = simulated = Decimal(0)
    for call in found["calls"]:
        cost += call["cost_usd"]
        reference += call["reference_cost_usd"] or 0
        simulated += call["cost_usd"] if call["simulated"] else 0
    return cost, reference, simulated


def _outcome_of_spend(found: dict[str, Any]) -> str:
    """What a run cost, and what it saved against all-frontier: only a run that
    succeeded saved anything (a failed one bought no answer to compare)."""
    from orchestrator.store.runs import UNENDED

    cost, reference, _ = _totals(found)
    if found["status"] in UNENDED:
        return f"spent {usd(cost)} so far"
    if found["status"] != "succeeded":
        return f"spent {usd(cost)}, and saved nothing: the run {found['status']}"
    return (
        f"spent {usd(cost)} · saved {usd(reference - cost)} against all-frontier ({usd(reference)})"
    )


@app.command()
def runs(
    workflow: Annotated[str | None, typer.Option(help="Only this workflow.")] = None,
    status: Annotated[
        str | None,
        typer.Option(help="queued, running, waiting, succeeded, failed or cancelled."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Most recent N runs.")] = 50,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """List recent runs, newest first."""
    from rich.table import Table

    from orchestrator.store.runs import checked_status

    checked_status(status)  # before a missing database could hide the mistake
    settings = _settings(config)
    store = _store_to_read(settings, lambda: _print_json([]) if as_json else _nothing_ran(settings))
    rows = store.runs(workflow=workflow, status=status, limit=limit)
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for column in ("run id", "workflow", "status", "started", "error"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["id"],
            row["workflow"] + (" (eval)" if row["eval"] else ""),
            f"{row['status']} (stale: no live executor; tierflow resume {row['id'][:12]})"
            if row["stale"]
            else row["status"],
            f"{row['created_at']:%Y-%m-%d %H:%M:%S}",
            escape(clip(row["error"] or "", 60)),
        )
    _console().print(table)


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Print each step as it ends, until the run ends or waits."
        ),
    ] = False,
    trace: Annotated[
        bool,
        typer.Option(
            "--trace", help="Also what each call was sent and got back (steps with trace: on)."
        ),
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """A run's status, cost, savings, duration, inputs and outputs, then each step's
    attempts: tiers, escalations, tokens, cost, latency."""
    settings = _settings(config)
    store = _store_to_read(settings, lambda: _no_run(run_id))
    found = store.run(run_id)
    if found is None:
        _no_run(run_id)
    if as_json:
        _print_json(found)
        return
    console = _console()
    if follow:
        _follow(console, store, found, settings)
        return
    _print_run_title(console, found)
    _print_run_header(console, found, settings)
    if not trace:
        found = {**found, "traces": []}
    for step in found["steps"]:
        _print_step(console, step, found)
    if trace and not found["traces"]:
        console.print(
            "no traces: this run's calls were not traced (set trace: true in tierflow.yaml"
            " or on a step, then run again)",
            markup=False,
        )


def _follow(console: Console, store: Store, found: dict[str, Any], settings: Settings) -> None:
    """Print the run's steps as they end, read from the database (so a queued run
    on another machine shows too), then its header; exit as ``tierflow run`` would."""
    import time

    from orchestrator.store.runs import UNENDED, WAITING

    console.print(f"following {found['workflow']}  run {found['id']}", markup=False)
    shown: set[tuple[str, str]] = set()
    while True:
        for step in found["steps"]:
            if (step["step_id"], step["status"]) not in shown:
                shown.add((step["step_id"], step["status"]))
                _print_step(console, step, {**found, "traces": []})
        if found["status"] not in UNENDED or found["status"] == WAITING:
            break
        time.sleep(FOLLOW_EVERY_S)
        found = store.run(found["id"]) or found
    _print_run_title(console, found)
    _print_run_header(console, found, settings)
    _exit_unless_ok(found["status"])


FOLLOW_EVERY_S = 0.5  # how often show --follow reads the run again


def _print_run_title(console: Console, found: dict[str, Any]) -> None:
    made_by = " (a tierflow eval run)" if found["eval"] else ""
    if found["retry_of"]:
        made_by += f" (a retry of run {found['retry_of']})"
    console.print(f"[bold]{found['status']}[/]  {found['workflow']}{made_by}  run {found['id']}")
    if found["error"]:
        console.print(f"[red]{escape(found['error'])}[/]")


def _print_step(console: Console, step: dict[str, Any], found: dict[str, Any]) -> None:
    """A step's line, then each of its attempts with its reasons and tool calls."""
    said = [f"asked {step['tier_asked']}"] if step["tier_asked"] else []
    if step["reused_from"]:
        said.append(f"reused from run {step['reused_from']}")
    told = f"  ({', '.join(said)})" if said else ""
    console.print(f"[bold]{step['step_id']}[/]  {step['status']}{told}")
    if step["error"]:
        console.print(f"  [red]{escape(step['error'])}[/]")
    for call in (c for c in found["calls"] if c["step_id"] == step["step_id"]):
        _print_call(console, call, found["tools"])
        for kept in found["traces"]:
            if (kept["step_id"], kept["attempt"]) == (call["step_id"], call["attempt"]):
                _print_trace(console, kept)


def _print_trace(console: Console, kept: dict[str, Any]) -> None:
    """A traced call: each message sent, then the answer, indented under the call."""
    for message in kept["messages"]:
        console.print(f"      > {message.get('role')}:", markup=False)
        for line in str(message.get("content") or "").splitlines() or [""]:
            console.print(f"        {line}", markup=False, soft_wrap=True)
    answer = kept["answer"]
    console.print("      < answer:" + ("" if answer is not None else " (none came)"), markup=False)
    for line in (answer or "").splitlines():
        console.print(f"        {line}", markup=False, soft_wrap=True)


def _print_call(console: Console, call: dict[str, Any], tools: list[dict[str, Any]]) -> None:
    item = "" if call["item_index"] is None else f" item {call['item_index']}"
    console.print(
        f"  #{call['attempt']}{item}  {_tier(call['tier_used'], call['simulated'])}"
        f" · {call['model']}  {call['outcome']}"
        f"  {call['prompt_tokens']}+{call['completion_tokens']} tok  {usd(call['cost_usd'])}"
        f"  {call['latency_ms']:.0f} ms",
        markup=False,
    )
    if call["error"]:
        console.print(f"      {call['error']}", markup=False)
    if call.get("signal"):
        console.print(f"      {_confidence(call)}", markup=False)
    if call.get("judged") is not None:
        console.print(f"      judge of #{call['judged']}", markup=False)
    if call.get("routed") in ("auto", "explore"):
        expected = call["expected_pass"]
        told = "" if expected is None else f", expected pass rate {expected:.2f}"
        console.print(f"      routed: {call['routed']}{told}", markup=False)
    elif call.get("routed") == "downgrade":
        console.print("      routed: downgrade (a budget held it below its tier)", markup=False)
    if call["escalation_reason"]:
        console.print(f"      escalated: {call['escalation_reason']}", markup=False)
    for tool in tools:
        if (tool["step_id"], tool["attempt"]) == (call["step_id"], call["attempt"]):
            console.print(
                f"      tool {tool['name']}  {tool['outcome']}  {tool['duration_ms']:.0f} ms"
                f"  arguments {tool['arguments_bytes']} B, result {tool['result_bytes']} B"
                + (f": {tool['error']}" if tool["error"] else ""),
                markup=False,
            )


QUEUED_TOO_LONG_LEASES = 3  # lease periods a queued run waits before show asks about workers


def _print_run_header(console: Console, found: dict[str, Any], settings: Settings) -> None:
    """When and how long, what it spent and saved, its inputs and outputs; for a
    run queued for longer than a few lease periods, that no worker has taken it."""
    from orchestrator.store.database import safe_url

    if found["status"] == "queued":
        since = found["enqueued_at"] or found["created_at"]
        waited = (datetime.now(UTC) - since.replace(tzinfo=since.tzinfo or UTC)).total_seconds()
        if waited > QUEUED_TOO_LONG_LEASES * settings.config.lease_ttl_s:
            broker = settings.broker_url
            where = safe_url(broker) if broker else "the embedded broker in .tierflow/broker"
            console.print(
                f"queued for {waited:.0f}s and no worker has taken it: is a `tierflow worker`"
                f" consuming queue {found['queue'] or settings.config.queue} on {where}?",
                markup=False,
            )
    started, ended = found["created_at"], found["finished_at"]
    took = "" if ended is None else f", took {(ended - started).total_seconds():.1f}s"
    console.print(f"started {started:%Y-%m-%d %H:%M:%S}{took}", markup=False)
    _, _, simulated = _totals(found)
    note = f" ({usd(simulated)} of it simulated)" if simulated else ""
    console.print(_outcome_of_spend(found) + note, markup=False)
    if found.get("tags"):
        told = " ".join(f"{key}={value}" for key, value in found["tags"].items())
        console.print(f"tags  {told}", markup=False)
    for label, value in (("inputs", found["inputs"]), ("outputs", found["outputs"])):
        if value:
            text = redact(json.dumps(value, ensure_ascii=False), settings.key_names)
            console.print(f"{label}  {text[:2000]}", markup=False)


def _no_run(run_id: str) -> NoReturn:
    raise UserError(f"no run {run_id!r}")


def _confidence(call: dict[str, Any]) -> str:
    score = call["confidence"]
    if score is None:
        return f"confidence ({call['signal']}): unavailable, the backend gave nothing to score"
    raw = call.get("raw_confidence")
    if raw is None:
        return (
            f"confidence ({call['signal']}): {score:.3f}, raw (not calibrated: the step has"
            " too few labels on this model yet)"
        )
    return f"confidence ({call['signal']}): {score:.3f}, calibrated (raw {raw:.3f})"


@app.command()
def spend(
    by: Annotated[
        str | None,
        typer.Option(
            help="workflow, version, step, tier, model, day or tag:KEY; several joined by"
            " commas (day,workflow). Default: workflow, or step with --top."
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="YYYY-MM-DD, or 30d for the last 30 days.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="YYYY-MM-DD, inclusive.")] = None,
    top: Annotated[
        int | None, typer.Option(help="Only the N dearest groups, dearest first.")
    ] = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    include_eval: Annotated[
        bool, typer.Option("--include-eval", help="Count the runs of tierflow eval too.")
    ] = False,
    workflow: Annotated[str | None, typer.Option(help="Only this workflow's calls.")] = None,
    step: Annotated[str | None, typer.Option(help="Only this step's calls.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's calls.")] = None,
    tags: Annotated[
        list[str] | None,
        typer.Option("--tag", "-t", help="key=value: only runs with this tag; repeatable."),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Spend from the ledger: calls, tokens, cost, escalation rate, and savings against all-frontier."""
    from orchestrator import reports

    if as_json:
        output_format = "json"
    if output_format not in ("table", "json", "csv"):
        raise UserError(f"--format {output_format!r}: choose table, json or csv")
    if by is not None:
        reports.group_fields(by)  # a bad --by stops here, before the database opens
    start, end = reports.parse_when(since), reports.parse_when(until, end=True)
    from orchestrator import budgets

    settings = _settings(config)
    store = _store_to_read(settings, lambda: _nothing_ran(settings))
    found = reports.report(
        store.engine,
        by=by,
        since=start,
        until=end,
        top=top,
        budgets=budgets.status(settings, store),
        include_eval=include_eval,
        only=reports.Only(workflow, step, model, reports.tag_pairs(tags)),
    )
    if output_format == "json":
        _print_json(found.as_dict())
    elif output_format == "csv":
        _print_spend_csv(found)
    else:
        _console().print(_spend_table(found))
        if found.budgets:
            _console().print(_budget_table(found.budgets))


def _print_spend_csv(found: reports.SpendReport) -> None:
    groups = [row.as_dict(found.fields) for row in found.groups]
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=[*found.fields, *found.total.figures()], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(groups)
    sys.stdout.write(buffer.getvalue())


def _spend_table(found: reports.SpendReport) -> Any:
    from rich.table import Table

    title = f"spend by {found.by}" + (f", dearest {found.top}" if found.top else "")
    table = Table(title=title, title_justify="left")
    for name in found.fields:
        table.add_column(name.replace("_", " "))
    for column in (
        "calls",
        "escalated",
        "tokens in",
        "tokens out",
        "cost",
        "of it local",
        "all-frontier",
        "saved",
    ):
        table.add_column(column, justify="right")

    def cells(row: reports.SpendRow) -> list[str]:
        return [
            str(row.calls),
            f"{row.escalation_rate:.1%}",
            f"{row.prompt_tokens:,}",
            f"{row.completion_tokens:,}",
            usd(row.cost_usd) + ("*" if row.simulated_cost_usd else ""),
            usd(row.local_cost_usd),
            usd(row.reference_cost_usd),
            usd(row.savings_usd) + ("*" if row.simulated_cost_usd else ""),
        ]

    for row in found.groups:
        table.add_row(*(part or "-" for part in row.key), *cells(row))
    table.add_section()
    table.add_row("total", *[""] * (len(found.fields) - 1), *cells(found.total))
    if found.total.simulated_cost_usd:
        table.caption = "* " + _simulated_note(found.total.simulated_cost_usd)
        table.caption_justify = "left"
    return table


def _budget_table(statuses: list[BudgetStatus]) -> Any:
    from rich.table import Table

    table = Table(title="budgets in force today (UTC)", title_justify="left")
    table.add_column("budget")
    for column in ("limit", "spent", "reserved", "left"):
        table.add_column(column, justify="right")
    for status in statuses:
        table.add_row(
            status.limit.label,
            usd(status.limit.usd),
            usd(status.spent_usd),
            usd(status.reserved_usd),
            usd(status.left_usd),
        )
    return table


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    config: ConfigOption = None,
) -> None:
    """HTTP API and dashboard at /. Clients send the bearer token in TIERFLOW_API_TOKEN."""
    token = os.environ.get("TIERFLOW_API_TOKEN", "")
    if not token.strip():
        raise UserError(
            "TIERFLOW_API_TOKEN is not set: every route needs a shared secret, for example"
            " export TIERFLOW_API_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    from orchestrator.api import serve as run_server
    from orchestrator.queue import broker_folder, embedded_broker_warning
    from orchestrator.store.database import safe_url

    settings = _settings(config)
    where = (
        safe_url(settings.broker_url)
        if settings.broker_url
        else f"the embedded broker in {broker_folder(settings)} (workers must share this folder)"
    )
    typer.echo(f"tierflow: POST /runs queues to {where}", err=True)
    warning = embedded_broker_warning(settings)
    if warning is not None:
        typer.echo(f"warning: {warning}", err=True)
    run_server(settings, token=token, host=host, port=port)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply pending migrations to the configured database (alembic upgrade head)."""
    from orchestrator.store import open_engine
    from orchestrator.store.database import head_revision, safe_url

    settings = _settings(config)
    open_engine(settings.database_url, migrate=True).dispose()
    typer.echo(f"{safe_url(settings.database_url)} is at revision {head_revision()}")


@cache_app.command("clear")
def cache_clear(
    workflow: Annotated[str | None, typer.Option(help="Only this workflow's kept answers.")] = None,
    config: ConfigOption = None,
) -> None:
    """Drop kept answers, so the next run of a cache: step asks its model again."""
    dropped = _store(_settings(config)).clear_answers(workflow)
    which = f" of workflow {workflow}" if workflow else ""
    typer.echo(f"dropped {dropped} kept answer{'s' if dropped != 1 else ''}{which}")


def main() -> None:
    """Entry point: map our errors to exit codes and one-line messages."""
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        _fail(str(exc), 2)
    except TierflowError as exc:  # RunError and anything else of ours: the run failed
        _fail(str(exc), 1)
    except typer.exceptions.TyperException as exc:
        # Bad usage: an unknown option, a missing argument, a value out of range.
        # Typer raises its own exceptions now, not click's.
        _fail(f"Error: {exc.format_message()}", 2)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except Exception as exc:
        if os.environ.get("TIERFLOW_DEBUG"):
            raise
        _fail(
            f"internal error: {type(exc).__name__}: {exc} (set TIERFLOW_DEBUG=1 for a traceback)", 1
        )
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(_from_here(message).rstrip() + "\n")
    sys.exit(code)


def _from_here(message: str) -> str:
    """``message`` with the paths under the current folder shown from it, as ruff and
    mypy show them (``workflows/a.yaml:3: ...``); paths elsewhere stay absolute."""
    try:
        here = os.getcwd()
    except OSError:  # the folder was removed under us
        return message
    if here == os.sep:
        return message
    # A path starts the message or follows a space, quote or bracket: never inside
    # a URL, an option (--x=/path) or another path; and something follows it.
    return re.sub(rf"(?<![\w/:.~=@-]){re.escape(here + os.sep)}(?=[^\s'\"])", "", message)
