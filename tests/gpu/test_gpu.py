"""GPU checks of the head-free log-probs; skipped without CUDA.

Run them on a GPU machine with ``.venv/bin/python -m pytest tests/gpu``:
- the projected and fused log-probs on CUDA against a naive log-softmax, under bf16 autocast and with fp16 loss scales;
- a bf16-saved checkpoint trained with `bf16: true`, and `fp16: true` (accelerate's GradScaler), each against the same
  run in float32 (as ``tests/test_precision.py`` on the CPU);
- 1-GPU DeepSpeed ZeRO-3 in bf16 on the head-free path against no DeepSpeed; 2-GPU DDP where there are 2 GPUs;
- Liger's kernels with minorsft and with sft + track_deviation, against the same runs without;
- a tied head's gradient with pure bf16 weights and frequent tokens: stock's sum, deterministic;
- FlashAttention-2 with `neat_packing` (position ids, one row) against sdpa unpacked;
- the peak memory of a random-initialised model with Qwen2-0.5B's configuration at 2 x 2,048 tokens against stock sft
  (with and without Liger's kernels).
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import base_config, cli_env, deepspeed_env, run_cli, step_logs
from helpers import assert_same_training, batch_token_logps
from llamafactory_minorsft.losses import IGNORE_INDEX, fused_answer_loss, minorsft_loss, projected_token_logps


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[2]
HEAD_FREE = "Answer log-probs: head-free"
QWEN2_05B = dict(  # Qwen2-0.5B's config.json, random weights
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def stock_token_logps(hidden, weight, labels) -> torch.Tensor:
    """The models' own way: the head in autocast's dtype, the log-softmax in float32; 0 off the answers."""
    logprobs = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float(), -1)[:, :-1]
    picked = logprobs.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(labels[:, 1:] == IGNORE_INDEX, 0.0)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2.0**16])
@pytest.mark.parametrize("kept", [2**29, 0], ids=["kept", "recomputed"])
def test_fused_logps_on_cuda_are_as_accurate_as_stock_autocast(half, scale, kept, monkeypatch):
    """A float32 head under CUDA autocast, at Qwen2's vocabulary: values, and gradients at a loss scale."""
    from llamafactory_minorsft import losses

    monkeypatch.setattr(losses, "KEPT_BYTES", kept)
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 300, 64, device="cuda", generator=gen)
    weight = torch.randn(151936, 64, device="cuda", generator=gen) * 0.05
    labels = torch.randint(0, 151936, (2, 300), device="cuda", generator=gen)
    labels[:, :50] = IGNORE_INDEX
    truth_inputs = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    expected = batch_token_logps(truth_inputs[0], lambda h: h @ truth_inputs[1].t(), labels)[0]
    ref = expected.sum(-1).detach().float() - 5.0
    m = (labels[:, 1:] != IGNORE_INDEX).sum(-1)

    def loss_of(tokens):
        return minorsft_loss(tokens.sum(-1), ref, m, 0.04)[0].sum() / 2

    truth = torch.autograd.grad(loss_of(expected) * scale, truth_inputs)
    results = {}
    for name in ("stock", "fused"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=half):
            if name == "stock":
                tokens = stock_token_logps(h, w, labels)
                loss = loss_of(tokens)
            else:
                loss, tokens, _ = fused_answer_loss(h, w, labels, loss_of)
                assert torch.equal(projected_token_logps(h, w, labels)[0], tokens)  # the reference's own path
        results[name] = (tokens, torch.autograd.grad(loss * scale, [h, w]))
    torch.testing.assert_close(results["fused"][0].double(), results["stock"][0].double(), rtol=1e-4, atol=1e-4)
    for got, stock, want in zip(results["fused"][1], results["stock"][1], truth):
        assert torch.isfinite(got).all()
        assert relative_error(got, want) <= 1.5 * relative_error(stock, want) + 1e-6


