"""Celery tasks of the learner (filled in by the learner issue)."""

from __future__ import annotations

from learner.celery_app import app


@app.task(name="learner.ping")
def ping() -> str:
    return "pong"
