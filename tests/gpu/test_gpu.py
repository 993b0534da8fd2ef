"""GPU checks of the head-free log-probs; skipped without CUDA.

Run them on a GPU machine with ``.venv/bin/python -m pytest tests/gpu``: bf16 with sdpa, the chunked and fused
log-probs against a naive log-softmax on CUDA, 1-GPU DeepSpeed ZeRO-3, and the peak memory of a random-initialised
model with Qwen2-0.5B's configuration at 2 x 2,048 tokens against stock sft (with and without Liger's kernels).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import base_config, cli_env, deepspeed_env, run_cli, step_logs
from helpers import batch_token_logps
from llamafactory_minorsft.losses import IGNORE_INDEX, fused_answer_loss, minorsft_loss, projected_token_logps


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[2]
QWEN2_05B = dict(  # Qwen2-0.5B's config.json, random weights
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_chunked_and_fused_logps_match_a_naive_log_softmax_on_cuda(dtype, tolerance):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 300, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    head = torch.nn.Linear(64, 151936, bias=False, device="cuda", dtype=dtype)
    labels = torch.randint(0, 151936, (2, 300), device="cuda", generator=gen)
    labels[:, :50] = IGNORE_INDEX
    expected = batch_token_logps(hidden, head, labels)[0]
    token_logps, _ = projected_token_logps(hidden, head, labels)
    torch.testing.assert_close(token_logps.double(), expected, rtol=tolerance, atol=tolerance)

    ref = expected.sum(-1).detach().float() - 5.0
    m = (labels[:, 1:] != IGNORE_INDEX).sum(-1)

    def loss_of(logps):
        return minorsft_loss(logps, ref, m, 0.04)[0].sum() / 2

    want = torch.autograd.grad(loss_of(expected.sum(-1).float()), [hidden, head.weight])
    loss, _, _ = fused_answer_loss(hidden, head.weight, labels, lambda tokens: loss_of(tokens.sum(-1)))
    got = torch.autograd.grad(loss, [hidden, head.weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=tolerance, atol=tolerance)


def test_bf16_sdpa_lora_minorsft_starts_at_zero_deviation(tiny, tmp_path):
    out = tmp_path / "out"
    config = base_config(
        tiny,
        out,
        finetuning_type="lora",
        lora_target="all",
        bf16=True,
        flash_attn="sdpa",
        optim="adamw_torch",
        learning_rate=1e-3,
        max_steps=4,
        dataset="minorsft_demo",
    )
    run_cli(config, tmp_path)
    logs = step_logs(out)
    assert logs[0]["deviation"] == 0 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


def test_zero3_on_one_gpu_matches_no_deepspeed(tiny, tmp_path):
    common = dict(ref_model=tiny.ref_model, max_steps=2, optim="adamw_torch", learning_rate=1e-3)
    run_cli(base_config(tiny, tmp_path / "plain", **common), tmp_path / "plain_run")
    ds = str(ROOT / "examples_yaml" / "deepspeed" / "ds_z3_config.json")
    env = deepspeed_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="1")
    run_cli(base_config(tiny, tmp_path / "z3", deepspeed=ds, **common), tmp_path / "z3_run", env=env)
    for a, b in zip(step_logs(tmp_path / "plain"), step_logs(tmp_path / "z3")):
        for key in ("loss", "deviation", "coef"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("liger", [False, True], ids=["plain", "liger"])
def test_qwen2_05b_config_peak_memory_against_stock_sft(tmp_path, liger):
    if liger:
        pytest.importorskip("liger_kernel")
    bench = ROOT / "benchmarks" / "bench_reference.py"
    from llamafactory_minorsft.tools.tiny import build_tiny_setup

    paths = build_tiny_setup(str(tmp_path / "model"), seed=0, num_samples=64, **QWEN2_05B)
    sys.path.insert(0, str(bench.parent))
    import bench_reference

    bench_reference.make_data(paths["data"], 8, pieces_per_answer=220)
    peaks = {}
    for stage in ("sft", "minorsft"):
        config = dict(
            model_name_or_path=paths["model"],
            stage=stage,
            do_train=True,
            finetuning_type="full",
            dataset="bench",
            dataset_dir=paths["data"],
            template="qwen",
            cutoff_len=2048,
            bf16=True,
            per_device_train_batch_size=2,
            max_steps=2,
            output_dir=str(tmp_path / stage),
            overwrite_output_dir=True,
            save_strategy="no",
            report_to="none",
            pref_beta=0.04,
            enable_liger_kernel=liger,
            precompute_ref_logps=stage == "minorsft",
            ref_logps_cache_dir=str(tmp_path / "cache"),
        )
        config_path, result_path = tmp_path / f"{stage}.json", tmp_path / f"{stage}.result.json"
        config_path.write_text(json.dumps(config))
        subprocess.run(
            [sys.executable, str(bench), "--worker", str(config_path), str(result_path)], check=True, env=cli_env()
        )
        peaks[stage] = json.loads(result_path.read_text())["peak_cuda_mb"]
    print(f"peak CUDA MB (liger={liger}): {peaks}")
    assert peaks["minorsft"] <= peaks["sft"] * (1.0 if liger else 0.85), peaks