LORA = dict(finetuning_type="lora", lora_target="all", lora_rank=4)
GPU_PRECISION_CASES = {
    "bf16-minorsft-lora-untied": (False, dict(bf16=True), dict(stage="minorsft", **LORA)),
    "bf16-minorsft-full-precomputed-tied": (True, dict(bf16=True), dict(stage="minorsft", precompute_ref_logps=True)),
    "bf16-sft_track-freeze-untied": (
        False,
        dict(bf16=True),
        dict(stage="sft", track_deviation=True, finetuning_type="freeze"),
    ),
    "fp16-minorsft-full-untied": (False, dict(fp16=True), dict(stage="minorsft")),
    "fp16-sft_go-lora-tied": (True, dict(fp16=True), dict(stage="sft_go", **LORA)),
}


def test_tied_gradient_on_cuda_is_stocks_sum_and_deterministic():
    """Pure bf16 weights, a tied head, frequent tokens: stock's sum, the same on every run.

    The embedding's rows of a token are summed in float32 by stock's kernel and added once (per-occurrence atomic
    adds in bf16 would round per row and vary from run to run).
    """
    from llamafactory_minorsft.train import head as head_module

    gen = torch.Generator().manual_seed(5)
    vocab, width = 151936, 896
    ids = torch.randint(0, 6, (4, 2048), generator=gen).cuda()  # each of 6 tokens about 1,400 times
    rows = torch.randn(4, 2048, width, generator=gen).cuda().bfloat16()
    head_grad = torch.randn(vocab, width, generator=gen).cuda().bfloat16()
    grads = []
    for name in ("stock", "tied", "tied"):
        weight = torch.zeros(vocab, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        tied = head_module._TiedGradient()
        if name == "stock":
            e, w = torch.nn.functional.embedding(ids, weight, 0), weight
        else:
            e = head_module._TiedEmbedding.apply(ids, weight, 0, tied)
            w = head_module._HeadSide.apply(weight, tied)
        ((e * rows).sum() + (w * head_grad).sum()).backward()
        grads.append(weight.grad)
    assert torch.equal(grads[1], grads[2])  # deterministic
    exact = head_grad.double().index_add(0, ids.flatten(), rows.flatten(0, 1).double())
    exact[0] = head_grad[0].double()  # the padding row: the head's alone
    assert relative_error(grads[1], exact) <= 1.01 * relative_error(grads[0], exact) + 1e-6


@pytest.mark.parametrize("case", list(GPU_PRECISION_CASES))
def test_half_precision_on_gpu_trains_as_float32(bf16_tiny, tmp_path, case):
    """bf16 (autocast) and fp16 (autocast + GradScaler, initial scale 2^16) on the GPU, each against float32."""
    tied, precision, options = GPU_PRECISION_CASES[case]
    paths = bf16_tiny[tied]
    tiny = SimpleNamespace(model=paths["model"], data=paths["data"])
    runs = {}
    for name, extra in (("half", precision), ("fp32", {})):
        out = tmp_path / name
        config = base_config(
            tiny,
            out,
            max_steps=2,
            learning_rate=0.5,
            ref_logps_cache_dir=str(tmp_path / f"cache_{name}"),
            **options,
            **extra,
        )
        assert HEAD_FREE in run_cli(config, tmp_path / f"{name}_run").stdout
        runs[name] = out
    assert all(torch.isfinite(torch.tensor(e["grad_norm"])) for e in step_logs(runs["half"]))
    assert_same_training(runs["half"], runs["fp32"], paths["model"])


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


def test_zero3_bf16_on_one_gpu_takes_the_head_free_path_and_matches_no_deepspeed(bf16_tiny, tmp_path):
    """The paper's set-up in small: a bf16 checkpoint, full tuning, DeepSpeed ZeRO-3, bf16."""
    paths = bf16_tiny[False]
    tiny = SimpleNamespace(model=paths["model"], data=paths["data"])
    common = dict(ref_model=paths["ref_model"], max_steps=2, learning_rate=0.5, bf16=True)
    assert HEAD_FREE in run_cli(base_config(tiny, tmp_path / "plain", **common), tmp_path / "plain_run").stdout
    ds = str(ROOT / "examples_yaml" / "deepspeed" / "ds_z3_config.json")
    env = deepspeed_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="1")
    proc = run_cli(base_config(tiny, tmp_path / "z3", deepspeed=ds, **common), tmp_path / "z3_run", env=env)
    assert HEAD_FREE in proc.stdout
    for a, b in zip(step_logs(tmp_path / "plain"), step_logs(tmp_path / "z3")):
        for key in ("loss", "deviation", "coef"):
            assert a[key] == pytest.approx(b[key], rel=3e-2, abs=2e-2), key


