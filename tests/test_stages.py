"""End-to-end runs of the stages through the stock ``llamafactory-cli`` on the tiny model."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CLI, base_config, cli_env, log_history, run_cli, step_logs
from helpers import assert_same_weights, weights
from llamafactory_minorsft.tools.tiny import make_instruction_data, write_dataset
from llamafactory_minorsft.train.metrics import COEF_METRICS, DEVIATION_METRICS


METRICS = (*DEVIATION_METRICS, *COEF_METRICS)


ACCUMULATION_CASES = {
    "minorsft": dict(stage="minorsft"),
    "sft_dpo": dict(stage="sft_dpo"),
    "sft_sample": dict(stage="sft", sft_loss_reduction="sample", track_deviation=True),  # Eq. 5
}


@pytest.mark.compat
@pytest.mark.parametrize("case", list(ACCUMULATION_CASES))
def test_gradient_accumulation_gives_the_big_batch_update(tiny, tmp_path, case):
    stage_args = ACCUMULATION_CASES[case]
    big = base_config(tiny, tmp_path / "big", ref_model=tiny.ref_model, **stage_args)
    small = base_config(
        tiny,
        tmp_path / "small",
        ref_model=tiny.ref_model,
        **stage_args,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
    )
    run_cli(big, tmp_path / "big_run")
    run_cli(small, tmp_path / "small_run")
    # float32 sums in another order (4 backward passes vs 1): measured up to 1.6e-7 apart on transformers 5.8
    # (one embedding element of 32,768); a wrong normalisation moves weights by 1e-2 or more
    assert_same_weights(tmp_path / "big", tmp_path / "small", atol=1e-6)
    logged_big, logged_small = step_logs(tmp_path / "big")[0], step_logs(tmp_path / "small")[0]
    for key in ("loss",) + tuple(key for key in METRICS if key in logged_big or case != "sft_sample"):
        assert logged_small[key] == pytest.approx(logged_big[key], rel=1e-5, abs=1e-6), key


def test_lora_uses_the_adapter_disabled_base_as_reference(tiny, tmp_path):
    out = tmp_path / "out"
    config = base_config(
        tiny,
        out,
        finetuning_type="lora",
        lora_rank=8,
        lora_target="all",
        optim="adamw_torch",
        learning_rate=5e-2,
        max_steps=4,
        dataset="minorsft_demo",
        save_strategy="steps",
        save_steps=4,
    )
    run_cli(config, tmp_path)
    logs = step_logs(out)
    # LoRA's B starts at zero: at step 1 the policy IS the base model, so the ratio is exactly 0 …
    assert logs[0]["deviation"] == 0 and logs[0]["logps/policy"] == logs[0]["logps/ref"] and logs[0]["coef"] == 1
    # … and once the adapters moved, the reference (adapters disabled) no longer equals the policy
    assert abs(logs[-1]["deviation"]) > 1e-3
    assert logs[0]["coef_std"] == 0 and logs[-1]["coef_std"] > 0  # every sample weighted alike, then not
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-4").is_dir()
    assert all(math.isfinite(entry[key]) for entry in logs for key in ("loss",) + METRICS)


@pytest.mark.compat
def test_sft_track_deviation_keeps_the_stock_loss(tiny, tmp_path):
    """Tracking takes the stock token mean from the fused head: equal to stock SFT up to float32 rounding.

    With accumulation, so the Trainer's token count (``num_items_in_batch``) is what the loss divides by.
    """
    common = dict(
        stage="sft",
        learning_rate=0.5,  # plain SGD (``base_config``): an update linear in the gradient, so rounding stays rounding
        max_steps=3,
        dataset="minorsft_demo",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    run_cli(base_config(tiny, tmp_path / "stock", **common), tmp_path / "stock_run")
    run_cli(base_config(tiny, tmp_path / "tracked", track_deviation=True, plot_loss=True, **common), tmp_path / "t")
    # `sft_loss_reduction: token` is the stock reduction, spelled out
    run_cli(base_config(tiny, tmp_path / "token", sft_loss_reduction="token", **common), tmp_path / "token_run")
    stock, tracked = step_logs(tmp_path / "stock"), step_logs(tmp_path / "tracked")
    assert len(tracked) == 3 and [e["loss"] for e in tracked] == pytest.approx([e["loss"] for e in stock], rel=1e-5)
    assert [e["loss"] for e in step_logs(tmp_path / "token")] == [e["loss"] for e in stock]
    assert "deviation" not in stock[0] and "coef" not in tracked[0]
    assert tracked[0]["deviation"] == 0  # the reference is the initial model
    assert tracked[-1]["deviation"] > 0  # SFT raises the answers' likelihood above the reference's
    assert (tmp_path / "tracked" / "training_deviation.png").stat().st_size > 0
    assert_same_weights(tmp_path / "stock", tmp_path / "tracked", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("option", ["use_dft_loss", "use_eaft_loss"])
def test_sft_track_deviation_keeps_llamafactory_loss_functions(tiny, tmp_path, option):
    """LLaMA-Factory's DFT and EAFT losses are not the token mean the fused head reproduces: tracking keeps them."""
    from llamafactory.extras.env import VERSION

    if VERSION == "0.9.4" and option != "use_dft_loss":
        pytest.skip(f"LLaMA-Factory 0.9.4 has no {option}")
    common = dict(stage="sft", max_steps=2, dataset="minorsft_demo", **{option: True})
    run_cli(base_config(tiny, tmp_path / "stock", **common), tmp_path / "stock_run")
    proc = run_cli(base_config(tiny, tmp_path / "tracked", track_deviation=True, **common), tmp_path / "tracked_run")
    assert "Answer log-probs: from the full logits, because the stock loss is not the plain token-mean" in proc.stdout
    stock, tracked = step_logs(tmp_path / "stock"), step_logs(tmp_path / "tracked")
    assert [e["loss"] for e in tracked] == [e["loss"] for e in stock]  # bit-identical: the stock forward and loss
    assert tracked[0]["deviation"] == 0 and tracked[-1]["deviation"] != 0
    assert_same_weights(tmp_path / "stock", tmp_path / "tracked", rtol=0, atol=0)


