"""Assembly of the ``colbertkit`` Typer app: global options and command registration only."""

from __future__ import annotations

import typer

from colbertkit import __version__
from colbertkit.cli import evaluate, export, score, train, validate
from colbertkit.cli._common import DEBUG_ENV, set_debug

app = typer.Typer(
    name="colbertkit",
    help="Fine-tune and use ColBERT (late-interaction) retrieval models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"colbertkit {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help=f"Show full tracebacks (or set {DEBUG_ENV}=1)."
    ),
) -> None:
    # Set on every invocation, so one command's --debug never leaks into the next call.
    set_debug(debug)


app.command("score", no_args_is_help=True)(score.score_command)
app.command("validate-data", no_args_is_help=True)(validate.validate_command)
app.command("train", no_args_is_help=True)(train.train_command)
app.command("export", no_args_is_help=True)(export.export_command)
app.command("evaluate", no_args_is_help=True)(evaluate.evaluate_command)


def main() -> None:
    app()
