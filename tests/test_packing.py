"""`neat_packing`: a packed batch trains and logs exactly as the same samples unpacked.

LLaMA-Factory packs the four samples of `four` into two rows (cutoff 256), without attention between them. One
plain-SGD step over that row must equal, within float32 rounding, the paper's step computed here independently
(``helpers.expected_step``: one forward per sample) for minorsft, sft_dpo and sft with Eq. 5; and for the stages
whose loss holds the stock token mean (sft + `track_deviation`, sft_go), the same run unpacked. Metrics that average
over samples (the deviation, Eq. 8) count samples, not rows.
"""

import json
import re

import pytest
import torch

from conftest import base_config, log_history, run_cli, step_logs
from helpers import BETA, assert_same_weights, assert_sgd_step, expected_step
from llamafactory_minorsft.train.packing import Samples, split_samples, unlink_samples


def train_rows(proc) -> int:
    """The rows of the training set, as the Trainer logs them: 4 unpacked, fewer where samples share rows."""
    return int(re.search(r"Num examples = (\d+)", proc.stdout + proc.stderr).group(1))


def packed_config(tiny, out, **overrides) -> dict:
    """`base_config` with the four samples packed into one row of the batch."""
    return base_config(tiny, out, neat_packing=True, **overrides)


def test_samples_gather_each_sample_of_a_packed_row():
    """``Samples`` against a loop over the rows, written here: sample order, positions, padding, gradients."""
    sample_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]])
    values = torch.randn(2, 9, requires_grad=True)
    samples = Samples.of(sample_ids)
    taken = samples.take(values, fill=0.0)
    expected = []
    for row in range(2):
        for sample in range(1, int(sample_ids[row].max()) + 1):
            positions = [t for t in range(9) if sample_ids[row, t + 1] == sample]  # t predicts token t + 1
            expected.append(values[row, positions])
    assert len(samples) == len(expected) == 5
    for row, want in enumerate(expected):
        assert torch.equal(taken[row, : want.numel()], want)
        assert not taken[row, want.numel() :].any()
    taken.sum().backward()  # every position of a sample gets its gradient once, padding none
    assert torch.equal(values.grad, (sample_ids[:, 1:] > 0).float())

    labels = torch.arange(20).reshape(2, 10)
    per_sample = samples.labels(labels)
    assert per_sample[0, 0] == -100 and torch.equal(per_sample[0, 1:3], torch.tensor([1, 2]))  # sample 1: tokens 1, 2


def test_unlinked_samples_do_not_predict_each_other():
    feature = {"attention_mask": [1, 1, 1, 2, 2, 0], "labels": [5, 6, 7, 8, 9, -100]}
    assert unlink_samples(feature)["labels"] == [5, 6, 7, -100, 9, -100]
    assert split_samples([5, 6, 7, -100, 9, -100], [1, 1, 1, 2, 2, 0]) == [[5, 6, 7], [-100, 9]]


EXACT = {  # stage → arguments; checked against the independent step of ``helpers.expected_step``
    "minorsft": dict(stage="minorsft"),
    "sft_dpo": dict(stage="sft_dpo"),
    "sft_sample": dict(stage="sft", sft_loss_reduction="sample", track_deviation=True),
}


@pytest.mark.compat
@pytest.mark.parametrize("stage", list(EXACT))
def test_packed_step_matches_paper_gradient(tiny, tmp_path, stage):
    from llamafactory.extras.env import VERSION

    if VERSION == "0.9.4":
        pytest.skip("LLaMA-Factory 0.9.4 refuses neat_packing with its transformers (test_errors checks ours)")
    out = tmp_path / "out"
    proc = run_cli(packed_config(tiny, out, pref_beta=BETA, ref_model=tiny.ref_model, **EXACT[stage]), tmp_path)
    assert "Answer log-probs: head-free" in proc.stdout
    assert train_rows(proc) < 4  # rows hold several samples
    assert_paper_step(tiny, out, stage)


