"""Test helpers written independently of the package.

Test helpers written independently of the package: the float64 log-prob oracle, the exact-SGD-step assertion
and weight comparisons. Test modules import these, never each other.
"""

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def encode(model_dir: str, samples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per sample with the qwen template, as LLaMA-Factory formats one turn."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="qwen"))
    return [
        template.encode_oneturn(
            tokenizer, [{"role": "user", "content": s["instruction"]}, {"role": "assistant", "content": s["output"]}]
        )
        for s in samples
    ]


def step_inputs(tiny):
    """The `four` samples encoded, and fresh float32 copies of the tiny policy and reference."""
    encoded = encode(tiny.model, json.loads(Path(tiny.data, "four.json").read_text()))
    policy = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny.ref_model, dtype=torch.float32)
    return encoded, policy, ref


def answer_token_logps(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Log π of each answer token, from one sample's own forward pass, log-softmax in float64."""
    ids = torch.tensor([prompt + answer])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(targets.numel()), targets][len(prompt) - 1 :]  # the positions predicting the answer


def batch_token_logps(hidden, head, labels, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π of each answer token, answer mask) of a batch, from its full logits.

    log_softmax of every position in float64, picked at the next label; 0 off the answer.
    """
    logprobs = torch.log_softmax(head(hidden).double(), -1)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != ignore_index
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)), mask


def weights(path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: value.detach() for name, value in model.named_parameters()}


def assert_same_weights(a, b, rtol=1e-5, atol=1e-7) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol, msg=name)


def assert_sgd_step(
    output_dir, theta0: dict[str, torch.Tensor], descent: dict[str, torch.Tensor], atol_of: Optional[dict] = None
) -> None:
    """The saved model is θ0 moved by exactly ``descent`` = −∇L (one plain-SGD step with lr 1).

    The absolute tolerance is 1e-6 of the largest expected update, or ``atol_of[name]`` of it for a parameter whose
    gradient sums more float32 terms.
    """
    trained = weights(output_dir)
    biggest = max(d.abs().max().item() for d in descent.values())
    assert biggest > 1e-4, "the expected update is trivially small; the test would prove nothing"
    for name, theta in theta0.items():
        update = trained[name].double() - theta
        atol = (atol_of or {}).get(name, 1e-6) * biggest
        torch.testing.assert_close(
            update, descent[name], rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def saved_update(output_dir, initial_model) -> torch.Tensor:
    """The saved parameters of a run minus the initial model's (a LoRA adapter's own from 0), flat, float64."""
    output_dir = Path(output_dir)
    initial = {key: value.double() for key, value in load_file(str(Path(initial_model) / "model.safetensors")).items()}
    name = "adapter_model.safetensors" if (output_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    trained = {key: value.double() for key, value in load_file(str(output_dir / name)).items()}
    return torch.cat([(value - initial.get(key, torch.zeros_like(value))).flatten() for key, value in trained.items()])


def assert_same_training(low, high, initial_model, loss_rel: float = 3e-2) -> tuple[float, float]:
    """Two runs of the same training, ``low`` in half precision and ``high`` in float32, within half's precision.

    Every step's loss (``loss_rel``), deviation and coefficient (rel 0.1, abs 0.02), and the update they made:
    cosine > 0.99 and norms within 5 %. Returns (cosine, norm ratio).
    """
    from conftest import step_logs

    low_logs, high_logs = step_logs(low), step_logs(high)
    assert len(low_logs) == len(high_logs) > 0
    for step_low, step_high in zip(low_logs, high_logs):
        assert step_low["loss"] == pytest.approx(step_high["loss"], rel=loss_rel), step_low["step"]
        for key in ("deviation", "coef"):
            if key in step_high:
                assert step_low[key] == pytest.approx(step_high[key], rel=0.1, abs=2e-2), (step_low["step"], key)

    moved = {name: saved_update(out, initial_model) for name, out in (("low", low), ("high", high))}
    assert moved["high"].norm() > 1e-3, "the update is trivially small; the comparison would prove nothing"
    cosine = torch.nn.functional.cosine_similarity(moved["low"], moved["high"], dim=0).item()
    ratio = (moved["low"].norm() / moved["high"].norm()).item()
    assert cosine > 0.99 and ratio == pytest.approx(1.0, abs=0.05), (cosine, ratio)
    return cosine, ratio


BETA = 0.5


def expected_step(tiny, stage: str):
    """One plain-SGD step of `stage` on the `four` samples, at β = ``BETA``, computed here independently.

    Per-sample forward passes, log_softmax + indexing, autograd of each log πθ(y_i|x_i), and the coefficients of
    Eq. 7 (minorsft), Eq. 4 (the gradient of Eq. 3, sft_dpo) or Eq. 5 (sft_sample). Returns (θ0 parameters by name,
    expected −gradient by name, expected step-1 metrics).
    """
    encoded, policy, ref = step_inputs(tiny)
    params = dict(policy.named_parameters())
    descent = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    n = len(encoded)
    rows = []
    for prompt, answer in encoded:
        m = len(answer)
        logp = answer_token_logps(policy, prompt, answer).sum()
        with torch.no_grad():
            ref_logp = answer_token_logps(ref, prompt, answer).sum()
        r = (logp.detach() - ref_logp).item()
        sig = torch.sigmoid(torch.tensor(-BETA * r, dtype=torch.float64)).item()
        if stage == "minorsft":  # Eq. 7: −(2/m)·σ(−βr)·∇log πθ(y|x)
            weight, coef, loss = 2.0 * sig / m, 2.0 * sig, -2.0 * sig * logp.item() / m
        elif stage == "sft_sample":  # Eq. 5: L = (1/N) Σ −(1/m_i)·log πθ(y_i|x_i)
            weight, coef, loss = 1.0 / m, None, -logp.item() / m
        else:  # Eq. 4 = ∇ of Eq. 3: −β·σ(−βr)·∇log πθ(y|x)
            weight, coef = BETA * sig, sig
            loss = -torch.nn.functional.logsigmoid(torch.tensor(BETA * r, dtype=torch.float64)).item()
        grads = torch.autograd.grad(logp, list(params.values()))
        for (name, _), grad in zip(params.items(), grads):
            descent[name] += weight * grad.double() / n  # −∇L = +(1/N) Σ weight_i ∇ log πθ
        rows.append(
            dict(loss=loss, deviation=r / m, rewards=BETA * r, coef=coef, policy=logp.item(), ref=ref_logp.item())
        )

    mean = lambda key: sum(row[key] for row in rows) / n  # noqa: E731
    metrics = {
        "loss": mean("loss"),
        "deviation": mean("deviation"),
        "rewards": mean("rewards"),
        "logps/policy": mean("policy"),
        "logps/ref": mean("ref"),
    }
    if stage != "sft_sample":  # sft has no dynamic coefficient
        metrics["coef"] = mean("coef")
    theta0 = {name: p.detach().double() for name, p in params.items()}
    return theta0, descent, metrics
