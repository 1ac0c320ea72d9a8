"""``colbertkit train --profile P``: a YAML profile becomes an ``accelerate launch``."""

from __future__ import annotations

from pathlib import Path

import typer

from colbertkit.cli._common import handle_errors, stderr_console
from colbertkit.errors import UsageError

RESOLVED_PROFILE_FILE = "profile.yaml"


@handle_errors
def train_command(
    profile: str | None = typer.Option(
        None, "--profile", "-p", help="Profile YAML: a path, or a bundled name (demo, bge-m3, ...)."
    ),
    dataset: Path | None = typer.Option(None, "--dataset", help="Training jsonl."),
    eval_dataset: Path | None = typer.Option(None, "--eval-dataset", help="Held-out jsonl."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Run directory."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint to start from."),
    num_processes: int | None = typer.Option(
        None, "--num-processes", min=1, help="Processes per machine (distributed.num_processes)."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="KEY=VALUE, e.g. lr=2e-6 or distributed.strategy=ddp (repeatable)."
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="Continue a run: its directory (newest checkpoint) or a checkpoint."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; launch nothing."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete a previous run in the output directory first."
    ),
    validate: bool = typer.Option(
        True, "--validate/--no-validate", help="Check the data (validate-data) before launching."
    ),
) -> None:
    """Fine-tune a ColBERT model as a profile says, through accelerate (DDP or FSDP)."""
    from colbertkit import launch
    from colbertkit.profile import parse_set_options, resolve_profile

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
    if resume is not None:
        profile, overrides = _resume_settings(resume, profile, overrides)
    if profile is None:
        raise UsageError("no profile: pass --profile (e.g. --profile demo) or --resume RUN_DIR")

    resolved = resolve_profile(profile, overrides)
    chosen = resolved.profile
    console = stderr_console()
    if not dry_run:
        _print_settings(console, resolved)
    _report_checkpoint_conflicts(console, chosen)

    num_examples = None
    if validate:
        num_examples = _validate_data(chosen)
    gpu = launch.uses_gpu(chosen)
    layer_class = None
    if chosen.distributed.strategy == "fsdp":
        layer_class = chosen.distributed.fsdp_layer_class or launch.transformer_layer_class(
            chosen.model, chosen.trust_remote_code
        )
    accelerate = launch.accelerate_config(chosen, gpu=gpu, layer_class=layer_class)
    parameters = _parameters_or_none(chosen) if dry_run else None
    plan = launch.plan_in_words(chosen, gpu=gpu, num_examples=num_examples, parameters=parameters)

    if dry_run:
        import json

        import yaml

        from colbertkit.profile import describe_sources

        output_dir = Path(chosen.output_dir)
        command = launch.launch_command(
            output_dir / launch.ACCELERATE_CONFIG_FILE,
            output_dir / launch.LAUNCH_CONFIG_FILE,
            cpu_threads=launch.cpu_threads_per_process(chosen, gpu),
        )
        typer.echo("# resolved profile (precedence: flags and --set > profile > defaults)")
        for key, value, source in describe_sources(resolved):
            typer.echo(f"{key}: {json.dumps(value)}  # {source}")
        typer.echo("# accelerate config (" + launch.ACCELERATE_CONFIG_FILE + ")")
        typer.echo(yaml.safe_dump(accelerate, sort_keys=False).rstrip())
        typer.echo("# command")
        typer.echo(" ".join(command))
        typer.echo("# plan")
        for line in plan:
            typer.echo(f"- {line}")
        return

    _prepare_output_dir(chosen, overwrite)
    files = launch.write_launch_files(chosen, accelerate)
    _write_resolved_profile(chosen)
    for line in plan:
        console.print(f"[dim]{line}[/]", highlight=False)
    console.print(f"[dim]launching: {' '.join(files.command)}[/]", highlight=False)
    code = launch.run_launch(files.command)
    if code != 0:
        raise typer.Exit(code)
    console.print(f"[green]done[/]: model in {Path(chosen.output_dir) / 'model'}", highlight=False)


