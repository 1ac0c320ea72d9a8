"""``colbertkit train`` as a Python function: a profile becomes a planned, supervised launch.

:func:`plan_launch` resolves the profile (with ``--resume`` and overrides), checks the data, the
starting checkpoint and the run directory, and computes the accelerate config, the command and
the plan; it changes nothing on disk (``--dry-run`` is this). :func:`launch` then prepares the
run directory and starts one subprocess:

* ``accelerate_config.yaml`` - generated from the profile's ``distributed:`` section;
* ``launch_profile.json``    - the engine's :class:`TrainConfig` (what every process trains);
* ``profile.yaml``           - the resolved profile, which ``--resume`` reads back;
* ``accelerate launch --config_file ... -m colbertkit.worker launch_profile.json``.

The subprocess's exit code is the result's; Ctrl-C and SIGTERM are passed on to the whole
process group, so no worker outlives the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colbertkit.checkpoint.files import atomic_write_text
from colbertkit.checkpoint.run import (
    ACCELERATE_CONFIG_FILE,
    FINAL_MODEL_DIR,
    LAUNCH_CONFIG_FILE,
    PROFILE_FILE,
    check_run_directory,
    prepare_run_directory,
    read_trainer_state,
    run_of,
)
from colbertkit.errors import DEBUG_ENV, QUIET_ENV, ColbertkitError, UsageError, first_line
from colbertkit.profile import LAUNCHER_SETTINGS, DistributedConfig, Profile, ResolvedProfile

SHARDING_IN_WORDS = {
    "FULL_SHARD": "parameters, gradients and optimizer state sharded over {n} GPUs",
    "SHARD_GRAD_OP": "gradients and optimizer state sharded over {n} GPUs; "
    "each GPU holds all parameters",
    "HYBRID_SHARD": "fully sharded within each machine, replicated across machines",
    "NO_SHARD": "no sharding: every GPU holds everything (like DDP; saves no memory)",
}


def transformer_layer_class(model: str, trust_remote_code: bool = False) -> str:
    """The repeated block of ``model``'s encoder (BertLayer, XLMRobertaLayer, ...).

    Read from the model class's ``_no_split_modules`` (what transformers itself keeps whole),
    found from the checkpoint's ``config.json`` alone: no weights are loaded.
    """
    from transformers import AutoConfig

    from colbertkit.checkpoint import resolve_checkpoint

    config = AutoConfig.from_pretrained(
        str(resolve_checkpoint(model)), trust_remote_code=trust_remote_code
    )
    return layer_class_for_config(config)


def layer_class_for_config(config: Any) -> str:
    from transformers import AutoModel

    model_class = AutoModel._model_mapping.get(type(config), None)
    no_split = getattr(model_class, "_no_split_modules", None) or []
    blocks = [name for name in no_split if name.endswith("Layer")]
    if len(blocks) != 1:
        raise UsageError(
            f"cannot tell the layer class to wrap for a {type(config).__name__}; "
            "set distributed.fsdp_layer_class in the profile (e.g. BertLayer)"
        )
    return blocks[0]


def accelerate_config(profile: Profile, *, gpu: bool, layer_class: str | None) -> dict[str, Any]:
    """The accelerate config file's contents for ``profile`` on a machine with(out) GPUs."""
    from colbertkit.precision import resolve_mixed_precision

    # accelerate takes no "auto": the launching machine decides (every machine of a run has
    # the same hardware, as with num_processes).
    mixed_precision, _ = resolve_mixed_precision(profile.mixed_precision, "cuda" if gpu else "cpu")
    return accelerate_config_for(
        profile.distributed,
        mixed_precision=mixed_precision,
        gpu=gpu,
        layer_class=layer_class,
    )


