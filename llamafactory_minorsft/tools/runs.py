"""What the tools share about LLaMA-Factory runs.

What the tools share about LLaMA-Factory runs: a grid run's record, training through the stock
``llamafactory-cli`` into a log file, and reading a finished run's logged metrics.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Run:
    """One run of a grid (``grid``) and, once finished, its result."""

    name: str
    method: str
    values: dict[str, Any]  # the grid values of this run
    config: dict[str, Any]  # the full LLaMA-Factory train config
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def setting(self) -> tuple:
        """The grid values without the seed: runs of one setting differ only by seed."""
        return tuple(sorted((k, v) for k, v in self.values.items() if k != "seed"))


def train(config_path: str, log_path: str, overrides: tuple[str, ...] = ()) -> int:
    """``llamafactory-cli train CONFIG [key=value ...]`` of this environment, output into ``log_path``."""
    cli = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.run([cli, "train", config_path, *overrides], stdout=log, stderr=subprocess.STDOUT).returncode


def log_history(output_dir: str) -> list[dict[str, Any]]:
    """The ``log_history`` of a finished run's ``trainer_state.json``."""
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)["log_history"]


def step_values(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in every training-step log (those with a ``loss``)."""
    return [(entry["step"], entry[key]) for entry in history if key in entry and "loss" in entry]


def final_value(history: list[dict[str, Any]], key: str) -> Optional[float]:
    """The last training-step value of ``key``, or None if it was never logged."""
    values = step_values(history, key)
    return values[-1][1] if values else None
