"""Data parallelism: 2 processes × batch 2 give the update of 1 process × batch 4 (torchrun via the stock CLI).

The torchrun children get the stages from the automatic registration alone.
"""

from types import SimpleNamespace

import pytest

from conftest import base_config, cli_env, log_history, run_cli, step_logs
from helpers import assert_same_weights


@pytest.mark.parametrize("stage", ["minorsft"])
def test_two_processes_equal_one_big_batch(tiny, tmp_path, stage):
    """Training and evaluation; the eval set (4 samples, batches of 3) is uneven over the 2 processes.

    accelerate completes the second process's batch with 2 repeated samples: the eval metrics must not count them.
    """
    common = dict(stage=stage, ref_model=tiny.ref_model, do_eval=True, eval_dataset="four", eval_strategy="steps")
    common.update(eval_steps=1, per_device_eval_batch_size=3)
    single = base_config(tiny, tmp_path / "single", **common)
    double = base_config(tiny, tmp_path / "double", per_device_train_batch_size=2, **common)
    run_cli(single, tmp_path / "single_run")
    run_cli(double, tmp_path / "double_run", env=cli_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"))
    assert_same_weights(tmp_path / "single", tmp_path / "double")
    one, two = step_logs(tmp_path / "single")[0], step_logs(tmp_path / "double")[0]
    for key in ("loss", "deviation", "rewards", "coef", "logps/policy", "logps/ref"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    one, two = (next(e for e in log_history(tmp_path / run) if "eval_loss" in e) for run in ("single", "double"))
    for key in ("loss", "deviation", "rewards", "coef", "coef_std", "logps/policy", "logps/ref"):
        assert two[f"eval_{key}"] == pytest.approx(one[f"eval_{key}"], rel=1e-5, abs=1e-6), key


def test_two_processes_track_deviation_keeps_the_stock_loss(tiny, tmp_path):
    """The fused token mean under data parallelism: the Trainer counts tokens across processes, scales back by P.

    Against stock sft on one process with both processes' rows (stock sft's own data parallelism gives that update).
    """
    common = dict(stage="sft", learning_rate=0.5)
    run_cli(base_config(tiny, tmp_path / "stock", per_device_train_batch_size=4, **common), tmp_path / "stock_run")
    run_cli(
        base_config(tiny, tmp_path / "tracked", track_deviation=True, per_device_train_batch_size=2, **common),
        tmp_path / "t_run",
        env=cli_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"),
    )
    assert_same_weights(tmp_path / "stock", tmp_path / "tracked", rtol=1e-4, atol=1e-6)
    stock, tracked = step_logs(tmp_path / "stock")[0], step_logs(tmp_path / "tracked")[0]
    assert tracked["loss"] == pytest.approx(stock["loss"], rel=1e-5) and tracked["deviation"] == 0


@pytest.mark.compat
def test_find_unused_parameters_with_an_untied_head_equals_one_process(bf16_tiny, tmp_path):
    """DDP's ``find_unused_parameters`` (transformers' default for full tuning without gradient checkpointing).

    With an untied head (Qwen2-7B's), the head's weight must be used inside DDP's forward, or DDP marks it unused
    and then sees its gradient arrive ("Expected to mark a variable ready only once").
    """
    paths = bf16_tiny[False]  # loaded in float32 without `bf16: true`; the reference stays bf16 (frozen)
    tiny = SimpleNamespace(model=paths["model"], data=paths["data"])
    common = dict(
        stage="minorsft",
        ref_model=paths["ref_model"],
        disable_gradient_checkpointing=True,
        ddp_find_unused_parameters=True,
        learning_rate=0.5,
    )
    run_cli(base_config(tiny, tmp_path / "single", **common), tmp_path / "single_run")
    proc = run_cli(
        base_config(tiny, tmp_path / "double", per_device_train_batch_size=2, **common),
        tmp_path / "double_run",
        env=cli_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"),
    )
    assert "find_unused_parameters=True was specified" in proc.stdout + proc.stderr  # the option was on
    assert "Answer log-probs: head-free" in proc.stdout
    assert_same_weights(tmp_path / "single", tmp_path / "double", rtol=1e-5, atol=1e-6)
    one, two = step_logs(tmp_path / "single")[0], step_logs(tmp_path / "double")[0]
    for key in ("loss", "deviation", "coef"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
