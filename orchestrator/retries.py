"""When a model that answered 429 or 5xx is asked again, and when the step moves on.

A model is asked at most ``MAX_RETRIES`` more times. Each pause is what the
provider's ``Retry-After`` asked for, else a jittered backoff (0.5 s, then 1 s,
each times 0.5–1). A provider that asks for more than ``MAX_PAUSE_S``, or a
pause that would take the model's total past ``MAX_WAIT_S``, ends the retries
at once: the step moves to the next model rather than sit idle. A refused
output form is asked again at once, in the next form.
"""

from __future__ import annotations

import random

from orchestrator.errors import ModelBusy

MAX_RETRIES = 2
MAX_PAUSE_S = 5.0
MAX_WAIT_S = 10.0
BACKOFF_S = 0.5


def pause(busy: ModelBusy | None, *, retries: int, waited_s: float) -> float | None:
    """Seconds to wait before asking the same model again, or None to move on.

    ``retries`` is how many times it was asked again already, ``waited_s`` the
    pauses so far.
    """
    if busy is None or retries >= MAX_RETRIES:
        return None
    wanted = busy.retry_after_s
    if wanted is None:
        wanted = BACKOFF_S * 2**retries * random.uniform(0.5, 1.0)
    if wanted > MAX_PAUSE_S or waited_s + wanted > MAX_WAIT_S:
        return None
    return wanted
