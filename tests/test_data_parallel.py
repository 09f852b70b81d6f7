"""The learner data-parallel (learner/data_parallel.py, learner/launch.py): the reward model
and PPO under `accelerate launch` with 2 CPU processes (gloo), against 1 process.

(1) DDP as the trainers use it: gradients that differ across the ranks are averaged in
    backward, the same on every rank afterwards and equal to the one-process gradient;
(2) the reward model with 2 processes reaches the 1-process held-out accuracy within 0.02
    and loss within 5 % (the same votes, seeds and batches), and publishes once; its 2
    processes started as two machines (`--num_machines 2`, on loopback);
(3) a learner iteration through a real Celery worker with learner_processes = 2 (reward
    model, then PPO, data-parallel, progress in the task state) raises the reward as a
    1-process PPO run on the same reward model does, with the gradients equal across the
    ranks at every step;
(4) a phase that stops (no votes) comes back to the worker as its exception;
(5) the same with the weights sharded (FSDP2, configs/accelerate/fsdp.yaml, on gloo here):
    the reward model within the same bounds of 1 process, PPO the same run as DDP's to
    float rounding (the adapter rank 0 saves included), and resuming from a checkpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from safetensors.torch import load_file

from core.net import free_port
from core.settings import Settings
from learner import artifacts
from learner.celery_app import make_celery
from learner.data_parallel import DataParallel
from learner.launch import launch_command, run_launched
from learner.pipeline import NotEnoughVotes, registry_for
from learner.prompt_pool import load_shipped_prompts
from learner.trigger import start_iteration, task_status
from learner.vote_source import write_jsonl
from testkit.hidden_rule_votes import hidden_rule_votes, sft_tiny_base
from testkit.processes import ROOT, settings_env, start, start_worker, stop_group

FSDP_CONFIG = ROOT / "configs/accelerate/fsdp.yaml"  # weights sharded (FSDP2 on gloo here)
ACCURACY_TOLERANCE = 0.02  # the bounds: 2 processes against 1
LOSS_TOLERANCE = 0.05
SAME_GRADIENT = 1e-6  # max |g_rank − g_0| after DDP's all-reduce
SAME_RUN = 1e-3  # DDP against FSDP, 2 processes each: the same steps, summed in another order
ITERATION_TIMEOUT_S = 300
RESUME_STEPS = 4  # PPO steps of the resume test: a checkpoint at 2 (the tiny preset's), 2 after
LEARNER_ENV = {"ARENA_LEARNER_ROLLOUT": "transformers", "ARENA_LEARNER_THREADS": "1",
               "ARENA_LEARNER_USER_PROMPTS": "0"}


@pytest.fixture(autouse=True)
def on_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training processes run on the CPUs (gloo) on any machine, a GPU one included."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="module")
def votes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("votes") / "votes.jsonl",
                       hidden_rule_votes(300, load_shipped_prompts(), seed=1))


@pytest.fixture(scope="module")
def sft_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PPO starts from a supervised fine-tune of the tiny model (test_learner_training.py)."""
    return sft_tiny_base(tiny_model_dir, tmp_path_factory.mktemp("sft") / "tiny-sft",
                         load_shipped_prompts())


def with_processes(settings: Settings, n: int, folder: str, **extra: object) -> Settings:
    """The test's settings with n training processes and a data folder of their own."""
    values = {name: getattr(settings, name) for name in settings.model_fields_set}
    return Settings(_env_file=None, **{**values, "data_dir": settings.data_dir / folder,
                                       "learner_processes": n, **extra})