def _resume_settings(resume: str, profile: str | None, overrides: dict) -> tuple[str, dict]:
    """``--resume RUN``: the run's own resolved profile, continued from its newest checkpoint."""
    target = Path(resume)
    run_dir = target if (target / RESOLVED_PROFILE_FILE).is_file() else target.parent.parent
    saved = run_dir / RESOLVED_PROFILE_FILE
    if not saved.is_file():
        raise UsageError(
            f"--resume {resume}: no {RESOLVED_PROFILE_FILE} there; pass the run directory "
            "that colbertkit train wrote (or --profile with --set resume_from=PATH)"
        )
    overrides = dict(overrides)
    overrides["resume_from"] = "latest" if target == run_dir else str(target)
    overrides.setdefault("output_dir", str(run_dir))
    return (profile or str(saved)), overrides


def _print_settings(console, resolved) -> None:
    """The settings that are not defaults, and where each came from."""
    from colbertkit.profile import describe_sources

    where = f" from {resolved.path}" if resolved.path else ""
    console.print(f"profile{where} (precedence: flags and --set > profile > defaults)")
    for key, value, source in describe_sources(resolved):
        if source != "default":
            console.print(f"  {key} = {value!r}  [dim]({source})[/]", highlight=False)


def _report_checkpoint_conflicts(console, profile) -> None:
    """Settings that differ from the starting checkpoint's metadata: said, never hidden."""
    from colbertkit.checkpoint import METADATA_FILE, CheckpointMetadata

    metadata_file = Path(profile.model) / METADATA_FILE
    if not metadata_file.is_file():
        return
    metadata = CheckpointMetadata.model_validate_json(metadata_file.read_bytes())
    for key in ("query_max_len", "passage_max_len", "colbert_dim"):
        theirs, ours = getattr(metadata, key), getattr(profile, key)
        if ours is not None and theirs != ours:
            console.print(
                f"[yellow]note[/]: {key} is {ours} here but {theirs} in {metadata_file}; "
                f"training uses {ours}",
                highlight=False,
            )


def _validate_data(profile) -> int:
    """The engine's own data checks, once, in the launcher; returns the number of examples."""
    from colbertkit.training import validate_training_data

    report = validate_training_data(profile.train_config())
    return int(report.file("train").to_dict()["statistics"]["examples"])


def _parameters_or_none(profile) -> int | None:
    from colbertkit import launch
    from colbertkit.errors import ColbertkitError

    try:
        return launch.count_parameters(
            profile.model, profile.colbert_dim, profile.trust_remote_code
        )
    except (ColbertkitError, OSError, ValueError):
        return None  # an offline hub model: the plan goes without a memory estimate


def _prepare_output_dir(profile, overwrite: bool) -> None:
    """Refuse (or with --overwrite, clear) a directory that holds a run, before writing to it."""
    import shutil

    from colbertkit.training import FINAL_MODEL_DIR, list_checkpoints

    output_dir = Path(profile.output_dir)
    if profile.resume_from is not None or not output_dir.exists():
        return
    holds_run = bool(list_checkpoints(output_dir)) or (output_dir / FINAL_MODEL_DIR).exists()
    if holds_run and not overwrite:
        raise UsageError(
            f"{output_dir} already holds a training run; continue it with --resume {output_dir}, "
            "start afresh with --overwrite, or choose another --output-dir"
        )
    if overwrite:
        shutil.rmtree(output_dir)


def _write_resolved_profile(profile) -> None:
    import yaml

    data = profile.model_dump(mode="json", exclude={"expected_num_processes", "resume_from"})
    path = Path(profile.output_dir) / RESOLVED_PROFILE_FILE
    path.write_text(
        "# The profile this run was launched with (all settings resolved).\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
