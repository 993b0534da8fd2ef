"""SFT-GO's pure functions.

SFT-GO's pure functions: groupings on hand-made inputs with known answers, and the loss's gradient against an
autograd computation written here from the definition L = (1 − λ)·CE + λ·W, with CE the token mean over the batch
and W = max(L_imp, L_unimp) per sample (averaged over samples) or over the batch.
"""

import math

import pytest
import torch

from llamafactory_minorsft.sft_go import (
    batch_worst_group,
    group_losses,
    map_scores_by_offsets,
    rho1_scores,
    scheduled_lambda,
    sft_go_objective,
    smooth_idf,
    spans_from_prefix_ends,
    tfidf_scores,
    top_fraction_mask,
)


def test_top_fraction_takes_the_highest_scores_rounding_up_and_ties_by_position():
    scores = torch.tensor([[3.0, 1.0, 2.0, 5.0, 0.0], [1.0, 1.0, 1.0, 9.0, 9.0], [4.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    important = top_fraction_mask(scores, mask, eta=0.5)
    assert important.tolist() == [
        [True, False, False, True, False],  # m=4: the 2 best (5 and 3); the masked 0 never counts
        [True, False, False, True, True],  # m=5: ceil(2.5)=3: both 9s, then the first of the tied 1s
        [True, False, False, False, False],  # m=1: the single token is important
    ]
    # a masked position is never important, even with the best score
    assert not top_fraction_mask(torch.tensor([[0.0, 100.0]]), torch.tensor([[True, False]]), 0.5)[0, 1]


def test_smooth_idf_and_tfidf_scores_known_values():
    idf = smooth_idf([[1, 2, 2], [2, 3]], vocab_size=5)
    # N = 2; df(1) = 1, df(2) = 2, df(3) = 1, df(0) = df(4) = 0
    expected = [
        math.log(3 / 1) + 1,
        math.log(3 / 2) + 1,
        math.log(3 / 3) + 1,
        math.log(3 / 2) + 1,
        math.log(3 / 1) + 1,
    ]
    torch.testing.assert_close(idf, torch.tensor(expected, dtype=torch.float32))

    targets = torch.tensor([[1, 2, 2, -100], [3, 3, 3, 2]])
    mask = targets != -100
    scores = tfidf_scores(targets, mask, idf)
    assert scores[0].tolist() == pytest.approx([1 * idf[1].item(), 2 * idf[2].item(), 2 * idf[2].item(), 0.0])
    assert scores[1].tolist() == pytest.approx([3 * idf[3].item()] * 3 + [1 * idf[2].item()])
    # in-sample frequency outweighs rarity here: 2·idf(2) = 2 > 1·idf(1) = 1.405; the tie goes to the first
    assert top_fraction_mask(scores, mask, eta=0.3)[0].tolist() == [False, True, False, False]
    # a token that occurs in every answer still counts (idf ≥ 1), and a token never seen is finite
    assert idf.min() >= 1 and torch.isfinite(idf).all()


def test_the_important_group_is_ceil_eta_m_tokens_exactly():
    """⌈η·m⌉ of the decimal η, where float arithmetic overshoots an exact product (0.3 · 100 = 30.000000000000004)."""
    cases = [(0.3, 100, 30), (0.6, 25, 15), (0.7, 10, 7), (0.3, 101, 31), (0.5, 1, 1), (0.05, 7, 1)]
    # η that are no short decimal (1/3, np.linspace's 0.30000000000000004): exact products of 17-digit fractions
    cases += [(1 / 3, 4096, 1366), (0.30000000000000004, 4096, 1229), (1e-30, 4096, 1)]
    for eta, m, expected in cases:
        mask = torch.ones(1, m, dtype=torch.bool)
        assert top_fraction_mask(torch.arange(m, dtype=torch.float32)[None], mask, eta).sum().item() == expected
    mask = torch.tensor([[True] * 20 + [False] * 5, [True] * 25])  # per row: its own m
    assert top_fraction_mask(torch.zeros(2, 25), mask, 0.6).sum(-1).tolist() == [12, 15]


def test_rho1_scores_are_the_excess_loss():
    policy = torch.tensor([[-1.0, -3.0, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    # policy loss − reference loss = (−log πθ) − (−log πref)
    assert rho1_scores(policy, ref).tolist() == [[-1.0, 2.0, 0.0]]


def test_spans_from_prefix_ends_give_a_split_character_to_each_of_its_tokens():
    # "净a": 净 is 3 byte tokens (prefixes decode to 0, 0, 1 whole characters), then "a"
    assert spans_from_prefix_ends([0, 0, 1, 2]) == [(0, 1), (0, 1), (0, 1), (1, 2)]
    assert spans_from_prefix_ends([3, 7, 8]) == [(0, 3), (3, 7), (7, 8)]
    assert spans_from_prefix_ends([1, 1]) == [(0, 1), (1, 1)]  # a trailing incomplete byte covers nothing


def test_offset_mapping_averages_overlapping_classifier_tokens():
    spans = [(0, 3), (3, 7), (7, 8), (8, 12), (12, 13)]  # "The cats sat!" as "The", " cat", "s", " sat", "!"
    # classifier tokens: "The" | " ca" | "ts sat" | special (0, 0) — the "!" is not covered by any
    source_spans, source_scores = [(0, 3), (3, 6), (6, 12), (0, 0)], [0.9, 0.2, 0.6, 1.0]
    mapped = map_scores_by_offsets(spans, source_spans, source_scores)
    assert mapped == pytest.approx([0.9, (0.2 + 0.6) / 2, 0.6, 0.6, 0.0])


def test_lambda_schedules():
    assert scheduled_lambda(0.8, 0.2, "constant", 0.7) == 0.8
    assert scheduled_lambda(0.8, 0.2, "linear", 0.5) == pytest.approx(0.5)
    assert scheduled_lambda(0.8, 0.2, "cosine", 0.0) == pytest.approx(0.8)
    assert scheduled_lambda(0.8, 0.2, "cosine", 0.5) == pytest.approx(0.5)
    assert scheduled_lambda(0.8, 0.2, "cosine", 1.0) == pytest.approx(0.2)
    assert scheduled_lambda(0.8, 0.2, "linear", 3.0) == pytest.approx(0.2)  # clamped after the last step


def reference_loss(token_logps, mask, important, lam: float, reduction: str) -> torch.Tensor:
    """Written from the definition with Python lists; empty groups are left out of the max."""
    rows, cols = range(token_logps.size(0)), range(token_logps.size(1))
    nll = [-token_logps[r, t] for r in rows for t in cols if mask[r, t]]
    ce = sum(nll) / len(nll)  # the token mean over the batch, as stock SFT
    if reduction == "batch":
        groups = [
            [-token_logps[r, t] for r in rows for t in cols if mask[r, t] and important[r, t] == flag]
            for flag in (True, False)
        ]
        worst = max(sum(g) / len(g) for g in groups if g)
    else:
        worsts = []
        for r in rows:
            groups = [
                [-token_logps[r, t] for t in cols if mask[r, t] and important[r, t] == flag] for flag in (True, False)
            ]
            if any(groups):
                worsts.append(max(sum(g) / len(g) for g in groups if g))
        worst = sum(worsts) / len(worsts)  # over the samples that have answer tokens
    return (1 - lam) * ce + lam * worst


@pytest.mark.parametrize("reduction", ["sample", "batch"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_sft_go_gradient_matches_an_independent_autograd(lam, reduction):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1, 3:] = False  # 3 tokens
    mask[2, 1:] = False  # a single answer token: only the important group
    mask[3, :] = False  # no answer token at all (cut by cutoff_len)
    important = torch.rand(5, 7) > 0.5
    important[4] = True  # every token of a sample in one group
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask

    groups = group_losses(token_logps, mask, important)
    num_valid = mask.any(-1).sum()
    if reduction == "sample":
        worst = groups.worst.sum() / num_valid
    else:
        worst = batch_worst_group(token_logps, mask, important)
    ce = -token_logps.sum() / mask.sum()
    loss = sft_go_objective(ce, worst, lam)
    expected = reference_loss(token_logps, mask, important, lam, reduction)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.isfinite(grad).all() and grad[3].abs().max() == 0  # the empty sample has no gradient
    assert groups.worst[3] == 0 and torch.isfinite(groups.worst).all()
    # empty groups are NaN in the metrics only, and the worst group is the only non-empty one
    assert math.isnan(groups.unimportant[2]) and math.isnan(groups.unimportant[4]) and groups.worst_is_important[4]
    assert not groups.worst_is_important[3]


def test_batch_worst_group_of_a_batch_without_answer_tokens_is_zero():
    token_logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    worst = batch_worst_group(token_logps, mask, mask)
    (grad,) = torch.autograd.grad(worst, token_logps)
    assert worst.item() == 0 and grad.abs().max() == 0


def test_rho1_grouping_with_a_zero_probability_reference_token_stays_finite():
    """A reference probability 0 on one token keeps the loss finite.

    Log πref = −inf on one token makes its excess loss −inf: it ranks last among the answer tokens (never
    behind padding), and nothing in the loss or its gradient becomes NaN or inf.
    """
    logits = torch.randn(1, 4, 9, requires_grad=True)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, True, True, True]])  # the first position is prompt
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    ref = torch.tensor([[0.0, float("-inf"), -1.0, float("nan")]])
    important = top_fraction_mask(rho1_scores(token_logps, ref), mask, eta=0.9)  # ceil(2.7) = 3: all answer tokens
    assert important.tolist() == [[False, True, True, True]]
    groups = group_losses(token_logps, mask, top_fraction_mask(rho1_scores(token_logps, ref), mask, 0.5))
    (grad,) = torch.autograd.grad(groups.worst.sum(), logits)
    assert torch.isfinite(groups.worst).all() and torch.isfinite(grad).all()
