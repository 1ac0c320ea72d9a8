"""Where training metrics go: always ``metrics.jsonl``, optionally wandb or tensorboard.

The loop calls ``tracker.log(metrics, step)`` and ``tracker.finish()`` and never asks which
backends are on: on processes other than the main one the tracker does nothing
(:class:`NullTracker`), so there are no ``if is_main_process`` branches around logging.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

METRICS_FILE = "metrics.jsonl"


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlTracker:
    """One JSON object per log call in ``metrics.jsonl``: ``{"step": ..., "time": ..., ...}``.

    ``resume_step`` drops the lines a killed run wrote after the checkpoint it resumes from,
    so the file reads as one run.
    """

    def __init__(self, output_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({key: _json_number(value) for key, value in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self) -> None:
        self._file.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _json_number(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)


class AccelerateTracker:
    """wandb / tensorboard through accelerate's trackers (which log on the main process only)."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.accelerator.log(dict(metrics), step=step)

    def finish(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, which belongs to
        # whoever called train(), not to the tracker.
        for tracker in self.accelerator.trackers:
            tracker.finish()


class Trackers:
    """Fan a log call out to several trackers."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """A flat copy of ``config`` that every backend accepts (tensorboard's hparams take only
    int/float/str/bool: None, paths and lists become strings)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, bool | int | float | str):
            flat[key] = value
        elif value is None:
            flat[key] = "none"
        else:
            flat[key] = str(value)
    return flat


def tracker_init_kwargs(log_with: str, output_dir: Path, run_name: str | None) -> dict[str, Any]:
    """Backend options for ``accelerator.init_trackers``: wandb files stay in the output dir."""
    if log_with == "wandb":
        options: dict[str, Any] = {"dir": str(output_dir)}
        if run_name:
            options["name"] = run_name
        return {"wandb": options}
    return {}


def make_tracker(
    *,
    accelerator: Any,
    log_with: str,
    output_dir: Path,
    project: str,
    run_name: str | None,
    config: Mapping[str, Any],
    resume_step: int | None,
) -> Tracker:
    """The tracker of this process: metrics.jsonl (+ a backend) on the main process, else none.

    ``accelerator.init_trackers`` is called on every process (accelerate starts the backend on
    the main one only); the accelerator must have been built with ``log_with`` set.
    """
    if log_with != "none":
        try:
            accelerator.init_trackers(
                project,
                config=hyperparameters(config),
                init_kwargs=tracker_init_kwargs(log_with, output_dir, run_name),
            )
        except Exception as error:
            from colbertkit.errors import UsageError, first_line

            raise UsageError(
                f"log_with '{log_with}': the tracker failed to start ({type(error).__name__}: "
                f"{first_line(error)}); "
                "set log_with to 'none' or fix the tracker's setup"
            ) from error
    if not accelerator.is_main_process:
        return NullTracker()
    trackers: list[Tracker] = [JsonlTracker(output_dir, resume_step)]
    if log_with != "none":
        trackers.append(AccelerateTracker(accelerator))
    return Trackers(trackers)
