"""What the tools share about LLaMA-Factory runs.

What the tools share about LLaMA-Factory runs: a grid run's record, training through the stock
``llamafactory-cli`` into a log file, and reading a finished run's logged metrics.
"""

import json
import os
import shlex
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


#: a command that stands for ``llamafactory-cli`` in the tools' trainings, e.g. a wrapper that prefixes it
CLI_ENV = "LLAMAFACTORY_MINORSFT_CLI"


def train_command(config_path: str, *overrides: str) -> list[str]:
    """``llamafactory-cli train CONFIG [key=value ...]``: this environment's console script, or ``$CLI_ENV``.

    ``LLAMAFACTORY_MINORSFT_CLI="nice -n 10 llamafactory-cli"`` (split as a shell would) starts every training of
    the demo, the grid and the reproduction through that command instead.
    """
    command = shlex.split(os.getenv(CLI_ENV, ""))
    if not command:
        command = [os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")]
    return [*command, "train", config_path, *overrides]


def train(config_path: str, log_path: str, overrides: tuple[str, ...] = ()) -> int:
    """``train_command`` with its output into ``log_path``; its return code."""
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.run(train_command(config_path, *overrides), stdout=log, stderr=subprocess.STDOUT).returncode


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
