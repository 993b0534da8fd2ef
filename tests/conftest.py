"""Shared fixtures: an offline tiny Qwen2 set-up, and helpers that run the real ``llamafactory-cli``."""

import atexit
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from llamafactory_minorsft.tools.tiny import build_tiny_setup, make_instruction_data, write_dataset
from warm_cli import WarmCLI


VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "llamafactory-cli")
#: The longest tests (30-90 s each, `--durations`) start first: in file order the two xdist workers ended with the
#: web UI and the reproduction smoke run, each alone on one core for a minute
SLOW_FIRST = (
    "test_reproduction.py::test_smoke",
    "test_deepspeed.py::",
    "test_grid.py::test_mini_grid",
    "test_webui.py::",
    "test_demo.py::",
    "test_distributed.py::",
    "test_precompute.py::test_precomputed_equals_online",
)


def pytest_collection_modifyitems(items) -> None:
    """Longest first (a stable sort: the order is the same on every xdist worker, as it must be)."""
    items.sort(key=lambda item: next((i for i, part in enumerate(SLOW_FIRST) if part in item.nodeid), len(SLOW_FIRST)))


#: The tests that start torchrun (2 processes each). Run one at a time on one xdist worker (``--dist loadgroup``, see
#: below): two at once on the 2 cores (4 processes whose collectives wait on each other) took the DeepSpeed tests
#: 397 s where one at a time took 301 s, and the other worker runs single-process tests meanwhile.
TORCHRUN = (
    "test_deepspeed.py::",
    "test_distributed.py::",
    "test_errors.py::test_zero3_reference_on_deepspeed_0_16",
)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `-p no:xdist` runs without it
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the ``TORCHRUN`` tests as one group and every other test on its own.

    By node id: xdist 3.8 tags an ``xdist_group`` mark's tests by rewriting their node ids, which pytest 9.2 no
    longer lets it do, so the marks alone group nothing (they ran on both workers).
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TorchrunGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "torchrun" if any(part in nodeid for part in TORCHRUN) else nodeid

    return TorchrunGroup(config, log)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """Tiny policy + a different reference (same tokenizer) + data; built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    paths = build_tiny_setup(str(root), seed=0, num_samples=64)
    data_dir = paths["data"]
    # exactly 4 short samples: one global batch of 4 holds the whole data set (order-free updates)
    write_dataset(data_dir, "four", make_instruction_data(4, seed=7))
    # samples of uneven lengths: `neat_packing` at cutoff 256 puts 2, 3, 3, 3, 3 and 2 of them into its six rows
    uneven = make_instruction_data(16, seed=5)
    uneven = [
        dict(s, instruction=s["instruction"][:8], output=s["output"][:6]) if i % 3 else s for i, s in enumerate(uneven)
    ]
    write_dataset(data_dir, "uneven", uneven)
    # a pairwise data set: LLaMA-Factory's ranking format, for stock DPO and for the error check
    pairs = [
        {"instruction": s["instruction"], "input": s["input"], "chosen": s["output"], "rejected": s["output"][::-1]}
        for s in make_instruction_data(8, seed=3)
    ]
    write_dataset(
        data_dir,
        "pairs",
        pairs,
        {
            "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        },
    )
    return SimpleNamespace(root=root, **paths)


@pytest.fixture(scope="session")
def bf16_tiny(tmp_path_factory) -> dict[bool, dict[str, str]]:
    """bf16-saved tiny policy and reference, with a tied and with an untied head (tied → paths)."""
    setups = {}
    for tied in (True, False):
        root = tmp_path_factory.mktemp("tiny_bf16_tied" if tied else "tiny_bf16_untied")
        setups[tied] = build_tiny_setup(str(root), seed=0, num_samples=16, dtype="bfloat16", tie_word_embeddings=tied)
        write_dataset(setups[tied]["data"], "four", make_instruction_data(4, seed=7))
    return setups


def base_config(tiny: SimpleNamespace, output_dir, **overrides) -> dict:
    """One exact plain-SGD step (lr 1, no clipping, no decay, constant schedule) on the `four` data set."""
    config = dict(
        model_name_or_path=tiny.model,
        stage="minorsft",
        do_train=True,
        finetuning_type="full",
        pref_beta=0.5,
        dataset="four",
        dataset_dir=tiny.data,
        template="qwen",
        cutoff_len=256,
        overwrite_cache=True,
        dataloader_num_workers=0,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_steps=1,
        seed=42,
    )
    config.update(overrides)
    return {key: value for key, value in config.items() if value is not None}


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # torchrun must be on PATH
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def deepspeed_env(**extra) -> dict:
    """``cli_env`` for a DeepSpeed run.

    LLaMA-Factory 0.9.4 caps deepspeed at 0.16.9, whose ZeRO-3 reference is wrong (see ``check_zero3_reference``); its
    stack here has 0.19.8, which its version check accepts only when disabled.
    """
    from llamafactory.extras.env import VERSION

    return cli_env(**({"DISABLE_VERSION_CHECK": "1"} if VERSION == "0.9.4" else {}), **extra)


@functools.cache
def warm_cli_log() -> Path:
    return Path(tempfile.mkdtemp(prefix="minorsft_warm_cli_")) / "server.log"


def warm_cli() -> WarmCLI:
    """This pytest process's warm CLI; a new one after a run broke the last (see ``WarmCLI``)."""
    global _warm_cli
    if _warm_cli is None or _warm_cli.broken or _warm_cli.process.poll() is not None:
        _warm_cli = WarmCLI(cli_env(), warm_cli_log())
        atexit.register(_warm_cli.close)
    return _warm_cli


