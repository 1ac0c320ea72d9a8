"""From a resolved profile to an ``accelerate launch`` of colbertkit's worker, and its plan.

The launcher writes two files into the output directory and starts one subprocess:

* ``accelerate_config.yaml`` - generated from the profile's ``distributed:`` section;
* ``launch_profile.json``    - the engine's :class:`TrainConfig` (what every process trains);
* ``accelerate launch --config_file ... -m colbertkit.worker launch_profile.json``.

The subprocess's exit code is the command's; Ctrl-C and SIGTERM are passed on to the whole
process group, so no worker outlives the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colbertkit.errors import ColbertkitError, UsageError
from colbertkit.profile import Profile

ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
LAUNCH_CONFIG_FILE = "launch_profile.json"
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
    dist = profile.distributed
    world_size = dist.world_size
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO",
        "use_cpu": not gpu,
        "num_processes": world_size,  # accelerate counts processes over all machines
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "mixed_precision": profile.mixed_precision,
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
        config["main_process_port"] = dist.main_process_port
        config["rdzv_backend"] = "static"
        config["same_network"] = True
    if gpu:
        config["gpu_ids"] = "all"
    if dist.strategy == "fsdp":
        if layer_class is None:
            raise UsageError("FSDP needs the layer class to wrap; set distributed.fsdp_layer_class")
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
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerate_file = output_dir / ACCELERATE_CONFIG_FILE
    config_file = output_dir / LAUNCH_CONFIG_FILE
    accelerate_file.write_text(
        "# Generated by colbertkit from the profile's distributed: section.\n"
        + yaml.safe_dump(accelerate, sort_keys=False)
    )
    # The launcher has validated the data (or was told not to): the workers skip it.
    train_config = profile.train_config(validate_data=False)
    config_file.write_text(json.dumps(train_config.model_dump(mode="json"), indent=2))
    threads = cpu_threads_per_process(profile, gpu=not accelerate["use_cpu"])
    command = launch_command(accelerate_file, config_file, cpu_threads=threads)
    return LaunchFiles(accelerate_file, config_file, command)


def launch_command(
    accelerate_file: Path, config_file: Path, *, cpu_threads: int | None = None
) -> list[str]:
    """``accelerate launch`` (through :mod:`colbertkit.accelerate_launch`) of the worker.

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
    return [*command, "-m", "colbertkit.worker", str(config_file)]


def cpu_threads_per_process(profile: Profile, gpu: bool) -> int | None:
    """On CPU, share the machine's cores among its processes (accelerate asks for a number)."""
    if gpu:
        return None
    return max(1, (os.cpu_count() or 1) // profile.distributed.num_processes)


def run_launch(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` in its own process group; forward Ctrl-C / SIGTERM; return its code."""
    process = subprocess.Popen(command, env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
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


def plan_in_words(
    profile: Profile, *, gpu: bool, num_examples: int | None, parameters: int | None
) -> list[str]:
    """What the run will do, for ``--dry-run`` and the start of a launch.

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
        f"{plan['examples']} examples (one per positive): {plan['steps_per_epoch']} steps per "
        f"epoch, {plan['total_steps']} steps in all, {plan['warmup_steps']} warm-up steps",
    ]
    if dist.strategy == "fsdp":
        lines.append("sharding: " + SHARDING_IN_WORDS[dist.fsdp_sharding].format(n=dist.world_size))
    elif dist.strategy == "ddp":
        lines.append(
            f"no sharding: each of the {dist.world_size} processes holds the whole model (DDP)"
        )
    if parameters is not None:
        lines.append(memory_estimate(profile, parameters))
    return lines


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


def fail_on_error(code: int) -> None:
    if code != 0:
        raise ColbertkitError(f"training failed (exit code {code}); see the messages above")
