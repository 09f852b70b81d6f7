"""The Celery application of the learner, on the Redis broker.

Training tasks run for many minutes: with `acks_late` a task is acknowledged only when it
finishes (a killed worker's task is delivered again), and the broker's visibility timeout
must exceed the longest task or Redis would hand it to a second worker while it still runs.
The gateway, the CLI and the feedback consumers use it as a client (tasks by name); the
worker starts from learner/worker.py.
"""

from __future__ import annotations

from celery import Celery

from core.settings import Settings

VISIBILITY_TIMEOUT_S = 6 * 3600  # above the longest training task (an iteration ≤ ~20 min on CPU)


def make_celery(settings: Settings) -> Celery:
    app = Celery("learner", broker=settings.effective_redis_url,
                 backend=settings.effective_redis_url, include=["learner.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.conf.arena_settings = settings  # what the tasks read (learner/tasks.py)
    return app
