"""Assembly of the ``colbertkit`` Typer app: global options, command registration, and the
one-line rendering of usage errors."""

from __future__ import annotations

import sys

import typer
from typer._click import exceptions as click_exceptions

from colbertkit import __version__
from colbertkit.cli import evaluate, export, mine, score, train, validate
from colbertkit.cli._common import set_debug
from colbertkit.errors import DEBUG_ENV

app = typer.Typer(
    name="colbertkit",
    help="Fine-tune and use ColBERT (late-interaction) retrieval models.",
    no_args_is_help=True,
    add_completion=True,
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
app.command("mine", no_args_is_help=True)(mine.mine_command)
app.command("evaluate", no_args_is_help=True)(evaluate.evaluate_command)


def main() -> None:
    """The ``colbertkit`` command: usage errors are one line with the fix, exit 2."""
    command = typer.main.get_command(app)
    _plain_metavars(command)
    try:
        code = command.main(prog_name="colbertkit", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as error:
        print(error.ctx.get_help())
        sys.exit(0)
    except click_exceptions.ClickException as error:
        context = getattr(error, "ctx", None)
        where = context.command_path if context is not None else "colbertkit"
        message = " ".join(error.format_message().split()).rstrip(".")
        message = message.replace("Value error, ", "")  # pydantic's prefix, inside typer's
        print(f"Error: {message}; see '{where} --help'", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


_TYPE_METAVARS = {"int": "N", "float": "X"}


def _plain_metavars(group: typer.core.TyperGroup) -> None:
    """Help shows ``CHECKPOINT``, ``N``, ``PATH`` and ``[a|b]``, not ``{checkpoint}``,
    ``<int range>`` or ``<bool>``."""
    for command in [group, *group.commands.values()]:
        for param in command.params:
            if param.metavar is not None:
                continue
            described = param.type_descriptor
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar = param.name.upper()
                # Typer writes required arguments as {NAME} and their type as <str>: plain
                # NAME reads better (these hooks exist in typer 0.2x; elsewhere they are unused).
                param._usage_display_name = lambda name=name: name
                param.display_type_rich = lambda ctx: None
            elif getattr(param, "is_flag", False):
                param.metavar = ""
            elif described.is_choice:
                choices = [getattr(c, "value", c) for c in described.choices or ()]
                param.metavar = "[" + "|".join(map(str, choices)) + "]"
            elif described.is_path:
                param.metavar = "PATH"
            else:
                param.metavar = _TYPE_METAVARS.get(described.annotation.__name__, "TEXT")
