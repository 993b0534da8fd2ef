"""Real checkpoints, real precision: bf16-saved models trained with `bf16: true`, against the same run in float32.

Every released Qwen2 is stored in bf16. LLaMA-Factory loads such a checkpoint in bf16 and upcasts only the trainable
parameters, and `bf16: true` (with `use_cpu: true` here) runs the forward under accelerate's autocast, whose outputs
come back in float32: a frozen head (LoRA, freeze, the reference copy) stays bf16 while the hidden states do not.
Each case trains the same bf16 weights twice through the CLI, once with `bf16: true` and once in float32, and
checks that both log the same steps and make the same update, within bf16's precision.
"""

from types import SimpleNamespace

import pytest

from conftest import base_config, run_cli, step_logs
from helpers import assert_same_training


LORA = dict(finetuning_type="lora", lora_target="all", lora_rank=4)
# name → (tied head?, stage options); "REF" is the fixture's reference model
CASES = {
    "minorsft-lora-untied": (False, dict(stage="minorsft", **LORA)),
    "minorsft-freeze-tied": (True, dict(stage="minorsft", finetuning_type="freeze")),
    "minorsft-full-precomputed-untied": (False, dict(stage="minorsft", precompute_ref_logps=True)),
    "minorsft-full-ref_model-tied": (True, dict(stage="minorsft", ref_model="REF")),
    "sft_dpo-full-untied": (False, dict(stage="sft_dpo")),
    "sft_dpo-lora-precomputed-tied": (True, dict(stage="sft_dpo", precompute_ref_logps=True, **LORA)),
    "sft_sample-freeze-untied": (False, dict(stage="sft", sft_loss_reduction="sample", finetuning_type="freeze")),
    "sft_track-lora-untied": (False, dict(stage="sft", track_deviation=True, **LORA)),
    "sft_track-full-precomputed-tied": (True, dict(stage="sft", track_deviation=True, precompute_ref_logps=True)),
    "sft_go-lora-untied": (False, dict(stage="sft_go", **LORA)),
    "sft_go-rho1-full-precomputed-tied": (
        True,
        dict(stage="sft_go", sft_go_grouping="rho1", ref_model="REF", precompute_ref_logps=True),
    ),
}
COMPAT = ("minorsft-lora-untied", "minorsft-freeze-tied", "sft_track-full-precomputed-tied", "sft_go-lora-untied")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.compat) if c in COMPAT else c for c in CASES])
def test_bf16_checkpoint_with_bf16_true_trains_as_float32(bf16_tiny, tmp_path, case):
    tied, options = CASES[case]
    paths = bf16_tiny[tied]
    options = {key: paths["ref_model"] if value == "REF" else value for key, value in options.items()}
    tiny = SimpleNamespace(model=paths["model"], data=paths["data"])
    runs = {}
    for precision, extra in (("bf16", dict(bf16=True)), ("fp32", {})):
        out = tmp_path / precision
        config = base_config(
            tiny,
            out,
            use_cpu=True,
            max_steps=2,
            learning_rate=0.5,
            ref_logps_cache_dir=str(tmp_path / f"cache_{precision}"),
            **options,
            **extra,
        )
        proc = run_cli(config, tmp_path / f"{precision}_run")
        assert "Answer log-probs: head-free" in proc.stdout + proc.stderr  # every case here takes that path
        runs[precision] = out

    cosine, ratio = assert_same_training(runs["bf16"], runs["fp32"], paths["model"])
    print(f"{case}: update cosine {cosine:.5f}, norm ratio {ratio:.4f}")
    if options.get("finetuning_type") == "lora" and not options.get("precompute_ref_logps"):
        if "deviation" in step_logs(runs["bf16"])[0]:  # LoRA's B starts at 0: the reference is the policy
            assert step_logs(runs["bf16"])[0]["deviation"] == 0
