"""Training profiles: a YAML file = every :class:`TrainConfig` setting + a ``distributed:`` part.

Precedence, from strongest to weakest: command-line flags and ``--set key=value`` > the profile
> the defaults. :func:`resolve_profile` records where each setting came from so the launcher
can print it.

A ``--profile NAME`` is looked up as a path first, then among the bundled ``configs/``.
Relative paths inside a profile (dataset, output_dir, ...) are relative to the directory the
command runs in, as with the reference's shell scripts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from colbertkit.errors import UsageError, describe_validation_error, unknown_key_hint
from colbertkit.train_config import FAMILIAR_NAMES, TrainConfig

# Settings of TrainConfig that the launcher fills in from the distributed section.
LAUNCHER_SETTINGS = frozenset({"expected_num_processes", "validate_data"})


class DistributedConfig(BaseModel):
    """How many processes on how many machines, and how the model is spread over them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["none", "ddp", "fsdp"] = Field(
        default="none",
        description="none: one process; ddp: a full copy per process (gloo on CPU, NCCL on GPU); "
        "fsdp: parameters, gradients and optimizer state sharded across GPUs.",
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="auto: GPUs when the launching machine has CUDA, else CPU."
    )
    num_processes: int = Field(default=1, ge=1, description="Processes per machine.")
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = Field(
        default=None, description="Address of machine 0 (needed with num_machines > 1)."
    )
    main_process_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Default: a free port on one machine (two runs side by side never collide), "
        "29500 across machines.",
    )
    fsdp_sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = Field(
        default="FULL_SHARD",
        description="FULL_SHARD shards parameters too; SHARD_GRAD_OP only gradients and "
        "optimizer state; NO_SHARD (the reference's fsdp_sharding_strategy 3) saves no memory.",
    )
    fsdp_cpu_offload: bool = Field(default=False, description="Keep sharded parameters on CPU.")
    fsdp_activation_checkpointing: bool = False
    fsdp_layer_class: str | None = Field(
        default=None,
        description="Layer class to wrap; default: found from the model (BertLayer, ...).",
    )

    @model_validator(mode="after")
    def _check(self) -> DistributedConfig:
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("num_machines > 1 needs main_process_ip (the address of machine 0)")
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}"
            )
        if self.strategy == "none" and self.world_size > 1:
            raise ValueError(
                f"strategy 'none' runs one process but num_processes x num_machines is "
                f"{self.world_size}; choose strategy ddp or fsdp"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


class Profile(TrainConfig):
    """A training profile; dataset and output_dir may also come from the command line."""

    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    def train_config(self, *, validate_data: bool = True) -> TrainConfig:
        """The engine's configuration, with the launcher's settings filled in.

        ``validate_data=False`` when the launcher has checked the data itself (or was told not
        to): N workers need not read a large file N more times.
        """
        settings = self.model_dump(exclude={"distributed"})
        # Absolute paths: the workers, and a later --resume from another directory, read the
        # same files the launcher checked.
        for key in ("dataset", "eval_dataset", "output_dir"):
            if settings.get(key) is not None:
                settings[key] = Path(settings[key]).absolute()
        if Path(settings["model"]).exists():
            settings["model"] = str(Path(settings["model"]).absolute())
        settings["expected_num_processes"] = self.distributed.world_size
        settings["validate_data"] = validate_data
        return TrainConfig.model_validate(settings)


@dataclass
class ResolvedProfile:
    """A validated profile and where each setting came from ("default", "profile", "flag")."""

    profile: Profile
    path: Path | None
    sources: dict[str, str] = field(default_factory=dict)


def bundled_profiles_dir() -> Path:
    """``configs/`` of a source checkout, or its copy inside an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_configs", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return package / "_configs"


def find_profile(name: str) -> Path:
    """A path as given, else a bundled profile by name (with or without ``.yaml``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    bundled = bundled_profiles_dir()
    for candidate in (bundled / name, bundled / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in bundled.glob("*.yaml"))
    raise UsageError(
        f"profile {name}: no such file, and not a bundled profile "
        f"(bundled: {', '.join(available) or 'none'})"
    )


def read_profile_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"{path}{line}: not valid YAML ({problem})") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a profile is a mapping of settings, not a {type(data).__name__}")
    return data


def parse_set_options(assignments: list[str]) -> dict[str, Any]:
    """``["lr=2e-6", "distributed.num_processes=4"]`` -> nested settings (YAML-typed values)."""
    import yaml

    settings: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {assignment}: expected KEY=VALUE, e.g. --set lr=2e-6")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML 1.1 reads 2e-6 (no dot) as a string
        target = settings
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise UsageError(f"--set {assignment}: {parent} is not a section")
        target[leaf] = value
    return settings


def resolve_profile(
    name: str | None,
    overrides: Mapping[str, Any] | None = None,
) -> ResolvedProfile:
    """Merge defaults < profile file < overrides and validate the result in one step."""
    path = find_profile(name) if name else None
    from_file = read_profile_file(path) if path else {}
    _check_keys(from_file, path)
    overrides = dict(overrides or {})
    _check_keys(overrides, None)
    merged = _merge(from_file, overrides)
    sources = {key: "profile" for key in _flat_keys(from_file)}
    sources.update({key: "flag" for key in _flat_keys(overrides)})
    for missing, flag in (("dataset", "--dataset"), ("output_dir", "--output-dir")):
        if merged.get(missing) in (None, ""):
            where = f"{path}" if path else "the command line"
            raise UsageError(
                f"{missing} is not set in {where}; pass {flag} or set it in the profile"
            )
    try:
        profile = Profile.model_validate(merged)
    except ValidationError as error:
        where = f"{path}: " if path else ""
        raise UsageError(f"{where}invalid profile: {describe_validation_error(error)}") from None
    return ResolvedProfile(profile, path, sources)


def describe_sources(resolved: ResolvedProfile) -> list[tuple[str, Any, str]]:
    """(setting, value, source) for every setting, sections flattened with dots."""
    rows = []
    settings = resolved.profile.model_dump(mode="json", exclude=set(LAUNCHER_SETTINGS))
    for key, value in _flat_items(settings):
        rows.append((key, value, resolved.sources.get(key, "default")))
    return rows


def _check_keys(settings: Mapping[str, Any], path: Path | None) -> None:
    """Unknown keys name the nearest valid one (also inside ``distributed:``)."""
    where = f"{path}: " if path else ""
    sections = {"": (settings, set(Profile.model_fields) - LAUNCHER_SETTINGS)}
    distributed = settings.get("distributed")
    if isinstance(distributed, Mapping):
        sections["distributed."] = (distributed, set(DistributedConfig.model_fields))
    for prefix, (values, known) in sections.items():
        for key in values:
            if key in known:
                continue
            # Names from the reference scripts and HF's Trainer map to ours (learning_rate -> lr).
            nearest = unknown_key_hint(str(key), known, FAMILIAR_NAMES if not prefix else None)
            if key in LAUNCHER_SETTINGS:
                hint = "colbertkit train sets it itself"
            elif nearest:
                hint = f"did you mean '{prefix}{nearest}'?"
            else:
                hint = "see the bundled profiles in configs/ for the settings"
            raise UsageError(f"{where}unknown setting '{prefix}{key}' ({hint})")


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _flat_items(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            items.extend(_flat_items(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _flat_keys(settings: Mapping[str, Any]) -> list[str]:
    return [key for key, _ in _flat_items(settings)]
