"""``colbertkit train --profile P``: parses flags and renders; the work is
:func:`colbertkit.launcher.launch`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from colbertkit.cli._common import (
    ReportFormat,
    as_flags,
    debug_enabled,
    debug_option,
    handle_errors,
    quiet_option,
    report_format_option,
    stderr_console,
)


@handle_errors
def train_command(
    profile: str | None = typer.Option(
        None,
        "--profile",
        "-p",
        help="Profile YAML: a path, or a bundled name (demo, bge-m3, chinese-roberta-wwm-ext).",
    ),
    dataset: Path | None = typer.Option(None, "--dataset", help="Training jsonl."),
    eval_dataset: Path | None = typer.Option(None, "--eval-dataset", help="Held-out jsonl."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Run directory."),
    model: str | None = typer.Option(
        None, "--model", help="Checkpoint to start from (any form colbertkit score reads)."
    ),
    num_processes: int | None = typer.Option(
        None, "--num-processes", min=1, help="Processes per machine (distributed.num_processes)."
    ),
    settings: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help="A setting, e.g. lr=2e-6 or distributed.strategy=ddp (repeatable).",
    ),
    resume: str | None = typer.Option(
        None,
        "--resume",
        metavar="RUN",
        help="Continue a run: its directory (newest checkpoint) or one of its checkpoints.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; launch nothing."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace a previous run in the output directory (never other files).",
    ),
    validate: bool = typer.Option(
        True, "--validate/--no-validate", help="Check the data (validate-data) before launching."
    ),
    report_format: ReportFormat = report_format_option("the --dry-run plan"),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Fine-tune a ColBERT model as a profile says, through accelerate (DDP or FSDP).

    Examples:

      colbertkit train --profile demo

      colbertkit train --profile bge-m3 --dataset my.jsonl --output-dir runs/x --dry-run

      colbertkit train --resume runs/x
    """
    from colbertkit.launcher import plan_launch, run_plan
    from colbertkit.profile import parse_set_options

    overrides = parse_set_options(settings)
    for key, value in (
        ("dataset", dataset),
        ("eval_dataset", eval_dataset),
        ("output_dir", output_dir),
        ("model", model),
    ):
        if value is not None:
            overrides[key] = str(value)
    if num_processes is not None:
        overrides.setdefault("distributed", {})["num_processes"] = num_processes
    plan = plan_launch(
        profile,
        overrides=overrides,
        resume=resume,
        overwrite=overwrite,
        validate=validate,
        dry_run=dry_run,
    )
    console = stderr_console()
    if dry_run:
        if report_format == ReportFormat.json:
            typer.echo(json.dumps(plan.to_dict(), indent=2))
        else:
            _print_dry_run(plan)
        return

    if not quiet:
        where = f" from {plan.resolved.path}" if plan.resolved.path else ""
        console.print(f"profile{where} (precedence: flags and --set > profile > defaults)")
        for key, value, source in plan.settings():
            if source != "default":
                console.print(f"  {key} = {value!r}  [dim]({source})[/]", highlight=False)
        for note in plan.notes:
            console.print(f"[yellow]note[/]: {note}", highlight=False)
    log = (
        None if quiet else (lambda line: console.print(f"[dim]{escape(line)}[/]", highlight=False))
    )
    code = run_plan(plan, log=log, debug=debug_enabled(), quiet=quiet)
    if code != 0:
        raise typer.Exit(code)
    if not quiet:
        console.print(f"[green]done[/]: model in {plan.output_dir / 'model'}", highlight=False)


def _print_dry_run(plan) -> None:
    import yaml

    from colbertkit.launcher import ACCELERATE_CONFIG_FILE

    typer.echo("# resolved profile (precedence: flags and --set > profile > defaults)")
    for key, value, source in plan.settings():
        typer.echo(f"{key}: {json.dumps(value)}  # {source}")
    typer.echo(f"# accelerate config ({ACCELERATE_CONFIG_FILE})")
    if plan.accelerate is None:
        typer.echo("# not computed: see the problems below")
    else:
        typer.echo(yaml.safe_dump(plan.accelerate, sort_keys=False).rstrip())
    typer.echo("# command")
    typer.echo(" ".join(plan.command))
    typer.echo("# plan")
    for line in plan.lines:
        typer.echo(f"- {line}")
    run_directory = {
        "new": f"{plan.output_dir}: a new run",
        "replace": f"{plan.output_dir}: holds a previous run, which --overwrite replaces",
        "resume": f"{plan.output_dir}: continues the run there",
        "refused": f"{plan.output_dir}: cannot be used as it is (see below)",
    }[plan.run_directory]
    typer.echo(f"- output: {run_directory}")
    for note in plan.notes:
        typer.echo(f"- note: {note}")
    for problem in plan.problems:
        typer.echo(f"- would stop the launch here: {as_flags(problem)}")