@contextmanager
def learner_worker(settings: Settings) -> Iterator[subprocess.Popen]:
    """A Celery learner worker as `arena up` starts it, on these settings."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    proc = start_worker(settings, settings.data_dir / "worker.log", "test-dp@%h")
    try:
        deadline = time.monotonic() + 60
        while not make_celery(settings).control.ping(timeout=0.5):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (settings.data_dir / "worker.log").read_text()[-3000:]
        yield proc
    finally:
        stop_group(proc)


def run_iteration(settings: Settings, votes: Path) -> dict:
    """Start a learner iteration and follow it to its end: its last status, plus the
    phases its progress reports named."""
    started = start_iteration(settings, votes_jsonl=votes)
    assert started["started"], started
    phases, deadline = set(), time.monotonic() + ITERATION_TIMEOUT_S
    while time.monotonic() < deadline:
        status = task_status(settings, started["task_id"])
        if status["state"] == "PROGRESS":  # reported by the launched rank 0
            phases.add(status["info"].get("phase"))
        if status["state"] in ("SUCCESS", "FAILURE"):
            break
        time.sleep(0.2)
    return {**status, "phases": phases}


def run_on_two_hosts(settings: Settings, phase: str, task_id: str, *options: str) -> dict:
    """One learner phase as two machines of one training process each (`accelerate launch
    --num_machines 2 --machine_rank k`, docs/deploy.md), both here on loopback: machine 0's
    rank 0 publishes and writes the result."""
    port, results, machines = free_port(), [], []
    for rank in (0, 1):
        results.append(settings.data_dir / f"host-{rank}.json")
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "learner.launch", phase, "--task-id", task_id,
                "--result", str(results[-1]), *options]
        machines.append(start(settings, argv, settings.data_dir / f"host-{rank}.log"))
    try:
        for rank, machine in enumerate(machines):
            assert machine.wait(timeout=ITERATION_TIMEOUT_S) == 0, \
                (settings.data_dir / f"host-{rank}.log").read_text()[-3000:]
    finally:
        for machine in machines:
            stop_group(machine)
    assert not results[1].exists()  # only machine 0's rank 0 writes
    return json.loads(results[0].read_text())


@pytest.mark.slow
def test_ddp_averages_the_ranks_gradients() -> None:
    """Launched as the worker launches with the shipped accelerate config (on CPUs here)."""
    settings = Settings(_env_file=None, learner_processes=2,
                        learner_accelerate_config=ROOT / "configs/accelerate/multi-gpu.yaml")
    argv = launch_command(settings, "reward", "x", Path("unused"))
    argv = argv[:argv.index("-m", 3)] + ["-m", "testkit.data_parallel_probe"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=settings_env(Settings(_env_file=None)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["world"] == 2
    assert figures["local_spread"] > 0.1  # each rank's own rows: different gradients …
    assert figures["ddp_spread"] <= SAME_GRADIENT  # … averaged by DDP: the same everywhere
    assert figures["ddp_vs_one_process"] <= 1e-5  # … and the gradient of all the rows
    assert figures["moments_vs_one_process"] <= 1e-5  # PPO's whitening: over all the rows
    assert figures["rm_split_vs_one_process"] <= 1e-6  # uneven, and a rank with none


@pytest.mark.slow
def test_reward_model_on_two_processes_matches_one(settings: Settings, votes_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in LEARNER_ENV.items():
        monkeypatch.setenv(key, value)
    one = run_launched(with_processes(settings, 1, "one"), "reward", "rm-one",
                       votes_jsonl=votes_file)
    # Two machines of one process each, started by hand as docs/deploy.md says (here both on
    # loopback): the same 2-rank DDP as one launch of 2 processes (the worker's path, in the
    # iteration test below), across hosts.
    two_settings = with_processes(settings, 2, "two")
    two = run_on_two_hosts(two_settings, "reward", "rm-two", "--votes", str(votes_file))

    m1, m2 = one["metrics"], two["metrics"]
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m1["heldout_accuracy"] >= 0.9  # it learnt the hidden rule
    assert abs(m2["heldout_accuracy"] - m1["heldout_accuracy"]) <= ACCURACY_TOLERANCE
    for loss in ("heldout_loss", "train_loss"):
        assert abs(m2[loss] - m1[loss]) <= LOSS_TOLERANCE * m1[loss], (loss, m1, m2)
    assert m2["n_train"] == m1["n_train"] and m2["steps"] == m1["steps"]
    assert m2["grad_spread"] <= SAME_GRADIENT
    # Rank 0 alone published and registered it: one folder, one registry record.
    published = artifacts.list_versions(two_settings.versions_dir, "rm")
    assert [p.name for p in published] == [two["version"]]
    assert registry_for(two_settings).get(two["version"]).kind == "reward"

    # The weights sharded over the 2 processes (FSDP): the same training, the same figures.
    sharded = run_launched(with_processes(settings, 2, "sharded",
                                          learner_accelerate_config=FSDP_CONFIG),
                           "reward", "rm-sharded", votes_jsonl=votes_file)["metrics"]
    assert sharded["processes"] == 2 and sharded["grad_spread"] is None  # one copy: sharded
    assert abs(sharded["heldout_accuracy"] - m1["heldout_accuracy"]) <= ACCURACY_TOLERANCE
    for loss in ("heldout_loss", "train_loss"):
        assert abs(sharded[loss] - m1[loss]) <= LOSS_TOLERANCE * m1[loss], (loss, m1, sharded)


@pytest.mark.slow
def test_iteration_on_two_processes_through_the_worker(
        settings: Settings, sft_base: Path, votes_file: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in LEARNER_ENV.items():
        monkeypatch.setenv(key, value)
    two = with_processes(settings, 2, "two", base_model=sft_base)
    with learner_worker(two):
        status = run_iteration(two, votes_file)
    phases = status.pop("phases")
    log = (two.data_dir / "worker.log").read_text()
    assert status["state"] == "SUCCESS" and status["info"]["status"] == "done", \
        (status, log[-4000:])
    assert {"reward_model", "policy"} <= phases, phases
    assert "2 training process(es), gloo backend" in log

    policy = status["info"]["policy"]
    metrics = policy["metrics"]
    assert metrics["processes"] == 2
    assert metrics["reward_end"] > metrics["reward_start"], metrics
    history = artifacts.read_manifest(Path(policy["path"]))["history"]
    assert len(history) == metrics["steps"]
    assert all(row["grad_spread"] <= SAME_GRADIENT for row in history), \
        [row["grad_spread"] for row in history]

    # The same PPO on one process, against the same reward model: it rises there too.
    rm_version = status["info"]["reward_model"]["version"]
    alone = run_launched(with_processes(settings, 1, "two", base_model=sft_base), "policy",
                         "policy-one", rm_version=rm_version, parent="base",
                         votes_jsonl=votes_file)
    assert alone["metrics"]["processes"] == 1
    assert alone["metrics"]["reward_end"] > alone["metrics"]["reward_start"], alone["metrics"]

    # The same 2-process PPO with the weights sharded (FSDP): the same run as DDP's, to
    # float rounding, and rank 0 saved the whole adapter.
    sharded = run_launched(with_processes(settings, 2, "two", base_model=sft_base,
                                          learner_accelerate_config=FSDP_CONFIG),
                           "policy", "policy-sharded", rm_version=rm_version, parent="base",
                           votes_jsonl=votes_file)
    assert sharded["metrics"]["processes"] == 2 and sharded["metrics"]["grad_spread_max"] is None
    for figure in ("reward_start", "reward_end", "kl_end"):
        assert abs(sharded["metrics"][figure] - metrics[figure]) <= SAME_RUN, \
            (figure, sharded["metrics"], metrics)
    ddp_adapter = load_file(str(Path(policy["path"]) / "adapter_model.safetensors"))
    fsdp_adapter = load_file(str(Path(sharded["path"]) / "adapter_model.safetensors"))
    assert ddp_adapter.keys() == fsdp_adapter.keys()
    assert max((ddp_adapter[k] - fsdp_adapter[k]).abs().max().item()
               for k in ddp_adapter) <= SAME_RUN


@pytest.mark.slow
@pytest.mark.parametrize("config", [None, FSDP_CONFIG], ids=["ddp", "fsdp"])
def test_ppo_on_two_processes_resumes_from_rank_0s_checkpoint(
        settings: Settings, sft_base: Path, votes_file: Path, config: Path | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the whole group after a checkpoint; the same task run again resumes there
    on both ranks and publishes once (sharded: the optimiser state gathered whole into the
    checkpoint, sharded again on resuming)."""
    for key, value in LEARNER_ENV.items():
        monkeypatch.setenv(key, value)
    two = with_processes(settings, 2, "resume", base_model=sft_base,
                         learner_accelerate_config=config, learner_ppo_steps=RESUME_STEPS)
    rm = run_launched(two, "reward", "rm-resume", votes_jsonl=votes_file)["version"]
    options = ("--rm-version", rm, "--parent", "base", "--votes", str(votes_file))
    argv = launch_command(two, "policy", "ppo-resume", two.data_dir / "first.json", *options)
    first = subprocess.Popen(argv, env={**settings_env(two)}, cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = two.versions_dir / artifacts.WORK_DIR / "ppo-resume" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*/trainer_state.json")):
        assert first.poll() is None and time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.1)
    stop_group(first, signal.SIGKILL)
    assert not (two.data_dir / "first.json").exists()  # it never finished

    again = run_launched(two, "policy", "ppo-resume", rm_version=rm, parent="base",
                         votes_jsonl=votes_file)
    metrics = again["metrics"]
    assert metrics["resumed_from_step"] >= 2 and metrics["processes"] == 2, metrics
    history = artifacts.read_manifest(Path(again["path"]))["history"]
    assert [row["step"] for row in history] == list(range(1, metrics["steps"] + 1))
    assert all(row["grad_spread"] is None if config else row["grad_spread"] <= SAME_GRADIENT
               for row in history)
    assert [p.name for p in artifacts.list_versions(two.versions_dir, "policy")] == \
        [again["version"]]


