"""Which steps read a confidential input, directly or through other steps' outputs.

A step is tainted when any text it renders or evaluates (prompt, system prompt,
``when``, ``for_each``, ``checks``) reads a confidential input, or the output of
a tainted step. Reading a whole object (``{{ inputs }}``, a loop over
``steps``) reads everything in it. A tainted step may use only local tiers, as a
``sensitive`` one does. The analysis is static and runs once, at load, over the
templates' syntax trees; it is linear in the number of reads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.templates import Read


@dataclass(frozen=True)
class Taint:
    """Why a step may use only local tiers: the confidential input it reads, and how.

    ``through`` lists the step outputs on the way, nearest first (empty when the
    step reads the input itself); ``where`` names the text of this step that reads.
    """

    input: str
    where: str
    through: tuple[str, ...] = ()
    whole_inputs: bool = False

    def __str__(self) -> str:
        if self.through:
            via = ", via ".join(self.through)
            return f"reads confidential input '{self.input}' through {via} (in its {self.where})"
        if self.whole_inputs:
            return (
                f"reads confidential input '{self.input}' by reading all of inputs"
                f" (in its {self.where})"
            )
        return f"reads confidential input '{self.input}' (in its {self.where})"


# Per step id, in workflow order: each text of the step (its label) and what it reads.
StepReads = Mapping[str, Sequence[tuple[str, Iterable[Read]]]]


def taints(steps: StepReads, confidential: Collection[str]) -> dict[str, Taint]:
    """The taint of every tainted step; a step missing from the result is clean."""
    found: dict[str, Taint] = {}
    readers: dict[str, list[tuple[str, str]]] = {}  # step -> (step reading it, where)
    whole: list[tuple[str, str]] = []  # steps reading all of ``steps``
    first_confidential = next(iter(confidential), None)
    for step_id, texts in steps.items():
        for where, reads in texts:
            # Named reads first: a message naming the input beats "all of inputs".
            for name, key in sorted(reads, key=lambda r: (r[0], r[1] is None, r[1] or "")):
                if name == "steps":
                    (whole if key is None else readers.setdefault(key, [])).append((step_id, where))
                elif step_id in found:
                    continue
                elif key is None:
                    if first_confidential is not None:
                        found[step_id] = Taint(first_confidential, where, whole_inputs=True)
                elif key in confidential:
                    found[step_id] = Taint(key, where)
    queue = deque(found)  # breadth first, so each step gets its shortest path
    whole_done = False
    while queue:
        source = queue.popleft()
        hop = f"steps.{source}.output"
        targets = [(target, where, hop) for target, where in readers.get(source, ())]
        if not whole_done:  # the first tainted output taints every reader of all of steps
            whole_done = True
            hop = f"all of steps, which holds steps.{source}.output"
            targets += [(target, where, hop) for target, where in whole]
        for target, where, hop in targets:
            if target in found:
                continue
            cause = found[source]
            found[target] = Taint(cause.input, where, through=(hop, *cause.through))
            queue.append(target)
    return found