def test_two_gpu_ddp_find_unused_parameters_equals_one_gpu(bf16_tiny, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    paths = bf16_tiny[False]
    tiny = SimpleNamespace(model=paths["model"], data=paths["data"])
    common = dict(
        ref_model=paths["ref_model"],
        bf16=True,
        disable_gradient_checkpointing=True,
        ddp_find_unused_parameters=True,
        learning_rate=0.5,
    )
    run_cli(base_config(tiny, tmp_path / "one", **common), tmp_path / "one_run")
    env = cli_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2")
    run_cli(
        base_config(tiny, tmp_path / "two", per_device_train_batch_size=2, **common), tmp_path / "two_run", env=env
    )
    one, two = step_logs(tmp_path / "one")[0], step_logs(tmp_path / "two")[0]
    for key in ("loss", "deviation", "coef"):
        assert two[key] == pytest.approx(one[key], rel=1e-2, abs=1e-3), key


def test_flash_attention_2_neat_packing_equals_sdpa_unpacked(bf16_tiny, tmp_path):
    """FlashAttention-2 with `neat_packing` equals sdpa unpacked.

    FA2 packs one row per batch with position ids and no mask (LLaMA-Factory's collator trims the padding); the
    per-sample quantities follow this package's sample ids, so they equal sdpa's unpacked run.

    LLaMA-Factory #8919 (wrong ``cu_seqlens`` from a boolean mask) does not apply: for FA2 the collator drops the
    mask, and transformers derives the sequence boundaries from the position ids.
    """
    pytest.importorskip("flash_attn")
    paths = bf16_tiny[False]
    tiny = SimpleNamespace(model=paths["model"], data=paths["data"])
    common = dict(ref_model=paths["ref_model"], bf16=True, max_steps=2, learning_rate=0.5)
    run_cli(base_config(tiny, tmp_path / "sdpa", flash_attn="sdpa", **common), tmp_path / "sdpa_run")
    packed = base_config(
        tiny, tmp_path / "fa2", flash_attn="fa2", neat_packing=True, per_device_train_batch_size=1, **common
    )
    assert HEAD_FREE in run_cli(packed, tmp_path / "fa2_run").stdout
    for a, b in zip(step_logs(tmp_path / "sdpa"), step_logs(tmp_path / "fa2")):
        for key in ("loss", "deviation", "coef", "logps/policy"):
            assert b[key] == pytest.approx(a[key], rel=3e-2, abs=2e-2), key


@pytest.mark.parametrize("stage", ["minorsft", "sft_track"])
def test_liger_kernels_with_the_stages_train_as_without(bf16_tiny, tmp_path, stage):
    pytest.importorskip("liger_kernel")
    paths = bf16_tiny[False]
    tiny = SimpleNamespace(model=paths["model"], data=paths["data"])
    options = dict(stage="sft", track_deviation=True) if stage == "sft_track" else dict(stage="minorsft")
    for liger in (True, False):
        config = base_config(
            tiny,
            tmp_path / f"liger_{liger}",
            bf16=True,
            max_steps=2,
            learning_rate=0.5,
            enable_liger_kernel=liger,
            **options,
        )
        output = run_cli(config, tmp_path / f"run_{liger}").stdout
        assert HEAD_FREE in output and (not liger or "Liger kernel has been applied" in output)
    assert_same_training(tmp_path / "liger_True", tmp_path / "liger_False", paths["model"])


@pytest.mark.parametrize("liger", [False, True], ids=["plain", "liger"])
def test_qwen2_05b_config_peak_memory_against_stock_sft(tmp_path, liger):
    if liger:
        pytest.importorskip("liger_kernel")
    bench = ROOT / "benchmarks" / "bench_reference.py"
    from llamafactory_minorsft.tools.tiny import build_tiny_setup

    paths = build_tiny_setup(str(tmp_path / "model"), seed=0, num_samples=64, dtype="bfloat16", **QWEN2_05B)
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
    # with Liger, stock sft's fused linear cross-entropy builds no logits either: no advantage is claimed there
    assert peaks["minorsft"] <= peaks["sft"] * (1.05 if liger else 0.85), peaks