@pytest.mark.slow
def test_training_processes_stop_when_the_worker_is_killed(
        settings: Settings, votes_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the process running the task, mid-phase: its training processes stop too,
    so none trains on, orphaned, beside the task's re-delivery."""
    for key, value in LEARNER_ENV.items():
        monkeypatch.setenv(key, value)
    two = with_processes(settings, 2, "killed")
    with learner_worker(two) as worker:
        assert start_iteration(two, votes_jsonl=votes_file)["started"]
        deadline, ranks = time.monotonic() + 60, []
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = [p for p in psutil.Process(worker.pid).children(recursive=True)
                     if "learner.launch" in p.cmdline() and "--task-id" in p.cmdline()
                     and "accelerate.commands.launch" not in p.cmdline()]
            time.sleep(0.1)
        assert len(ranks) == 2, ranks
        task_process = next(p for p in psutil.Process(worker.pid).children()
                            if ranks[0] in p.children(recursive=True))
        task_process.kill()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, [p.cmdline() for p in alive]


def test_settings_that_cannot_work_are_refused_before_launch(
        settings: Settings) -> None:
    three = with_processes(settings, 3, "three")  # the tiny preset: 48 answers, minibatch 8
    with pytest.raises(ValueError, match="minibatch_size 8 must divide by the 3 training"):
        run_launched(three, "reward", "rm-three")
    missing = with_processes(settings, 2, "two", learner_accelerate_config=Path("/nowhere.yaml"))
    with pytest.raises(ValueError, match="no file at /nowhere.yaml"):
        run_launched(missing, "reward", "rm-two")


@pytest.mark.slow
def test_a_phase_that_stops_comes_back_as_its_exception(settings: Settings,
                                                       tmp_path: Path) -> None:
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    with pytest.raises(NotEnoughVotes, match="no votes"):
        run_launched(with_processes(settings, 2, "empty"), "reward", "rm-empty",
                     votes_jsonl=empty)


def test_engines_the_trainers_cannot_follow_are_refused() -> None:
    """DeepSpeed (its engine would own backward and the optimiser step) and FSDP version 1
    (no `whole`/`unsharded` for it): refused, saying what to use. Stand-ins for accelerators
    of those kinds, which cannot start here (DeepSpeed is not installed)."""
    def accelerator(kind: str) -> SimpleNamespace:
        return SimpleNamespace(distributed_type=f"DistributedType.{kind}", is_fsdp2=False,
                               process_index=0, num_processes=2)

    with pytest.raises(ValueError, match="not DEEPSPEED: DeepSpeed's engine"):
        DataParallel.from_accelerator(accelerator("DEEPSPEED"))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        DataParallel.from_accelerator(accelerator("FSDP"))
    assert DataParallel.from_accelerator(accelerator("MULTI_GPU")).sharded is False


def test_launch_command_uses_the_operators_accelerate_config(tmp_path: Path) -> None:
    config = tmp_path / "accelerate.yaml"
    settings = Settings(_env_file=None, learner_processes=4, learner_accelerate_config=config)
    argv = launch_command(settings, "policy", "task-1", tmp_path / "r.json", "--parent", "base")
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "4"
    assert argv[argv.index("--config_file") + 1] == str(config)
    assert "--multi_gpu" not in argv
    assert argv[argv.index("learner.launch") + 1:] == [
        "policy", "--task-id", "task-1", "--result", str(tmp_path / "r.json"),
        "--parent", "base"]
