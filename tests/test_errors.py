"""Bad input through the stock CLI: a clear error naming the option, before the model loads, nothing written."""

import pytest

from conftest import base_config, run_cli


CASES = {
    "zero_beta": (dict(pref_beta=0.0), "`pref_beta`"),
    "negative_beta": (dict(stage="sft_dpo", pref_beta=-0.1), "`pref_beta`"),
    "ranking_dataset": (dict(dataset="pairs"), "ranking"),
    "missing_ref_model": (dict(ref_model="/nonexistent/reference-model"), "`ref_model` path"),
    "unknown_stage": (dict(stage="minor_sft"), "Unknown `stage: minor_sft`"),
    "track_deviation_on_dpo": (dict(stage="dpo", dataset="pairs", track_deviation=True), "`track_deviation`"),
    "packing": (dict(packing=True), "`packing`"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_early_and_clearly(tiny, tmp_path, case):
    overrides, message = CASES[case]
    out = tmp_path / "out"
    proc = run_cli(base_config(tiny, out, **overrides), tmp_path / "run", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output[-3000:]
    assert "trainable params" not in output  # LLaMA-Factory logs this once the model is loaded
    assert not out.exists()
