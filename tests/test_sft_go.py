"""`stage: sft_go` through the stock CLI.

`stage: sft_go` through the stock CLI: one exact SGD step per grouping, the logged group metrics, LoRA with
gradient accumulation and precomputed per-token reference log-probs, and LLMLingua-2 grouping with a tiny
token-classification model built here.

The expected SGD step is computed independently of the package: per-sample forward passes in float64, the
grouping from its definition (Python counters for TF-IDF, excess loss for Rho-1), and autograd of
L = (1 − λ)·CE + λ·W, with CE the token mean over the batch's answer tokens and W the worst group's loss:
max(L_important,i, L_unimportant,i) averaged over the samples (`sample`), or max(L_important, L_unimportant) with
each group's token mean over the whole batch (`batch`).
"""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import base_config, run_cli, step_logs
from helpers import answer_token_logps, assert_same_weights, assert_sgd_step, encode, step_inputs
from llamafactory_minorsft.tools.tiny import build_token_classifier
from llamafactory_minorsft.train.metrics import GROUP_METRICS


ETA, LAM = 0.5, 0.7


def important_positions(scores: list[float]) -> set[int]:
    """The ceil(η·m) highest scores; ties go to the earlier position."""
    order = sorted(range(len(scores)), key=lambda t: (-scores[t], t))
    return set(order[: math.ceil(ETA * len(scores))])


def expected_sft_go_step(tiny, grouping: str, reduction: str):
    encoded, policy, ref = step_inputs(tiny)
    params = dict(policy.named_parameters())
    documents = Counter(token for _, answer in encoded for token in set(answer))
    idf = {token: math.log((1 + len(encoded)) / (1 + df)) + 1 for token, df in documents.items()}
    rows, nlls, groups = [], [], {True: [], False: []}
    for prompt, answer in encoded:
        logps = answer_token_logps(policy, prompt, answer)
        if grouping == "rho1":
            with torch.no_grad():
                ref_logps = answer_token_logps(ref, prompt, answer)
            scores = (ref_logps - logps.detach()).tolist()  # policy loss − reference loss
        else:
            counts = Counter(answer)
            scores = [counts[token] * idf[token] for token in answer]
        important = important_positions(scores)
        nll = -logps
        nlls += list(nll)
        for t in range(len(answer)):
            groups[t in important].append(nll[t])
        imp = torch.stack([nll[t] for t in sorted(important)]).mean()
        unimp = torch.stack([nll[t] for t in range(len(answer)) if t not in important]).mean()
        rows.append(
            dict(
                worst=torch.maximum(imp, unimp),
                imp=imp.item(),
                unimp=unimp.item(),
                worst_imp=float(imp.item() >= unimp.item()),
            )
        )
        if grouping == "rho1":  # Eq. 8 of the MinorSFT paper, logged because a reference is loaded anyway
            rows[-1]["deviation"] = (logps.sum().item() - ref_logps.sum().item()) / len(answer)

    ce = torch.stack(nlls).mean()
    if reduction == "sample":
        worst = torch.stack([row["worst"] for row in rows]).mean()
    else:
        worst = torch.maximum(torch.stack(groups[True]).mean(), torch.stack(groups[False]).mean())
    total = (1 - LAM) * ce + LAM * worst
    grads = torch.autograd.grad(total, list(params.values()))
    descent = {name: -grad.double() for name, grad in zip(params, grads)}
    theta0 = {name: p.detach().double() for name, p in params.items()}
    mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    metrics = {
        "loss": total.item(),
        "group_loss/important": mean("imp"),
        "group_loss/unimportant": mean("unimp"),
        "worst_group/important": mean("worst_imp"),
        "sft_go_lambda": LAM,
    }
    if grouping == "rho1":
        metrics["deviation"] = mean("deviation")
    return theta0, descent, metrics


@pytest.mark.compat
@pytest.mark.parametrize("grouping, reduction", [("rho1", "batch"), ("tfidf", "sample"), ("tfidf", "batch")])
def test_one_sgd_step_matches_the_sft_go_gradient(tiny, tmp_path, grouping, reduction):
    out = tmp_path / "out"
    config = base_config(
        tiny,
        out,
        stage="sft_go",
        sft_go_grouping=grouping,
        sft_go_eta=ETA,
        sft_go_lambda=LAM,
        sft_go_group_reduction=reduction,
        pref_beta=None,
        ref_model=tiny.ref_model if grouping == "rho1" else None,
    )
    run_cli(config, tmp_path)
    theta0, descent, metrics = expected_sft_go_step(tiny, grouping, reduction)

    assert_sgd_step(out, theta0, descent)

    logged = step_logs(out)[0]
    assert abs(metrics["group_loss/important"] - metrics["group_loss/unimportant"]) > 1e-3  # the groups differ
    assert set(GROUP_METRICS) <= set(metrics)
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert ("deviation" in logged) == (grouping == "rho1")  # a reference is loaded only where one is needed


def test_defaults_follow_the_papers_public_description():
    """λ = 0.9 for all settings, decayed back to the standard loss, Group DRO's mini-batch group losses."""
    import llamafactory.hparams  # noqa: F401  (the plugin's hparams import LLaMA-Factory's)
    from transformers import HfArgumentParser

    from llamafactory_minorsft.hparams import PluginFinetuningArguments

    (args,) = HfArgumentParser(PluginFinetuningArguments).parse_dict({"stage": "sft_go"})
    assert (args.sft_go_lambda, args.sft_go_lambda_schedule, args.sft_go_lambda_min) == (0.9, "linear", 0.0)
    assert (args.sft_go_group_reduction, args.sft_go_grouping, args.sft_go_eta) == ("batch", "tfidf", 0.5)


def test_lambda_zero_is_stock_sft(tiny, tmp_path):
    """λ = 0 is stock SFT.

    SFT-GO's CE term is stock SFT's token mean, normalised the same way under accumulation (taken from the fused
    head): λ = 0 gives the same losses and the same weights up to float32 rounding.
    """
    common = dict(
        learning_rate=0.5,  # plain SGD (``base_config``): an update linear in the gradient, so rounding stays rounding
        max_steps=3,
        dataset="minorsft_demo",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    run_cli(base_config(tiny, tmp_path / "stock", stage="sft", **common), tmp_path / "stock_run")
    go = dict(stage="sft_go", sft_go_lambda=0.0, sft_go_group_reduction="sample", pref_beta=None)
    run_cli(base_config(tiny, tmp_path / "go", **go, **common), tmp_path / "go_run")
    stock, sft_go = step_logs(tmp_path / "stock"), step_logs(tmp_path / "go")
    assert len(stock) == 3 and [e["loss"] for e in sft_go] == pytest.approx([e["loss"] for e in stock], rel=1e-5)
    assert sft_go[0]["group_loss/important"] != sft_go[0]["group_loss/unimportant"]  # the groups were formed
    assert_same_weights(tmp_path / "stock", tmp_path / "go", rtol=1e-4, atol=1e-6)


def test_lora_accumulation_and_precomputed_token_logps_match_the_big_batch(tiny, tmp_path):
    """Rho-1 + LoRA: accumulation and precomputed token log-probs equal one big batch.

    Rho-1 + LoRA: batch 1 × accumulation 4 with precomputed per-token reference log-probs (cached, then
    reused) gives the same steps as batch 4 with the online reference.

    The reference is a separate `ref_model`: with the initial model as reference every excess loss is 0 at the
    first step, and the grouping would be decided by float noise that differs between batch shapes.
    """
    common = dict(
        stage="sft_go",
        sft_go_grouping="rho1",
        sft_go_lambda=LAM,
        sft_go_group_reduction="sample",
        finetuning_type="lora",
        lora_target="all",
        pref_beta=None,
        ref_model=tiny.ref_model,
        dataset="minorsft_demo",
        cutoff_len=128,
        max_steps=3,
        learning_rate=0.05,
        disable_shuffling=True,
        ref_logps_cache_dir=str(tmp_path / "cache"),
    )
    run_cli(base_config(tiny, tmp_path / "big", **common), tmp_path / "big_run")
    accumulated = dict(common, per_device_train_batch_size=1, gradient_accumulation_steps=4, precompute_ref_logps=True)
    first = run_cli(base_config(tiny, tmp_path / "acc", **accumulated), tmp_path / "acc_run")
    again = run_cli(base_config(tiny, tmp_path / "acc2", **accumulated), tmp_path / "acc2_run")
    assert "Reference log-probs" in first.stderr and "Reference log-probs" not in again.stderr  # cache reused

    big, acc, acc2 = step_logs(tmp_path / "big"), step_logs(tmp_path / "acc"), step_logs(tmp_path / "acc2")
    assert len(big) == len(acc) == len(acc2) == 3
    assert [a["loss"] for a in acc] == [b["loss"] for b in acc2]  # the cached values are the computed ones
    keys = (
        "loss",
        "deviation",
        "group_loss/important",
        "group_loss/unimportant",
        "worst_group/important",
        "sft_go_lambda",
    )
    for one, other in zip(big, acc):
        for key in keys:
            assert other[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one["step"], key)
    assert [entry["sft_go_lambda"] for entry in big] == pytest.approx([LAM, LAM * 2 / 3, LAM / 3])  # linear decay
    assert abs(big[-1]["deviation"]) > 1e-5  # the adapters moved the policy


@pytest.mark.compat
def test_llmlingua2_grouping_with_a_tiny_token_classifier_and_track_deviation(tiny, tmp_path):
    texts = [sample["output"] for sample in json.loads(Path(tiny.data, "minorsft_demo.json").read_text())]
    classifier = tmp_path / "classifier"
    build_token_classifier(texts, str(classifier))
    out = tmp_path / "out"
    config = base_config(
        tiny,
        out,
        stage="sft_go",
        sft_go_grouping="llmlingua2",
        sft_go_classifier=str(classifier),
        track_deviation=True,
        dataset="minorsft_demo",
        cutoff_len=128,
        max_steps=4,
        learning_rate=1e-3,
        optim="adamw_torch",
        per_device_train_batch_size=8,
        do_eval=True,
        eval_dataset="minorsft_demo_eval",
        eval_strategy="steps",
        eval_steps=4,
        plot_loss=True,
    )
    proc = run_cli(config, tmp_path)
    assert "LLMLingua-2 (train_dataset)" in proc.stderr and "LLMLingua-2 (eval_dataset)" in proc.stderr
    logs = step_logs(out)
    assert len(logs) == 4 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(0 <= entry["worst_group/important"] <= 1 for entry in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    final_eval = [
        entry for entry in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_loss" in entry
    ][-1]
    assert math.isfinite(final_eval["eval_group_loss/important"]) and math.isfinite(final_eval["eval_deviation"])
    # track_deviation loads the initial model as reference: 0 at the first step, then the policy moves away
    assert logs[0]["deviation"] == 0.0 and logs[-1]["deviation"] > 0 and "coef" not in logs[0]
    assert (out / "training_loss.png").exists() and (out / "training_group_loss_important.png").exists()
    assert (out / "training_sft_go_lambda.png").exists()


def test_llmlingua2_scores_land_on_the_right_tokens(tiny, tmp_path):
    """A classifier sharing the LLM's tokenizer maps scores one to one.

    A classifier that shares the LLM's tokenizer must give each answer token exactly its own keep-probability:
    the character-offset mapping is then the identity, so any misalignment shows.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForTokenClassification

    from llamafactory_minorsft.train.sft_go.importance import KeepProbabilityScorer, add_llmlingua2_importance

    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        num_labels=2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    classifier = Qwen2ForTokenClassification(config).eval()
    classifier.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")

    samples = json.loads(Path(tiny.data, "four.json").read_text())
    encoded = encode(tiny.model, samples)
    dataset = Dataset.from_dict({"labels": [[-100] * len(prompt) + answer for prompt, answer in encoded]})
    column = add_llmlingua2_importance(dataset, tokenizer, KeepProbabilityScorer(str(tmp_path / "clf")), "test")
    for (_, answer), values in zip(encoded, column["token_importance"]):
        with torch.no_grad():
            keep = torch.softmax(classifier(input_ids=torch.tensor([answer])).logits[0], -1)[:, 1]
        assert len(values) == len(answer)
        torch.testing.assert_close(torch.tensor(values), keep, rtol=1e-4, atol=1e-6)


def test_a_checkpoint_without_a_token_classification_head_is_no_classifier(tiny):
    """A causal LM (or a bare encoder) loads as a token classifier with a random head: refused, not noise groups."""
    from llamafactory_minorsft.train.sft_go.importance import KeepProbabilityScorer

    with pytest.raises(ValueError, match=r"`sft_go_classifier` .* is not a trained token classifier: .*score\."):
        KeepProbabilityScorer(tiny.model)


CHINESE = ["净利润增长了百分之十", "营收 rose 12% 同比, ça va 🙂", "Revenue grew; 利润率 stayed flat."]


def test_llmlingua2_gets_the_real_text_of_chinese_and_mixed_answers(tiny, tmp_path):
    """Byte-level BPE splits each Chinese character over several tokens.

    The classifier must receive the answer's real text (not "\ufffd" per token), and every character must fall in some
    token's span.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llamafactory_minorsft.train.sft_go.importance import (
        KeepProbabilityScorer,
        add_llmlingua2_importance,
        prefix_spans,
        text_and_spans,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    samples = [{"instruction": "How did it go?", "input": "", "output": answer} for answer in CHINESE]
    encoded = encode(tiny.model, samples)
    for answer, (_, ids) in zip(CHINESE, encoded):
        # the tiny vocabulary splits these characters into bytes, which decode alone to "\ufffd": the case at hand
        assert any("\ufffd" in tokenizer.decode([token]) for token in ids)
        text, spans = text_and_spans(tokenizer, ids)
        assert text.startswith(answer) and "\ufffd" not in text
        covered = {index for start, end in spans for index in range(start, end)}
        assert covered == set(range(len(text)))
        assert prefix_spans(tokenizer, ids) == spans  # the fallback agrees with the offsets

    class Recording(KeepProbabilityScorer):
        texts: list[str] = []

        def __call__(self, texts):
            Recording.texts += texts
            return super().__call__(texts)

    classifier = tmp_path / "classifier"
    build_token_classifier(CHINESE, str(classifier))
    dataset = Dataset.from_dict({"labels": [[-100] * len(prompt) + answer for prompt, answer in encoded]})
    column = add_llmlingua2_importance(dataset, tokenizer, Recording(str(classifier)), "test")
    assert [text[: len(answer)] for text, answer in zip(Recording.texts, CHINESE)] == CHINESE
    for (_, ids), values in zip(encoded, column["token_importance"]):
        assert len(values) == len(ids) and all(0 < value < 1 for value in values)  # every token scored