def assert_paper_step(tiny, out, stage: str) -> None:
    theta0, descent, metrics = expected_step(tiny, stage)
    assert_sgd_step(out, theta0, descent)
    logged = step_logs(out)[0]
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.compat
def test_precomputed_reference_cache_serves_packed_and_unpacked_runs(tiny, tmp_path):
    """One reference pass, unpacked; the packed run of the same data finds every sample in the cache."""
    from llamafactory.extras.env import VERSION

    if VERSION == "0.9.4":
        pytest.skip("LLaMA-Factory 0.9.4 refuses neat_packing with its transformers")
    common = dict(pref_beta=BETA, ref_model=tiny.ref_model, precompute_ref_logps=True)
    common["ref_logps_cache_dir"] = str(tmp_path / "cache")
    for packed in (False, True):
        out = tmp_path / ("packed" if packed else "unpacked")
        proc = run_cli(base_config(tiny, out, neat_packing=packed, **common), tmp_path / f"{out.name}_run")
        assert (train_rows(proc) < 4) == packed
        results = json.loads((out / "all_results.json").read_text())
        assert ("ref_precompute_train_runtime" in results) == (not packed)  # the packed run: a cache hit, no pass
        assert_paper_step(tiny, out, "minorsft")
    assert len(list((tmp_path / "cache").iterdir())) == 1


SAME_AS_UNPACKED = {  # stage → arguments; the packed run equals the same run unpacked
    "sft_tracked": dict(stage="sft", track_deviation=True, do_eval=True, eval_dataset="four", eval_strategy="steps"),
    "sft_go_tfidf": dict(stage="sft_go", track_deviation=True),
    # per-token reference values (precomputed: a list of lists per packed row; the unpacked run fills the cache)
    "sft_go_rho1_precomputed": dict(
        stage="sft_go", sft_go_grouping="rho1", ref_model="REF", precompute_ref_logps=True
    ),
    "minorsft_lora": dict(stage="minorsft", finetuning_type="lora", lora_target="all", learning_rate=0.5),
    # with an eval set over several batches of uneven packed rows: `eval_loss` is the mean over samples, not the
    # Trainer's mean over rows; batches of 5 leave a last, smaller batch unpacked, which the Trainer counted as 5
    "minorsft_freeze_eval": dict(
        stage="minorsft",
        finetuning_type="freeze",
        ref_model="REF",
        do_eval=True,
        eval_dataset="minorsft_demo_eval",
        eval_strategy="steps",
        per_device_eval_batch_size=5,
    ),
}


@pytest.mark.parametrize("case", list(SAME_AS_UNPACKED))
def test_packed_run_equals_unpacked(tiny, tmp_path, case):
    """Two SGD steps, packed and unpacked: every logged metric of both steps, and the weights, agree."""
    from llamafactory.extras.env import VERSION

    if VERSION == "0.9.4":
        pytest.skip("LLaMA-Factory 0.9.4 refuses neat_packing with its transformers")
    args = {key: tiny.ref_model if value == "REF" else value for key, value in SAME_AS_UNPACKED[case].items()}
    if args.get("do_eval"):
        args = {"eval_steps": 1, "per_device_eval_batch_size": 4, **args}
    if args.get("precompute_ref_logps"):
        args["ref_logps_cache_dir"] = str(tmp_path / "cache")
    runs = {}
    for packed in (False, True):
        out = tmp_path / ("packed" if packed else "unpacked")
        proc = run_cli(base_config(tiny, out, neat_packing=packed, max_steps=2, **args), tmp_path / f"{out.name}_run")
        assert (train_rows(proc) < 4) == packed
        runs[packed] = out
    unpacked, packed = step_logs(runs[False]), step_logs(runs[True])
    assert len(unpacked) == len(packed) == 2
    for step, (want, got) in enumerate(zip(unpacked, packed), start=1):
        keys = {key for key in want if isinstance(want[key], float)} - {"epoch", "learning_rate"}
        assert "deviation" in keys and "loss" in keys
        for key in sorted(keys):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key)
    if args.get("do_eval"):  # evaluation takes the full logits (the fallback path): its deviation counts samples
        evals = [[entry for entry in log_history(runs[p]) if "eval_deviation" in entry] for p in (False, True)]
        assert len(evals[0]) == len(evals[1]) == 2
        for want, got in zip(*evals):
            assert got["eval_deviation"] == pytest.approx(want["eval_deviation"], rel=1e-4, abs=1e-6)
            assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)
    if args.get("finetuning_type", "full") != "lora":
        assert_same_weights(runs[False], runs[True], rtol=1e-4, atol=1e-6)
