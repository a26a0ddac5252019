"""A checked workflow compiled to a LangGraph ``StateGraph``.

Each step is a node. ``needs`` become edges: a step with several needs waits
for all of them, and steps whose needs are met run in parallel in the same
superstep. A skipped step still completes (with output null), so its
dependents run. The spec has already been checked for cycles and unknown names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypedDict, cast

from orchestrator.spec import LoadedWorkflow, StepPlan

OUTPUTS = "_outputs"  # step ids cannot start with "_", so no node shares this name

RunStep = Callable[[StepPlan, dict[str, Any]], Awaitable[Any]]


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    return {**left, **right}


class RunState(TypedDict):
    _outputs: Annotated[dict[str, Any], _merge]


def compile_graph(workflow: LoadedWorkflow) -> Any:
    """A compiled graph whose state maps step id → output.

    The graph holds no run: each node calls the ``run_step`` found in the
    invocation's ``config["configurable"]``, so one compiled graph serves
    every run of the workflow.
    """
    from langgraph.graph import END, START, StateGraph

    builder = StateGraph(RunState)
    needed: set[str] = set()
    for plan in workflow.steps:
        builder.add_node(plan.id, cast(Any, _node(plan)))
        needs = list(dict.fromkeys(plan.step.needs))
        needed.update(needs)
        if not needs:
            builder.add_edge(START, plan.id)
        else:
            builder.add_edge(needs[0] if len(needs) == 1 else needs, plan.id)
    for plan in workflow.steps:
        if plan.id not in needed:
            builder.add_edge(plan.id, END)
    return builder.compile()


def _node(plan: StepPlan) -> Callable[[RunState, Any], Awaitable[dict[str, Any]]]:
    from langchain_core.runnables import RunnableConfig

    async def node(state: RunState, config: Any) -> dict[str, Any]:
        run_step: RunStep = config["configurable"]["run_step"]
        output = await run_step(plan, state["_outputs"])
        return {OUTPUTS: {plan.id: output}}

    # LangGraph passes the invocation's config only to a parameter annotated as
    # RunnableConfig; the annotation is set here because that import is heavy.
    node.__annotations__ = {"state": RunState, "config": RunnableConfig, "return": dict}
    node.__name__ = f"step_{plan.id}"
    return node