@pytest.mark.parametrize("eval_sets", ["one", "each", "none"])
def test_plots_are_stock_sft_s_and_the_deviation(tiny, tmp_path, eval_sets):
    """`plot_loss`: the figures stock sft draws (accuracy, one per eval set), and the deviation's next to them."""
    config = dict(max_steps=2, plot_loss=True, compute_accuracy=True)
    if eval_sets != "none":
        config.update(do_eval=True, eval_strategy="steps", eval_steps=1, eval_dataset="minorsft_demo_eval")
    if eval_sets == "each":
        config.update(eval_dataset="four,minorsft_demo_eval", eval_on_each_dataset=True)
    figures, logs = {}, {}
    for name, stage in (("stock", dict(stage="sft")), ("tracked", dict(stage="sft", track_deviation=True))):
        proc = run_cli(base_config(tiny, tmp_path / name, **stage, **config), tmp_path / f"{name}_run")
        figures[name] = {path.name for path in (tmp_path / name).glob("*.png")}
        logs[name] = proc.stdout + proc.stderr
    sets = {"one": [""], "each": ["four_", "minorsft_demo_eval_"], "none": []}[eval_sets]
    assert all(f"training_eval_{name}accuracy.png" in figures["stock"] for name in sets)
    deviation = {"training_deviation.png", *(f"training_eval_{name}deviation.png" for name in sets)}
    assert figures["tracked"] == figures["stock"] | deviation, figures
    # stock sft warns that it has no eval figure to draw without an eval set; these stages draw none
    assert ("No metric eval_loss to plot" in logs["stock"]) == (eval_sets == "none")
    assert "No metric eval_" not in logs["tracked"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_minorsft_outputs_match_the_sft_workflow_and_eval_metrics(tiny, tmp_path):
    out = tmp_path / "out"
    config = base_config(
        tiny,
        out,
        optim="adamw_torch",
        learning_rate=1e-2,
        max_steps=4,
        dataset="minorsft_demo",
        eval_dataset="minorsft_demo_eval",
        do_eval=True,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
        save_strategy="steps",
        save_steps=2,
        plot_loss=True,
    )
    run_cli(config, tmp_path)
    for name in (
        "trainer_state.json",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "README.md",
        "model.safetensors",
        "training_loss.png",
        "training_deviation.png",
        "checkpoint-2",
        "checkpoint-4",
    ):
        assert (out / name).exists(), name
    evals = [entry for entry in log_history(out) if "eval_loss" in entry]
    assert len(evals) >= 2
    for key in METRICS:
        assert all(math.isfinite(entry[f"eval_{key}"]) for entry in evals), key
    assert evals[0]["eval_deviation"] != 0  # two steps in, the policy has moved
    assert [e["current_steps"] for e in read_jsonl(out / "trainer_deviation.jsonl") if "eval_deviation" in e] == [
        2,
        4,
        4,
    ]

    # evaluated alone into the same folder: its deviation log starts anew, as trainer_log.jsonl does
    evaluate = dict(config, do_train=False, eval_dataset="four,minorsft_demo_eval", eval_on_each_dataset=True)
    run_cli(evaluate, tmp_path / "evaluate")
    entries = read_jsonl(out / "trainer_deviation.jsonl")  # one per eval set
    assert [e["current_steps"] for e in entries] == [0, 0]
    assert {key for e in entries for key in e} == {
        "current_steps",
        "eval_four_deviation",
        "eval_minorsft_demo_eval_deviation",
    }


def test_zero_answer_tokens_after_truncation_give_no_nan(tiny, tmp_path):
    normal = make_instruction_data(2, seed=11)
    long_prompt = [{"instruction": " ".join(["river planet garden"] * 60), "input": "", "output": "ok"}] * 2
    write_dataset(tiny.data, "truncated", normal + long_prompt)
    for stage in ("minorsft", "sft_dpo", "sft_go"):
        out = tmp_path / stage
        go = dict(sft_go_grouping="rho1", sft_go_lambda=1.0) if stage == "sft_go" else {}
        run_cli(
            base_config(
                tiny,
                out,
                stage=stage,
                dataset="truncated",
                cutoff_len=24,
                max_steps=2,
                optim="adamw_torch",
                learning_rate=1e-3,
                ref_model=tiny.ref_model,
                **go,
            ),
            tmp_path / f"{stage}_run",
        )
        keys = ("group_loss/important", "deviation") if stage == "sft_go" else METRICS
        for entry in step_logs(out):
            assert all(math.isfinite(entry[key]) for key in ("loss", "grad_norm") + keys), entry
        assert all(torch.isfinite(w).all() for w in weights(out).values())


def train_until_killed(config: dict, workdir: Path, checkpoint: Path) -> str:
    """Start training and SIGKILL its whole process group as soon as ``checkpoint`` is complete; returns stderr.

    ``trainer_state.json`` is the last file the Trainer writes into a checkpoint, so once it parses, the
    checkpoint is whole; the kill then lands mid-training, like a crash or a pre-empted node.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    with open(workdir / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [CLI, "train", str(workdir / "config.yaml")],
            cwd=workdir,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                json.loads((checkpoint / "trainer_state.json").read_text())
                os.killpg(proc.pid, signal.SIGKILL)
                break
            except (OSError, ValueError):
                time.sleep(0.02)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more steps"
    return (workdir / "stderr.txt").read_text()


@pytest.mark.parametrize("precompute", [False, True], ids=["online", "precompute_ref_logps"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny, tmp_path, precompute):
    """A run killed after checkpoint-2 and resumed equals an uninterrupted run.

    SIGKILL after checkpoint-2, resume from it, finish: the same losses, metrics and final weights as a run
    that was never interrupted, and the reference is still the original model.

    Tolerance: both runs execute the same float32 operations in the same order on one CPU process (the resumed
    run restores weights, optimizer, scheduler, RNG and data position exactly), so they agree to float32
    round-off; we allow rel 1e-5. Measured here: identical.
    """
    cache = tmp_path / "cache"
    common = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        max_steps=40,
        dataset="minorsft_demo",
        save_strategy="steps",
        save_steps=2,
        save_only_model=False,
        per_device_train_batch_size=2,
        precompute_ref_logps=precompute or None,
        ref_logps_cache_dir=str(cache),
    )
    full_run = run_cli(base_config(tiny, tmp_path / "full", **common), tmp_path / "full_run")
    assert ("Reference log-probs" in full_run.stderr) == precompute  # the pass runs and fills the cache

    crashed = tmp_path / "resumed"
    stderr = train_until_killed(base_config(tiny, crashed, **common), tmp_path / "crash_run", crashed / "checkpoint-2")
    assert not (crashed / "model.safetensors").exists()  # it really died mid-training
    if precompute:
        assert "Reference log-probs" not in stderr  # the cache of the first run was reused
        (cache_file,) = cache.glob("*.pt")
        cache_file.write_bytes(cache_file.read_bytes()[: cache_file.stat().st_size // 2])  # a partial file

    resumed_run = run_cli(
        base_config(
            tiny, crashed, **common, overwrite_output_dir=None, resume_from_checkpoint=str(crashed / "checkpoint-2")
        ),
        tmp_path / "resume_run",
    )
    assert ("Reference log-probs" in resumed_run.stderr) == precompute  # the partial cache was detected and rebuilt

    full = {entry["step"]: entry for entry in step_logs(tmp_path / "full")}
    resumed = {entry["step"]: entry for entry in step_logs(crashed)}
    assert full[3]["deviation"] > 1e-3  # had the checkpoint become the reference, this would restart near 0
    assert set(range(3, 41)) <= resumed.keys()
    for step in range(3, 41):
        for key in ("loss",) + METRICS:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert_same_weights(tmp_path / "full", crashed)


@pytest.mark.parametrize("stage", ["minorsft", "sft_go"])
def test_bf16_policy_trains_with_finite_float32_metrics(tiny, tmp_path, stage):
    """bf16 weights and autocast (CPU here): log-prob sums are accumulated in float32, nothing becomes NaN/inf."""
    extra = dict(sft_go_grouping="tfidf", sft_go_lambda=1.0, track_deviation=True) if stage == "sft_go" else {}
    out = tmp_path / "out"
    run_cli(
        base_config(
            tiny,
            out,
            stage=stage,
            bf16=True,
            use_cpu=True,
            dataset="minorsft_demo",
            cutoff_len=128,
            max_steps=3,
            optim="adamw_torch",
            learning_rate=1e-3,
            **extra,
        ),
        tmp_path,
    )
    logs = step_logs(out)
    assert len(logs) == 3 and all(math.isfinite(v) for entry in logs for v in entry.values() if isinstance(v, float))
    assert logs[0]["deviation"] == 0.0 and logs[-1]["deviation"] != 0.0  # policy = reference at the first step


LIGER_PROBE = """
import json, sys
import transformers.models.qwen2.modeling_qwen2 as qwen2
from llamafactory.hparams import get_train_args
from llamafactory.model import load_model, load_tokenizer
from llamafactory_minorsft.train.workflow import load_policy

stock_forward = qwen2.Qwen2ForCausalLM.forward
model_args, _, _, finetuning_args, _ = get_train_args(json.loads(sys.argv[1]))
load = load_policy if sys.argv[2] == "policy" else load_model
model = load(load_tokenizer(model_args)["tokenizer"], model_args, finetuning_args, True)
print(json.dumps({"stock_forward": type(model).forward is stock_forward, "norm": type(model.model.norm).__name__}))
"""


@pytest.mark.compat
@pytest.mark.parametrize("stage", ["sft_track", "minorsft"])
def test_liger_gives_the_stages_its_kernels_without_its_fused_loss(tiny, tmp_path, stage):
    """`enable_liger_kernel`: Liger's kernels, but the model keeps its forward, which returns logits.

    LLaMA-Factory's own ``load_model`` gives `stage: sft` Liger's fused linear cross-entropy (a forward that returns
    no logits); this package's sft runs load as its other stages do. Liger's kernels need a GPU, so this checks
    the loading only (``tests/gpu`` trains with them).
    """
    pytest.importorskip("liger_kernel")
    options = dict(stage="sft", track_deviation=True) if stage == "sft_track" else dict(stage="minorsft")
    config = json.dumps(base_config(tiny, tmp_path / "out", enable_liger_kernel=True, **options))
    loaded = {}
    for loader in ("policy", "stock"):
        proc = subprocess.run(
            [sys.executable, "-c", LIGER_PROBE, config, loader], env=cli_env(), capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded[loader] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["policy"] == {"stock_forward": True, "norm": "LigerRMSNorm"}
    # LLaMA-Factory's stock loading: the fused loss for `stage: sft`, none for the other stages
    assert loaded["stock"] == {"stock_forward": stage != "sft_track", "norm": "LigerRMSNorm"}


def test_track_deviation_without_a_stage_key_is_tracked_sft(tiny, tmp_path):
    """LLaMA-Factory's default stage is sft: `track_deviation: true` alone must not train untracked stock sft."""
    out = tmp_path / "out"
    run_cli(base_config(tiny, out, stage=None, track_deviation=True), tmp_path)
    assert "deviation" in step_logs(out)[0]