_warm_cli: WarmCLI | None = None
_warm_socket: WarmCLI | None = None


def warm_tool_env() -> dict:
    """``cli_env`` for a tool (demo, grid, reproduction) whose trainings fork from this pytest process's warm CLI.

    The tools start ``$LLAMAFACTORY_MINORSFT_CLI`` for ``llamafactory-cli`` (``runs.train_command``): here the
    stand-in ``warm_client.py``, served over a socket by a warm CLI server (its imports done once). Only for tools on
    CPU in the default environment; the stopped-grid test keeps the real console script (it kills process groups).
    """
    global _warm_socket
    if torch.cuda.is_available():
        return cli_env()
    if _warm_socket is None or _warm_socket.process.poll() is not None:
        socket = os.path.join(tempfile.mkdtemp(prefix="mw"), "s")  # short: a socket path has at most 107 bytes
        _warm_socket = WarmCLI(cli_env(), Path(socket).with_name("server.log"), socket=socket)
        atexit.register(_warm_socket.close)
    client = Path(__file__).with_name("warm_client.py")
    # the runs fork from the server, with its environment: this one reaches only the client
    return cli_env(
        LLAMAFACTORY_MINORSFT_CLI=shlex.join([sys.executable, str(client)]), WARM_CLI_SOCKET=_warm_socket.socket
    )


def run_cli(config: dict, workdir, *args, check: bool = True, env: dict | None = None, timeout: int = 600):
    """``llamafactory-cli train <config>.yaml`` in a process of its own, from ``workdir``; returns CompletedProcess.

    With the default environment on CPU the process is a fork of the warm CLI (``warm_cli``), otherwise a new one.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    argv = [CLI, "train", str(config_path), *args]
    # the default environment on CPU: a fork of the warm CLI (its imports done once per pytest process); with a
    # GPU a new process, as CUDA cannot be used in a child forked after the driver was initialised
    if env is None and not torch.cuda.is_available():
        proc = warm_cli().run(argv, workdir, timeout)
    else:
        env = cli_env() if env is None else env
        proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"llamafactory-cli train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )

    return proc


def log_history(output_dir) -> list[dict]:
    with open(Path(output_dir) / "trainer_state.json", encoding="utf-8") as f:
        return json.load(f)["log_history"]


def step_logs(output_dir) -> list[dict]:
    """The per-step training logs (those with a `loss`), in order."""
    return [entry for entry in log_history(output_dir) if "loss" in entry]
