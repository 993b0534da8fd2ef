"""Test helpers written independently of the package.

Test helpers written independently of the package: the float64 log-prob oracle, the exact-SGD-step assertion
and weight comparisons. Test modules import these, never each other.
"""

import json
from pathlib import Path

import torch
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


def assert_sgd_step(output_dir, theta0: dict[str, torch.Tensor], descent: dict[str, torch.Tensor]) -> None:
    """The saved model is θ0 moved by exactly ``descent`` = −∇L (one plain-SGD step with lr 1)."""
    trained = weights(output_dir)
    biggest = max(d.abs().max().item() for d in descent.values())
    assert biggest > 1e-4, "the expected update is trivially small; the test would prove nothing"
    for name, theta in theta0.items():
        update = trained[name].double() - theta
        torch.testing.assert_close(update, descent[name], rtol=1e-4, atol=1e-6 * biggest, msg=name)
