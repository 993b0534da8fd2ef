"""Data parallelism: 2 processes × batch 2 give the update of 1 process × batch 4 (torchrun via the stock CLI).

The torchrun children get the stages from the automatic registration alone.
"""

import pytest

from conftest import base_config, cli_env, run_cli, step_logs
from helpers import assert_same_weights


@pytest.mark.parametrize("stage", ["minorsft"])
def test_two_processes_equal_one_big_batch(tiny, tmp_path, stage):
    single = base_config(tiny, tmp_path / "single", stage=stage, ref_model=tiny.ref_model)
    double = base_config(
        tiny, tmp_path / "double", stage=stage, ref_model=tiny.ref_model, per_device_train_batch_size=2
    )
    run_cli(single, tmp_path / "single_run")
    run_cli(double, tmp_path / "double_run", env=cli_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2"))
    assert_same_weights(tmp_path / "single", tmp_path / "double")
    one, two = step_logs(tmp_path / "single")[0], step_logs(tmp_path / "double")[0]
    for key in ("loss", "deviation", "rewards", "coef", "logps/policy", "logps/ref"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
