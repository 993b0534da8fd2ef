"""One plain-SGD step through the stock CLI moves the weights by exactly the paper's gradient.

With lr = 1, no clipping and no weight decay, θ1 − θ0 = −∇L. The expected gradient is computed here,
independently of the package: per-sample forward passes, log_softmax + indexing, autograd of each
log πθ(y_i|x_i), and the coefficients of Eq. 7 (MinorSFT), Eq. 4 (the gradient of Eq. 3, SFT using DPO) or Eq. 5
(SFT with `sft_loss_reduction: sample`: each sample's mean token NLL, averaged over samples).
The reference differs from the policy, so the coefficients are not trivially 1. The same run's logged
step-1 metrics are checked against Eq. 8 and the other definitions.
"""

import pytest

from conftest import base_config, run_cli, step_logs
from helpers import BETA, assert_sgd_step, expected_step, step_inputs
from llamafactory_minorsft.train.metrics import COEF_METRICS, DEVIATION_METRICS


STAGE_ARGS = {
    "minorsft": dict(stage="minorsft"),
    "sft_dpo": dict(stage="sft_dpo"),
    # the like-for-like SFT baseline, with the deviation metric logged beside it
    "sft_sample": dict(stage="sft", sft_loss_reduction="sample", track_deviation=True),
}


@pytest.mark.compat
@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_one_sgd_step_matches_paper_gradient(tiny, tmp_path, stage):
    out = tmp_path / "out"
    run_cli(base_config(tiny, out, pref_beta=BETA, ref_model=tiny.ref_model, **STAGE_ARGS[stage]), tmp_path)
    theta0, descent, metrics = expected_step(tiny, stage)
    encoded = step_inputs(tiny)[0]
    assert len({len(answer) for _, answer in encoded}) > 1, "equal answer lengths: Eq. 5 = the token mean, untested"

    assert_sgd_step(out, theta0, descent)

    logged = step_logs(out)[0]
    if "coef" in metrics:
        assert abs(metrics["coef"] - (1.0 if stage == "minorsft" else 0.5)) > 1e-3, "coefficient trivially at start"
    else:
        assert not set(COEF_METRICS) & set(logged)
    assert set(DEVIATION_METRICS) <= set(metrics)
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