def accelerate_config_for(
    dist: DistributedConfig, *, mixed_precision: str, gpu: bool, layer_class: str | None
) -> dict[str, Any]:
    """The accelerate config of a ``distributed:`` section (training, or a scoring launch)."""
    world_size = dist.world_size
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO",
        "use_cpu": not gpu,
        "num_processes": world_size,  # accelerate counts processes over all machines
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "mixed_precision": mixed_precision,
        "downcast_bf16": "no",
    }
    if dist.strategy == "fsdp" and not gpu:
        raise UsageError(
            "strategy fsdp needs GPUs: on CPU accelerate would start independent trainings "
            "that share no gradient; use distributed.strategy ddp (gloo) on CPU"
        )
    if world_size > 1 or dist.strategy == "fsdp":
        # On CPU, accelerate starts several processes (torchrun) only under MULTI_GPU; the
        # worker then joins them into one gloo group (MULTI_CPU) and checks the world size.
        config["distributed_type"] = "FSDP" if dist.strategy == "fsdp" else "MULTI_GPU"
        config["main_process_ip"] = dist.main_process_ip or "127.0.0.1"
        config["main_process_port"] = main_process_port(dist)
        config["rdzv_backend"] = "static"
        config["same_network"] = True
    if gpu:
        config["gpu_ids"] = "all"
    if dist.strategy == "fsdp":
        if layer_class is None:
            raise UsageError(
                "FSDP needs the layer class to wrap; set distributed.fsdp_layer_class "
                "(e.g. BertLayer, XLMRobertaLayer)"
            )
        config["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": dist.fsdp_sharding,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_class,
            "fsdp_offload_params": dist.fsdp_cpu_offload,
            "fsdp_activation_checkpointing": dist.fsdp_activation_checkpointing,
            # Sharded training checkpoints (fast to write); the final model is gathered in full.
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            # Original parameter names and shapes: weight-decay groups by real names.
            "fsdp_use_orig_params": True,
            "fsdp_sync_module_states": True,
            "fsdp_cpu_ram_efficient_loading": True,
        }
    return config


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def uses_gpu(profile: Profile) -> bool:
    device = profile.distributed.device
    return gpu_available() if device == "auto" else device == "gpu"


@dataclass
class LaunchFiles:
    accelerate_config: Path
    train_config: Path
    command: list[str]


def write_launch_files(profile: Profile, accelerate: dict[str, Any]) -> LaunchFiles:
    """Write the accelerate config and the engine config into the output directory."""
    import yaml

    output_dir = Path(profile.output_dir)
    accelerate_file = output_dir / ACCELERATE_CONFIG_FILE
    config_file = output_dir / LAUNCH_CONFIG_FILE
    atomic_write_text(
        accelerate_file,
        "# Generated by colbertkit from the profile's distributed: section.\n"
        + yaml.safe_dump(accelerate, sort_keys=False),
    )
    # The launcher has validated the data (or was told not to): the workers skip it.
    train_config = profile.train_config(validate_data=False)
    atomic_write_text(config_file, json.dumps(train_config.model_dump(mode="json"), indent=2))
    threads = cpu_threads_per_process(profile, gpu=not accelerate["use_cpu"])
    command = launch_command(accelerate_file, config_file, cpu_threads=threads)
    return LaunchFiles(accelerate_file, config_file, command)


def main_process_port(dist: DistributedConfig) -> int:
    """The rendezvous port: the one set, else 29500 across machines (each must know it in
    advance), else a port free now on this machine, so that two launches side by side (two
    trainings, a scoring job next to a training) do not fight over 29500."""
    if dist.main_process_port is not None:
        return dist.main_process_port
    if dist.num_machines > 1:
        return 29500
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_command(
    accelerate_file: Path,
    config_file: Path,
    *,
    cpu_threads: int | None = None,
    module: str = "colbertkit.worker",
) -> list[str]:
    """``accelerate launch`` (through :mod:`colbertkit.accelerate_launch`) of a worker module:
    the training worker, or ``colbertkit.score_worker`` for a scoring launch.

    The worker runs as a module (``-m colbertkit.worker``): run as a file, its folder would
    come first on ``sys.path`` and colbertkit's module names would shadow the standard
    library's (``profile``).
    """
    command = [
        sys.executable, "-m", "colbertkit.accelerate_launch",
        "--config_file", str(accelerate_file),
    ]  # fmt: skip
    if cpu_threads is not None:
        command += ["--num_cpu_threads_per_process", str(cpu_threads)]
    return [*command, "-m", module, str(config_file)]


def cpu_threads_per_process(profile: Profile, gpu: bool) -> int | None:
    """On CPU, share the machine's cores among its processes (accelerate asks for a number)."""
    return cpu_threads_for(profile.distributed.num_processes, gpu)


