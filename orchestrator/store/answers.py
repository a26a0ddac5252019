"""Kept answers of ``cache:`` steps (``orchestrator.cache``): find, keep, clear."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, delete, insert, or_, select
from sqlalchemy.exc import IntegrityError

from orchestrator.store.tables import answer_cache


class AnswerStore:
    engine: Engine

    def cached_answers(self, keys: list[str], now: datetime) -> dict[str, tuple[str, int, int]]:
        """(answer, prompt tokens, completion tokens) kept under each of ``keys``
        that has one not expired at ``now``."""
        query = select(
            answer_cache.c.key,
            answer_cache.c.answer,
            answer_cache.c.prompt_tokens,
            answer_cache.c.completion_tokens,
        ).where(
            answer_cache.c.key.in_(keys),
            or_(answer_cache.c.expires_at.is_(None), answer_cache.c.expires_at > now),
        )
        with self.engine.connect() as connection:
            return {row[0]: (row[1], row[2], row[3]) for row in connection.execute(query)}

    def keep_answer(
        self,
        *,
        key: str,
        workflow: str,
        step_id: str,
        model: str,
        answer: str,
        prompt_tokens: int,
        completion_tokens: int,
        created_at: datetime,
        expires_at: datetime | None,
    ) -> None:
        """Keep ``answer`` under ``key``, in place of what was there. Two runs
        keeping the same key at once: the first one's stays."""
        row = {
            "key": key,
            "workflow": workflow,
            "step_id": step_id,
            "model": model,
            "answer": answer,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "created_at": created_at,
            "expires_at": expires_at,
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(delete(answer_cache).where(answer_cache.c.key == key))
                connection.execute(insert(answer_cache).values(row))
        except IntegrityError:
            pass  # another run kept the same answer to the same request meanwhile

    def clear_answers(self, workflow: str | None = None) -> int:
        """Drop kept answers (of ``workflow`` only, if given); how many were dropped."""
        statement = delete(answer_cache)
        if workflow is not None:
            statement = statement.where(answer_cache.c.workflow == workflow)
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount
