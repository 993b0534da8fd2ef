"""LLaMA-Factory's SFT data options `train_on_prompt` and `mask_history` reach this package's stages.

A sample's "answer" is what its labels mark: with `train_on_prompt` every token after the first, with
`mask_history` the last assistant turn only, and by default every assistant turn of a conversation. One plain-SGD
step through the stock CLI must move the weights by Eq. 7 over exactly those tokens (m, log πθ(y|x) and
log πref(y|x) included), computed here independently: one forward per sample, log_softmax in float64, the
labelled positions picked from the encoded conversation.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import base_config, run_cli, step_logs
from helpers import assert_sgd_step
from llamafactory_minorsft.tools.tiny import make_instruction_data, write_dataset


BETA = 0.5


@pytest.fixture(scope="module")
def chats(tiny) -> list[list[dict[str, str]]]:
    """Four two-turn conversations, registered as the sharegpt data set `chats` beside `four`."""
    turns = make_instruction_data(8, seed=11)
    conversations = [
        [
            message
            for sample in turns[2 * i : 2 * i + 2]
            for message in (
                {"role": "user", "content": sample["instruction"]},
                {"role": "assistant", "content": sample["output"]},
            )
        ]
        for i in range(4)
    ]
    records = [
        {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c]}
        for c in conversations
    ]
    write_dataset(tiny.data, "chats", records, {"formatting": "sharegpt", "columns": {"messages": "conversations"}})
    return conversations


def encoded_turns(model_dir: str, messages: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) of every turn, as LLaMA-Factory's qwen template formats a conversation."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="qwen"))
    return template.encode_multiturn(tokenizer, messages)


def labelled(turns: list[tuple[list[int], list[int]]], option: str) -> tuple[list[int], list[int]]:
    """The sample's ids, and the positions whose tokens count as its answer under ``option``."""
    ids, positions = [], []
    for index, (source, target) in enumerate(turns):
        start = len(ids) + len(source)
        ids += source + target
        if option == "mask_history" and index != len(turns) - 1:
            continue
        positions += range(start, start + len(target))
    if option == "train_on_prompt":
        positions = list(range(1, len(ids)))  # the first token is never predicted
    return ids, positions


def logp_of(model, ids: list[int], positions: list[int]) -> torch.Tensor:
    """Σ log π of the tokens at ``positions``, each predicted from the positions before it (float64)."""
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    index = torch.tensor(positions)
    return logprobs[index - 1, torch.tensor(ids)[index]].sum()


def expected_minorsft_step(tiny, samples: list[tuple[list[int], list[int]]]):
    """θ0, the expected −∇ of Eq. 7 over the labelled tokens, and the expected step-1 metrics."""
    policy = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny.ref_model, dtype=torch.float32)
    params = dict(policy.named_parameters())
    descent = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    sums = dict(deviation=0.0, policy=0.0, ref=0.0)
    for ids, positions in samples:
        m = len(positions)
        logp = logp_of(policy, ids, positions)
        with torch.no_grad():
            ref_logp = logp_of(ref, ids, positions).item()
        r = logp.item() - ref_logp
        weight = 2.0 * torch.sigmoid(torch.tensor(-BETA * r, dtype=torch.float64)).item() / m  # Eq. 7
        for (name, _), grad in zip(params.items(), torch.autograd.grad(logp, list(params.values()))):
            descent[name] += weight * grad.double() / len(samples)
        sums["deviation"] += r / m  # Eq. 8
        sums["policy"] += logp.item()
        sums["ref"] += ref_logp
    metrics = {key: value / len(samples) for key, value in sums.items()}
    return {name: p.detach().double() for name, p in params.items()}, descent, metrics


def alpaca_turns(tiny) -> list[list[tuple[list[int], list[int]]]]:
    import json
    from pathlib import Path

    samples = json.loads(Path(tiny.data, "four.json").read_text())
    return [
        encoded_turns(
            tiny.model, [{"role": "user", "content": s["instruction"]}, {"role": "assistant", "content": s["output"]}]
        )
        for s in samples
    ]


CASES = {  # option → (data set, LLaMA-Factory's data option)
    "train_on_prompt": ("four", dict(train_on_prompt=True)),
    "mask_history": ("chats", dict(mask_history=True)),
    "every_turn": ("chats", {}),  # the default for a conversation: every assistant turn is answer
}


@pytest.mark.compat
@pytest.mark.parametrize("option", CASES)
def test_minorsft_step_follows_the_labels(tiny, chats, tmp_path, option):
    dataset, overrides = CASES[option]
    out = tmp_path / "out"
    config = base_config(tiny, out, dataset=dataset, pref_beta=BETA, ref_model=tiny.ref_model, **overrides)
    run_cli(config, tmp_path)

    turns = alpaca_turns(tiny) if dataset == "four" else [encoded_turns(tiny.model, chat) for chat in chats]
    samples = [labelled(sample, option) for sample in turns]
    answer_lengths = {len(positions) for _, positions in samples}
    assert len(answer_lengths) > 1, "equal m: the 1/m of Eq. 7 would be untested"
    if option != "every_turn":  # the option changes which tokens are answer
        assert [len(p) for _, p in samples] != [len(p) for _, p in (labelled(s, "every_turn") for s in turns)]
    theta0, descent, metrics = expected_minorsft_step(tiny, samples)
    # with `train_on_prompt` every token of the four samples' shared system prompt is an answer token, and the tied
    # embedding sums their gradients: float32 rounding reached 7.9e-6 of the largest update there on transformers
    # 5.8.0 (2.4e-6 on 5.5.4), 1e-6 elsewhere
    atol_of = {"model.embed_tokens.weight": 2e-5} if option == "train_on_prompt" else None
    assert_sgd_step(out, theta0, descent, atol_of)
    # the tolerance still tells the labellings apart: the step over another option's answer tokens is far outside it
    other = "mask_history" if option == "every_turn" else "every_turn"
    _, wrong, _ = expected_minorsft_step(tiny, [labelled(sample, other) for sample in turns])
    with pytest.raises(AssertionError, match="not close"):
        assert_sgd_step(out, theta0, wrong, atol_of)
    logged = step_logs(out)[0]
    assert logged["deviation"] == pytest.approx(metrics["deviation"], rel=1e-4, abs=1e-5)
    assert logged["logps/policy"] == pytest.approx(metrics["policy"], rel=1e-4)
    assert logged["logps/ref"] == pytest.approx(metrics["ref"], rel=1e-4)


@pytest.mark.parametrize("option", ["mask_history"])
def test_sft_go_trains_with_the_option_and_its_deviation_follows_the_labels(tiny, chats, tmp_path, option):
    """SFT-GO with `track_deviation`: the logged step-1 deviation (Eq. 8, at θ0) is over the labelled tokens."""
    dataset, overrides = CASES[option]
    out = tmp_path / "out"
    config = base_config(
        tiny, out, stage="sft_go", dataset=dataset, track_deviation=True, ref_model=tiny.ref_model, **overrides
    )
    run_cli(config, tmp_path)

    turns = alpaca_turns(tiny) if dataset == "four" else [encoded_turns(tiny.model, chat) for chat in chats]
    _, _, metrics = expected_minorsft_step(tiny, [labelled(sample, option) for sample in turns])
    logged = step_logs(out)[0]
    assert logged["deviation"] == pytest.approx(metrics["deviation"], rel=1e-4, abs=1e-5)
    assert logged["logps/policy"] == pytest.approx(metrics["policy"], rel=1e-4)