def cpu_threads_for(num_processes: int, gpu: bool) -> int | None:
    """Threads per process when ``num_processes`` share this machine's cores (None on GPU):
    ``OMP_NUM_THREADS`` where the user set it, else the cores shared out."""
    if gpu:
        return None
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) > 0:
        return int(asked)
    return max(1, (os.cpu_count() or 1) // num_processes)


def run_launch(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` in its own process group; forward Ctrl-C / SIGTERM; return its code.

    Signals reach only the main thread: called from another one (a server's worker thread),
    nothing is forwarded, and the launch still ends with this process (the children die with
    their parent, :mod:`colbertkit.processes`).
    """
    import threading

    process = subprocess.Popen(command, env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        if in_main_thread
        else {}
    )
    try:
        try:
            code = process.wait()
        except BaseException:
            _terminate_group(process)
            raise
        if forwarded:
            _terminate_group(process)  # stragglers of the group, if any
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded and code == 0:
        code = 128 + forwarded[0]
    return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number


def _terminate_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def plan_numbers(
    profile: Profile, *, gpu: bool, num_examples: int | None, parameters: int | None
) -> tuple[dict[str, Any], list[str]]:
    """The run's numbers and what they mean in words, for ``--dry-run`` and a launch's start.

    The numbers are the engine's own (:func:`colbertkit.training.plan_training`); it counts
    the examples itself when ``num_examples`` is None.
    """
    from colbertkit.training import plan_training

    dist = profile.distributed
    plan = plan_training(profile.train_config(), dist.world_size, num_examples=num_examples)
    per_device = plan["batch_size_per_process"]
    lines = [
        f"world size {plan['world_size']}: {dist.num_processes} process(es) x "
        f"{dist.num_machines} machine(s) on {'GPU' if gpu else 'CPU'}, strategy {dist.strategy}",
        f"batch: {per_device} queries per device, {plan['global_batch_size']} per step over all "
        f"devices, effective {plan['effective_batch_size']} with gradient accumulation "
        f"{profile.gradient_accumulation_steps}",
        f"each query sees {plan['negatives_per_query']} negatives per step "
        f"({profile.neg_nums} hard negatives x {per_device} queries"
        + (f" x {dist.world_size} processes gathered" if profile.gather_across_processes else "")
        + (" + the other queries' positives" if profile.other_positives_as_negatives else "")
        + "); gradient accumulation adds none"
        + ("; gradient caching keeps the memory of one chunk" if profile.grad_cache else ""),
        f"{plan['examples']} examples (one per positive"
        + (", one per graded row" if profile.loss != "contrastive" else "")
        + f"): {plan['steps_per_epoch']} steps per "
        f"epoch, {plan['total_steps']} steps in all, {plan['warmup_steps']} warm-up steps",
    ]
    lines.append(_recipe_line(profile, plan))
    if dist.strategy == "fsdp":
        lines.append("sharding: " + SHARDING_IN_WORDS[dist.fsdp_sharding].format(n=dist.world_size))
    elif dist.strategy == "ddp":
        lines.append(
            f"no sharding: each of the {dist.world_size} processes holds the whole model (DDP)"
        )
    if parameters is not None:
        lines.append(memory_estimate(profile, parameters))
    return plan, lines


def _recipe_line(profile: Profile, plan: dict[str, Any]) -> str:
    loss = f"loss {profile.loss}"
    if profile.loss != "contrastive":
        loss += f" (teacher temperature {profile.teacher_softmax_temperature:g}"
        if profile.loss == "contrastive+kl":
            loss += f", distill_weight {profile.kl_weight:g}"
        loss += ")"
    rates = (
        f"lr {profile.lr:g} (head), {profile.encoder_lr:g} (encoder)"
        if profile.encoder_lr is not None
        else f"lr {profile.lr:g}"
    )
    warmup = (
        f"; only the head trains for the first {plan['head_warmup_steps']} steps, then the "
        f"encoder warms up over {plan['encoder_warmup_steps']}"
        if plan["head_warmup_steps"]
        else ""
    )
    return f"{loss}, temperature {profile.temperature:g}; {rates}{warmup}"


def memory_estimate(profile: Profile, parameters: int) -> str:
    """A rough per-device figure for weights, gradients and AdamW state (not activations)."""
    dist = profile.distributed
    world = dist.world_size
    weights = 4 * parameters  # fp32 master weights (mixed precision computes in 16 bit)
    gradients = 4 * parameters
    optimizer = 8 * parameters  # AdamW: two fp32 moments
    if profile.train_head_only:
        gradients = optimizer = 0
    if dist.strategy == "fsdp" and dist.fsdp_sharding != "NO_SHARD":
        gradients /= world
        optimizer /= world
        if dist.fsdp_sharding == "FULL_SHARD":
            weights /= world
    total = (weights + gradients + optimizer) / 2**30
    return (
        f"memory per device (rough): {total:.2f} GiB for {parameters / 1e6:.0f}M parameters' "
        "weights, gradients and AdamW state, plus activations"
        + (" (activation checkpointing on)" if profile.gradient_checkpointing else "")
    )


def count_parameters(model: str, colbert_dim: int | None, trust_remote_code: bool = False) -> int:
    """Encoder + head parameters, from config.json alone (the model is built on meta tensors)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from colbertkit.checkpoint import resolve_checkpoint

    config = AutoConfig.from_pretrained(
        str(resolve_checkpoint(model)), trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        encoder = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    hidden = int(config.hidden_size)
    dim = colbert_dim or hidden
    return sum(p.numel() for p in encoder.parameters()) + hidden * dim + dim


# --------------------------------------------------------------------------------------------
# The verb: plan, then launch
# --------------------------------------------------------------------------------------------


@dataclass
class LaunchPlan:
    """Everything a launch will do, computed without changing anything on disk."""

    resolved: ResolvedProfile
    gpu: bool
    accelerate: dict[str, Any] | None  # None: could not be computed (see problems)
    command: list[str]
    numbers: dict[str, Any]  # colbertkit.training.plan_training's
    lines: list[str]  # the plan in words
    notes: list[str] = field(default_factory=list)  # e.g. settings that differ from the model
    problems: list[str] = field(default_factory=list)  # what would stop the launch (dry run)
    run_directory: str = "new"  # "new" | "replace" | "resume" | "refused" (see problems)
    overwrite: bool = False
    validate: bool = True

    @property
    def profile(self) -> Profile:
        return self.resolved.profile

    @property
    def output_dir(self) -> Path:
        return Path(self.profile.output_dir)

    def settings(self) -> list[tuple[str, Any, str]]:
        """(setting, value, source) of every setting; source: default, profile or flag."""
        from colbertkit.profile import describe_sources

        return describe_sources(self.resolved)

    def to_dict(self) -> dict[str, Any]:
        """The plan for machines (``colbertkit train --dry-run --format json``)."""
        return {
            "format": "colbertkit.train-plan",
            "format_version": 1,
            "profile": str(self.resolved.path) if self.resolved.path else None,
            "settings": {
                key: {"value": value, "source": source} for key, value, source in self.settings()
            },
            "accelerate_config": self.accelerate,
            "command": self.command,
            "plan": self.numbers,
            "plan_in_words": self.lines,
            "run_directory": self.run_directory,
            "notes": self.notes,
            "problems": self.problems,
        }


@dataclass
class LaunchResult:
    plan: LaunchPlan
    exit_code: int | None  # None: a dry run, nothing launched

    @property
    def model_dir(self) -> Path:
        return self.plan.output_dir / FINAL_MODEL_DIR


def launch(
    profile: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    validate: bool = True,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> LaunchResult:
    """Train as a profile says: ``colbertkit train`` from Python.

    ``profile``: a YAML path or a bundled name (``demo``, ``bge-m3``, ...); ``overrides``:
    settings that win over the profile (``{"lr": 2e-6, "distributed": {"num_processes": 2}}``);
    ``resume``: a run directory (continued from its newest checkpoint) or one of its
    checkpoints, whose saved profile is used unless ``profile`` is given; ``overwrite``: replace
    a previous run in the output directory (never a directory holding files colbertkit did not
    write); ``validate``: check the data first. ``dry_run`` returns the plan without launching.
    ``log(line)`` is told what happens. Returns the plan and the launch's exit code.
    """
    plan = plan_launch(
        profile,
        overrides=overrides,
        resume=resume,
        overwrite=overwrite,
        validate=validate,
        dry_run=dry_run,
    )
    if dry_run:
        return LaunchResult(plan, None)
    return LaunchResult(plan, run_plan(plan, log=log))


def plan_launch(
    profile: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    validate: bool = True,
    dry_run: bool = False,
) -> LaunchPlan:
    """The plan of :func:`launch` (same arguments); writes nothing.

    With ``dry_run``, what would stop the launch (a run already in the output directory, a
    layer class that cannot be found offline) is listed in ``problems`` and the rest of the plan
    is still computed; otherwise it raises.
    """
    from colbertkit.profile import resolve_profile

    overrides = dict(overrides or {})
    if resume is not None:
        profile, overrides = _resume_settings(Path(resume), profile, overrides)
    if profile is None:
        raise UsageError("no profile: pass `profile` (e.g. demo) or `resume` (a run directory)")
    resolved = resolve_profile(profile, overrides)
    chosen = resolved.profile
    problems: list[str] = []

    def problem(error: ColbertkitError) -> None:
        if not dry_run:
            raise error
        problems.append(str(error))

    notes = _checkpoint_notes(chosen)
    resuming = chosen.resume_from is not None
    run_directory = "resume" if resuming else "new"
    try:
        run_directory = check_run_directory(
            Path(chosen.output_dir), overwrite=overwrite, resume=resuming
        )
        if resuming:
            _check_resumable(chosen)
    except UsageError as error:
        run_directory = "refused"
        problem(error)

    num_examples = None
    if validate:
        num_examples = _validated_examples(chosen)
    gpu = uses_gpu(chosen)
    accelerate = None
    layer_class = chosen.distributed.fsdp_layer_class
    try:
        if chosen.distributed.strategy == "fsdp" and layer_class is None:
            try:
                layer_class = transformer_layer_class(chosen.model, chosen.trust_remote_code)
            except ColbertkitError as error:
                raise UsageError(
                    f"cannot find the layer class FSDP wraps for {chosen.model} "
                    f"({first_line(error)}); set distributed.fsdp_layer_class (e.g. "
                    "XLMRobertaLayer for bge-m3, BertLayer for BERT models)"
                ) from error
        accelerate = accelerate_config(chosen, gpu=gpu, layer_class=layer_class)
    except ColbertkitError as error:
        problem(error)
    parameters = _parameters_or_none(chosen) if dry_run else None
    if dry_run and parameters is None:
        notes.append(
            f"memory estimate left out: {chosen.model} is not here to read its size "
            "(a hub id offline?)"
        )
    output_dir = Path(chosen.output_dir)
    command = launch_command(
        output_dir / ACCELERATE_CONFIG_FILE,
        output_dir / LAUNCH_CONFIG_FILE,
        cpu_threads=cpu_threads_per_process(chosen, gpu),
    )
    numbers, lines = plan_numbers(chosen, gpu=gpu, num_examples=num_examples, parameters=parameters)
    return LaunchPlan(
        resolved=resolved,
        gpu=gpu,
        accelerate=accelerate,
        command=command,
        numbers=numbers,
        lines=lines,
        notes=notes,
        problems=problems,
        run_directory=run_directory,
        overwrite=overwrite,
        validate=validate,
    )


def run_plan(
    plan: LaunchPlan,
    *,
    log: Callable[[str], None] | None = None,
    debug: bool = False,
    quiet: bool = False,
) -> int:
    """Prepare the run directory, write the launch files and run the launch; its exit code.

    ``debug`` lets the workers show tracebacks; ``quiet`` keeps them to errors.
    """
    if plan.problems or plan.accelerate is None:
        raise UsageError(plan.problems[0] if plan.problems else "the launch was not planned")
    profile = plan.profile
    prepare_run_directory(
        plan.output_dir, overwrite=plan.overwrite, resume=profile.resume_from is not None
    )
    files = write_launch_files(profile, plan.accelerate)
    write_resolved_profile(profile)
    if log is not None:
        for line in plan.lines:
            log(line)
        log(f"launching: {' '.join(files.command)}")
    env = dict(os.environ)
    if debug:
        env[DEBUG_ENV] = "1"
    if quiet:
        env[QUIET_ENV] = "1"
    return run_launch(files.command, env=env)


def write_resolved_profile(profile: Profile) -> Path:
    """``profile.yaml`` of the run: every setting, as ``--resume`` reads it back.

    Local paths are written absolute, so the run can be resumed from any directory.
    """
    import yaml

    data = profile.model_dump(mode="json", exclude={*LAUNCHER_SETTINGS, "resume_from"})
    for key in ("model", "dataset", "eval_dataset", "output_dir"):
        value = data.get(key)
        if value and (key != "model" or Path(value).exists()):
            data[key] = str(Path(value).absolute())
    path = Path(profile.output_dir) / PROFILE_FILE
    atomic_write_text(
        path,
        "# The profile this run was launched with (all settings resolved); "
        "colbertkit train --resume reads it.\n" + yaml.safe_dump(data, sort_keys=False),
    )
    return path


def _resume_settings(
    target: Path, profile: str | None, overrides: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``resume``: the run's own resolved profile, continued from its newest checkpoint (or
    from the checkpoint given)."""
    run = run_of(target)
    if run is None:
        raise UsageError(
            f"`resume` {target}: not a training run (no {PROFILE_FILE} or checkpoints); pass "
            "the output directory colbertkit train wrote"
        )
    saved = run / PROFILE_FILE
    if profile is None and not saved.is_file():
        raise UsageError(
            f"`resume` {target}: {run} has no {PROFILE_FILE} (not launched by colbertkit train); "
            "pass `profile` too"
        )
    overrides = dict(overrides)
    overrides["resume_from"] = "latest" if target.resolve() == run.resolve() else str(target)
    overrides.setdefault("output_dir", str(run))
    return (profile or str(saved)), overrides


def _check_resumable(profile: Profile) -> None:
    """Refuse before launching what the workers would refuse: changed settings, another world
    size, or nothing to resume from."""
    from colbertkit.checkpoint.run import resume_checkpoint
    from colbertkit.train_config import resume_conflicts

    output_dir = Path(profile.output_dir)
    checkpoint = resume_checkpoint(output_dir, profile.resume_from)
    assert checkpoint is not None
    state = read_trainer_state(checkpoint)
    changed = resume_conflicts(state.get("config", {}), profile.train_config())
    if changed:
        raise UsageError(
            f"cannot resume {checkpoint}: these settings differ from the run that wrote it "
            f"({', '.join(changed)}); drop them, or start a new run with another --output-dir"
        )
    world_size = state.get("world_size")
    if world_size != profile.distributed.world_size:
        raise UsageError(
            f"cannot resume {checkpoint}: it was written by {world_size} process(es), the "
            f"profile asks for {profile.distributed.world_size}; resume with "
            f"distributed.num_processes giving {world_size}"
        )


def _checkpoint_notes(profile: Profile) -> list[str]:
    """Settings that differ from the starting checkpoint's own: said, never hidden."""
    from colbertkit.checkpoint.sources import open_checkpoint

    if not Path(profile.model).exists():
        return []
    try:
        source = open_checkpoint(profile.model, trust_remote_code=profile.trust_remote_code)
    except ColbertkitError:
        return []  # the engine reports it with its own message when it loads the model
    notes = [f"starting from {source.form}: {source.description}"]
    if source.kind not in ("colbertkit", "training"):
        return notes
    facts = {
        "query_max_len": source.query_max_len,
        "passage_max_len": source.passage_max_len,
        "colbert_dim": source.colbert_dim if source.head is not None else None,
    }
    for key, theirs in facts.items():
        ours = getattr(profile, key)
        if ours is not None and theirs is not None and theirs != ours:
            notes.append(
                f"{key} is {ours} here but {theirs} in {source.path}; training uses {ours}"
            )
    return notes


def _validated_examples(profile: Profile) -> int:
    """The engine's own data checks, once, in the launcher; returns the number of examples."""
    from colbertkit.training import validate_training_data

    report = validate_training_data(profile.train_config())
    return int(report.file("train").to_dict()["statistics"]["examples"])


def _parameters_or_none(profile: Profile) -> int | None:
    try:
        return count_parameters(profile.model, profile.colbert_dim, profile.trust_remote_code)
    except (ColbertkitError, OSError, ValueError):
        return None  # an offline hub model: the plan goes without a memory estimate
