"""One learner phase as a group of data-parallel training processes: the entry that
`accelerate launch` starts on every rank (learner/data_parallel.py).

    accelerate launch --num_processes 2 --multi_gpu \\
        -m learner.launch reward --task-id T [--votes votes.jsonl] --result out.json
    accelerate launch --num_processes 2 -m learner.launch policy --task-id T \\
        [--rm-version rm-v3] [--parent policy-v2] --result out.json

Every rank reads the same settings (ARENA_* in the environment) and the same votes, trains
its share and stays in step with the others; rank 0 publishes the version, registers it and
writes the result (the pipeline's return value) as JSON to --result. The learner worker runs
this when `ARENA_LEARNER_PROCESSES` > 1 (`run_launched`, below, called by learner/tasks.py):
rank 0 then reports progress to the worker's Celery task, checks the iteration's lock
before it writes, and stops when an operator cancels, as the worker's own run does; the
pipeline's exceptions (no votes yet, lock lost, cancelled) come back to the worker as
themselves. An operator can also run it by hand on a GPU host.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core.net import free_port
from core.settings import Settings, settings_environ
from learner.data_parallel import DataParallel

log = logging.getLogger("learner.launch")
# Exceptions that cross from rank 0 back to the worker by name (the pipeline's and the
# iteration's: the worker handles each as when the phase ran in its own process); the
# classes are looked up on the worker's side (`run_launched`).
RAISED = ("NotEnoughVotes", "LockLost", "IterationCancelled")
OUTPUT_TAIL_CHARS = 3000  # of a failed launch's output, in the worker's error
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
STOPPED_EXIT = 3  # a rank's exit status when it stopped on one of RAISED


def launch_command(settings: Settings, phase: str, task_id: str, result: Path,
                   *options: str) -> list[str]:
    """`accelerate launch` of this module with settings.learner_processes processes: DDP on
    this machine's GPUs, or gloo on its CPUs where it has none (accelerate's multi-GPU
    launcher is torchrun, and each rank's Accelerator picks gloo without a GPU), or what
    the operator's accelerate config file says."""
    argv = [sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(settings.learner_processes),
            "--main_process_port", str(free_port())]
    if settings.learner_accelerate_config is not None:
        argv += ["--config_file", str(settings.learner_accelerate_config)]
    else:  # torchrun for several processes; one runs plainly
        argv += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        argv += ["--multi_gpu"] if settings.learner_processes > 1 else []
    return [*argv, "-m", "learner.launch", phase, "--task-id", task_id,
            "--result", str(result), *options]


