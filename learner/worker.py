"""The learner worker's entry point, `celery -A learner.worker:app worker`: the settings are
read from the environment once, here, and travel with the app to the tasks."""

from __future__ import annotations

from core.settings import Settings
from learner.celery_app import make_celery

app = make_celery(Settings())
