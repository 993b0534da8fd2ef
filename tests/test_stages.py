"""End-to-end runs of the stages through the stock ``llamafactory-cli`` on the tiny model."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import base_config, log_history, run_cli, step_logs
from llamafactory_minorsft.tiny import make_instruction_data, write_dataset


METRICS = ("deviation", "rewards", "coef", "logps/policy", "logps/ref")


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).named_parameters()}


def assert_same_weights(a, b, rtol=1e-5, atol=1e-7):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("stage", ["minorsft", "sft_dpo"])
def test_gradient_accumulation_gives_the_big_batch_update(tiny, tmp_path, stage):
    big = base_config(tiny, tmp_path / "big", stage=stage, ref_model=tiny.ref_model)
    small = base_config(tiny, tmp_path / "small", stage=stage, ref_model=tiny.ref_model,
                        per_device_train_batch_size=1, gradient_accumulation_steps=4)  # fmt: skip
    run_cli(big, tmp_path / "big_run")
    run_cli(small, tmp_path / "small_run")
    assert_same_weights(tmp_path / "big", tmp_path / "small")
    logged_big, logged_small = step_logs(tmp_path / "big")[0], step_logs(tmp_path / "small")[0]
    for key in ("loss",) + METRICS:
        assert logged_small[key] == pytest.approx(logged_big[key], rel=1e-5, abs=1e-6), key


def test_lora_uses_the_adapter_disabled_base_as_reference(tiny, tmp_path):
    out = tmp_path / "out"
    config = base_config(tiny, out, finetuning_type="lora", lora_rank=8, lora_target="all", optim="adamw_torch",
                         learning_rate=5e-2, max_steps=4, dataset="minorsft_demo", save_strategy="steps",
                         save_steps=4)  # fmt: skip
    run_cli(config, tmp_path)
    logs = step_logs(out)
    # LoRA's B starts at zero: at step 1 the policy IS the base model, so the ratio is exactly 0 …
    assert logs[0]["deviation"] == 0 and logs[0]["logps/policy"] == logs[0]["logps/ref"] and logs[0]["coef"] == 1
    # … and once the adapters moved, the reference (adapters disabled) no longer equals the policy
    assert abs(logs[-1]["deviation"]) > 1e-3
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-4").is_dir()
    assert all(math.isfinite(entry[key]) for entry in logs for key in ("loss",) + METRICS)


def test_sft_track_deviation_keeps_the_stock_loss(tiny, tmp_path):
    common = dict(stage="sft", optim="adamw_torch", learning_rate=1e-2, max_steps=3, dataset="minorsft_demo")
    run_cli(base_config(tiny, tmp_path / "stock", **common), tmp_path / "stock_run")
    run_cli(base_config(tiny, tmp_path / "tracked", track_deviation=True, plot_loss=True, **common), tmp_path / "t")
    stock, tracked = step_logs(tmp_path / "stock"), step_logs(tmp_path / "tracked")
    assert [e["loss"] for e in tracked] == [e["loss"] for e in stock]  # bit-identical: same loss, same updates
    assert "deviation" not in stock[0] and "coef" not in tracked[0]
    assert tracked[0]["deviation"] == 0  # the reference is the initial model
    assert tracked[-1]["deviation"] > 0  # SFT raises the answers' likelihood above the reference's
    assert (tmp_path / "tracked" / "training_deviation.png").stat().st_size > 0
    assert_same_weights(tmp_path / "stock", tmp_path / "tracked", rtol=0, atol=0)


def test_minorsft_outputs_match_the_sft_workflow_and_eval_metrics(tiny, tmp_path):
    out = tmp_path / "out"
    config = base_config(tiny, out, optim="adamw_torch", learning_rate=1e-2, max_steps=4, dataset="minorsft_demo",
                         eval_dataset="minorsft_demo_eval", do_eval=True, eval_strategy="steps", eval_steps=2,
                         per_device_eval_batch_size=8, save_strategy="steps", save_steps=2, plot_loss=True)  # fmt: skip
    run_cli(config, tmp_path)
    for name in ("trainer_state.json", "all_results.json", "train_results.json", "eval_results.json", "README.md",
                 "model.safetensors", "training_loss.png", "training_deviation.png", "checkpoint-2", "checkpoint-4"):  # fmt: skip
        assert (out / name).exists(), name
    evals = [entry for entry in log_history(out) if "eval_loss" in entry]
    assert len(evals) >= 2
    for key in METRICS:
        assert all(math.isfinite(entry[f"eval_{key}"]) for entry in evals), key
    assert evals[0]["eval_deviation"] != 0  # two steps in, the policy has moved


def test_zero_answer_tokens_after_truncation_give_no_nan(tiny, tmp_path):
    normal = make_instruction_data(2, seed=11)
    long_prompt = [{"instruction": " ".join(["river planet garden"] * 60), "input": "", "output": "ok"}] * 2
    write_dataset(tiny.data, "truncated", normal + long_prompt)
    for stage in ("minorsft", "sft_dpo"):
        out = tmp_path / stage
        run_cli(base_config(tiny, out, stage=stage, dataset="truncated", cutoff_len=24, max_steps=2,
                            optim="adamw_torch", learning_rate=1e-3, ref_model=tiny.ref_model), tmp_path / f"{stage}_run")  # fmt: skip
        for entry in step_logs(out):
            assert all(math.isfinite(entry[key]) for key in ("loss", "grad_norm") + METRICS), entry
        assert all(torch.isfinite(w).all() for w in weights(out).values())


def test_stock_sft_and_dpo_still_train(tiny, tmp_path):
    run_cli(base_config(tiny, tmp_path / "sft", stage="sft", max_steps=2, optim="adamw_torch", learning_rate=1e-3),
            tmp_path / "sft_run")  # fmt: skip
    run_cli(base_config(tiny, tmp_path / "dpo", stage="dpo", dataset="pairs", max_steps=2, optim="adamw_torch",
                        learning_rate=1e-3, per_device_train_batch_size=2), tmp_path / "dpo_run")  # fmt: skip
    assert "loss" in step_logs(tmp_path / "sft")[0]
    assert "rewards/chosen" in step_logs(tmp_path / "dpo")[0]


@pytest.mark.parametrize("precompute", [False, True], ids=["online", "precompute_ref_logps"])
def test_resume_from_checkpoint_keeps_the_original_reference(tiny, tmp_path, precompute):
    common = dict(optim="adamw_torch", learning_rate=1e-2, max_steps=4, dataset="minorsft_demo", save_strategy="steps",
                  save_steps=2, save_only_model=False, per_device_train_batch_size=2,
                  precompute_ref_logps=precompute or None, ref_logps_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    run_cli(base_config(tiny, tmp_path / "full", **common), tmp_path / "full_run")
    # a second run that stops after the checkpoint at step 2, then resumes from it
    run_cli(base_config(tiny, tmp_path / "resumed", **{**common, "max_steps": 2}), tmp_path / "first_half")
    run_cli(base_config(tiny, tmp_path / "resumed", **common, overwrite_output_dir=None,
                        resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2")), tmp_path / "second_half")  # fmt: skip
    full = {entry["step"]: entry for entry in step_logs(tmp_path / "full")}
    resumed = {entry["step"]: entry for entry in step_logs(tmp_path / "resumed")}
    assert full[3]["deviation"] > 1e-3  # had the checkpoint become the reference, this would restart near 0
    for step in (3, 4):
        for key in ("loss",) + METRICS:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