def _load_libc() -> Any:
    """libc, loaded here and not between fork and exec (a dlopen there may deadlock)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


LIBC = _load_libc()


def _stop_with_parent() -> None:
    """SIGTERM to this process when its parent dies. Set twice, so that no orphaned training
    runs on beside a re-delivered task: in the launcher (before exec, from the worker that
    starts it), and in every rank (torchrun starts each in a session of its own, out of reach
    of a signal to the launcher's group, so a launcher killed with SIGKILL would leave them
    running). Linux only; elsewhere a no-op."""
    if LIBC is not None:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_launched(settings: Settings, phase: str, task_id: str, *,
                 votes_jsonl: str | Path | None = None, rm_version: str | None = None,
                 parent: str | None = None, celery_task_id: str | None = None,
                 lock_token: str | None = None, fence: str | None = None) -> dict[str, Any]:
    """Run one phase as settings.learner_processes training processes and wait: their
    output goes to this process's log, rank 0's result (or its exception) comes back."""
    from learner.pipeline import NotEnoughVotes, preset_for
    from learner.presets import check_processes
    from learner.tasks import IterationCancelled
    from learner.trigger import LockLost

    # Before any process starts: an iteration's PPO phase must be able to split its batches
    # (checked at the reward model too, not after it trained).
    check_processes(preset_for(settings).ppo, settings.learner_processes)
    config = settings.learner_accelerate_config
    if config is not None and not config.is_file():
        raise ValueError(f"ARENA_LEARNER_ACCELERATE_CONFIG: no file at {config} (an accelerate "
                         "config, e.g. configs/accelerate/multi-gpu.yaml)")
    if config is None and settings.learner_processes > 1:
        import torch

        gpus = torch.cuda.device_count()  # DDP puts one process on each GPU
        if 0 < gpus < settings.learner_processes:
            raise ValueError(f"ARENA_LEARNER_PROCESSES={settings.learner_processes} but this "
                             f"machine has {gpus} GPU(s): one process per GPU (or hide them, "
                             "CUDA_VISIBLE_DEVICES=, to train on the CPUs)")
    options: list[str] = []
    for flag, value in (("--votes", votes_jsonl), ("--rm-version", rm_version),
                        ("--parent", parent), ("--celery-task-id", celery_task_id),
                        ("--lock-token", lock_token), ("--fence", fence)):
        if value is not None:
            options += [flag, str(value)]
    with tempfile.TemporaryDirectory(prefix="learner-launch-") as tmp:
        result_file = Path(tmp) / "result.json"
        argv = launch_command(settings, phase, task_id, result_file, *options)
        log.info("learner %s: %d training processes: %s", phase, settings.learner_processes,
                 " ".join(argv))
        env = {**os.environ, **settings_environ(settings), "PYTHONUNBUFFERED": "1"}
        tail: list[str] = []
        with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, preexec_fn=_stop_with_parent) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # the ranks' progress and warnings, into our log
                log.info("%s", line.rstrip())
                tail = (tail + [line])[-60:]
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    raised = result.get("raised")
    if raised is None and (proc.returncode != 0 or not result):
        raise RuntimeError(f"learner {phase} under accelerate launch exited with "
                           f"{proc.returncode}: {''.join(tail)[-OUTPUT_TAIL_CHARS:]}")
    if raised is not None:
        kinds = {kind.__name__: kind for kind in (NotEnoughVotes, LockLost, IterationCancelled)}
        assert set(kinds) == set(RAISED)
        raise kinds[raised["type"]](raised["message"])
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="learner.launch", description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=["reward", "policy"])
    parser.add_argument("--task-id", required=True, help="keys the run's work folder and "
                        "its published version (a re-run with the same id resumes)")
    parser.add_argument("--votes", help="votes JSONL instead of the archive database")
    parser.add_argument("--rm-version", help="policy: the reward model (default: newest)")
    parser.add_argument("--parent", help="policy: the parent version (default: current)")
    parser.add_argument("--result", type=Path, help="rank 0 writes the result here (JSON)")
    parser.add_argument("--celery-task-id", help="report progress as this Celery task's state")
    parser.add_argument("--lock-token", help="the iteration's lock token (learner.trigger)")
    parser.add_argument("--fence", help="the lock's fencing token held by this iteration")
    return parser.parse_args(argv)


def _reporter(settings: Settings, args: argparse.Namespace) -> Any:
    """Rank 0's progress callback: the worker's `_Reporter` on the worker's Celery task
    (its state updated through the result backend), lock and cancel checks included."""
    from learner.celery_app import make_celery
    from learner.tasks import _Reporter
    from learner.trigger import IterationLock

    backend = make_celery(settings).backend
    task = SimpleNamespace(
        request=SimpleNamespace(id=args.celery_task_id),
        update_state=lambda state, meta: backend.store_result(args.celery_task_id, meta, state))
    lock = IterationLock.for_settings(settings) if args.lock_token else None
    return _Reporter(task, lock, args.lock_token, args.fence)


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    from learner.pipeline import bound_resources, registry_for, run_policy, run_reward_model
    from learner.precision import pick_device
    from learner.tasks import progress_line

    launcher = os.getppid()
    _stop_with_parent()  # this rank ends with its launcher …
    if os.getppid() != launcher:  # … which may have ended before that was set
        return STOPPED_EXIT
    args = parse(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any]
    accelerator = Accelerator(cpu=pick_device().type == "cpu")
    parallel = DataParallel.from_accelerator(accelerator)
    logging.basicConfig(level=logging.INFO if parallel.is_main else logging.WARNING,
                        format=f"%(asctime)s rank {parallel.rank} %(name)s: %(message)s")
    settings = Settings()
    bound_resources(settings)
    log.info("learner %s: %d training process(es), %s backend", args.phase, parallel.world,
             accelerator.state.backend or "none")
    registry, report, guard = None, None, None
    if parallel.is_main:
        registry = registry_for(settings)
        registry.ensure_base()
        if args.celery_task_id is not None:
            report = _reporter(settings, args)
            guard = report.guard
        else:
            def report(meta: dict[str, Any]) -> None:
                if meta.get("step") == meta.get("total") or meta.get("phase") == "policy":
                    log.info("learner progress: %s", progress_line(meta))

    try:
        if args.phase == "reward":
            result = run_reward_model(settings, args.task_id, args.votes, report, registry,
                                      guard, parallel=parallel)
        else:
            result = run_policy(settings, args.task_id, args.rm_version, args.parent,
                                args.votes, report, registry, guard=guard, parallel=parallel)
    except Exception as error:
        if type(error).__name__ not in RAISED:
            raise  # a failure: the launch exits non-zero, torchrun stops the other ranks
        # Raised on every rank alike (no votes) or on rank 0 alone (lock, cancel), where the
        # others wait for it in their next collective: a non-zero exit has torchrun stop
        # them; the result file says why.
        log.warning("learner %s stopped: %s", args.phase, error)
        result = {"raised": {"type": type(error).__name__, "message": str(error)}}
        if parallel.is_main and args.result is not None:
            _write(args.result, result)
        os._exit(STOPPED_EXIT)  # not waiting for ranks that are inside a collective
    if parallel.is_main and args.result is not None:
        _write(args.result, result)
    # No barrier at the end: the other ranks are done once training is (rank 0 alone checks
    # and publishes), and a barrier would time out if that took longer than NCCL waits.
    return 0


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
