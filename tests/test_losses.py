"""The pure loss functions against autograd computations of the paper's formulas, written here."""

import statistics

import pytest
import torch

from llamafactory_minorsft.losses import (
    IGNORE_INDEX,
    answer_logps,
    answer_token_logps,
    minorsft_loss,
    normalized_log_ratio,
    sft_dpo_loss,
)
from llamafactory_minorsft.train.metrics import (
    COEF_METRICS,
    DEVIATION_METRICS,
    coef_pairs,
    deviation_pairs,
    metric_means,
)


def make_batch(seed=0, batch=4, length=12, vocab=11, empty_row=None):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    prompt_lengths = torch.randint(2, length - 2, (batch,), generator=gen)
    for i, p in enumerate(prompt_lengths.tolist()):
        labels[i, :p] = IGNORE_INDEX
        labels[i, length - i :] = IGNORE_INDEX  # right padding of varying length
    if empty_row is not None:
        labels[empty_row] = IGNORE_INDEX  # answer cut away by cutoff_len
    return logits, ref_logits, labels


def naive_logps(logits, labels):
    """Sum over answer tokens of log_softmax, one sample and one position at a time."""
    sums, lengths = [], []
    for i in range(labels.size(0)):
        total, m = logits.new_zeros(()), 0
        for t in range(1, labels.size(1)):
            if labels[i, t] != IGNORE_INDEX:
                total = total + torch.log_softmax(logits[i, t - 1], -1)[labels[i, t]]
                m += 1
        sums.append(total)
        lengths.append(m)
    return torch.stack(sums), torch.tensor(lengths)


def test_answer_logps_equal_naive_values_and_gradients_for_any_chunking():
    logits, _, labels = make_batch()
    expected, lengths = naive_logps(logits, labels)
    weights = torch.linspace(-1.0, 2.0, labels.size(0), dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    for chunk in (1, 3, 1024):
        token_logps, mask = answer_token_logps(logits, labels, chunk_size=chunk)
        torch.testing.assert_close(token_logps.sum(-1).double(), expected, rtol=1e-6, atol=1e-5)
        assert mask.sum(-1).tolist() == lengths.tolist()
        (grad,) = torch.autograd.grad((token_logps.sum(-1) * weights).sum(), logits)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    result = answer_logps(logits, labels)
    assert result.num_tokens.tolist() == lengths.tolist()


def test_answer_logps_of_bf16_logits_are_accumulated_in_float32():
    logits, _, labels = make_batch(seed=5, vocab=300, length=40)
    low = logits.detach().to(torch.bfloat16).requires_grad_()
    expected, _ = naive_logps(low.detach().double(), labels)  # the same bf16 values, summed in float64
    result = answer_logps(low, labels)
    assert result.logps.dtype == torch.float32
    torch.testing.assert_close(result.logps.double(), expected, rtol=1e-5, atol=1e-4)
    result.logps.sum().backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize("beta", [0.04, 0.5, 3.0])
def test_minorsft_gradient_is_eq7(beta):
    logits, ref_logits, labels = make_batch(seed=1)
    policy = answer_logps(logits, labels)
    with torch.no_grad():
        ref = answer_logps(ref_logits, labels)
    losses, coef = minorsft_loss(policy.logps, ref.logps, policy.num_tokens, beta)
    (grad,) = torch.autograd.grad(losses.mean(), logits)

    # Eq. 7 written out: −(1/N) Σ_i (2/m_i)·σ(−β r_i)·∇ log πθ(y_i|x_i), with ∇ log πθ from naive autograd
    naive, m = naive_logps(logits, labels)
    r = naive.detach() - naive_logps(ref_logits, labels)[0]
    expected = torch.zeros_like(logits)
    for i in range(len(m)):
        (g_i,) = torch.autograd.grad(naive[i], logits, retain_graph=True)
        expected -= (2.0 / m[i]) * torch.sigmoid(-beta * r[i]) * g_i / len(m)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(coef.double(), 2 * torch.sigmoid(-beta * r), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.04, 0.5, 3.0])
def test_sft_dpo_loss_is_eq3_and_gradient_eq4(beta):
    logits, ref_logits, labels = make_batch(seed=2)
    policy = answer_logps(logits, labels)
    ref = answer_logps(ref_logits, labels)
    losses, coef = sft_dpo_loss(policy.logps, ref.logps.detach(), policy.num_tokens, beta)
    (grad,) = torch.autograd.grad(losses.mean(), logits)

    naive, m = naive_logps(logits, labels)
    r = naive - naive_logps(ref_logits, labels)[0].detach()
    expected_losses = -torch.log(torch.sigmoid(beta * r))  # Eq. 3, written the plain way
    torch.testing.assert_close(losses.double(), expected_losses.detach(), rtol=1e-5, atol=1e-6)
    (expected_grad,) = torch.autograd.grad(expected_losses.mean(), logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(coef.double(), torch.sigmoid(-beta * r.detach()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_fn", [minorsft_loss, sft_dpo_loss])
def test_sample_with_zero_answer_tokens_contributes_nothing(loss_fn):
    logits, ref_logits, labels = make_batch(seed=3, empty_row=1)
    policy = answer_logps(logits, labels)
    ref = answer_logps(ref_logits, labels)
    assert policy.num_tokens[1] == 0
    losses, _ = loss_fn(policy.logps, ref.logps, policy.num_tokens, 0.1)
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert losses[1] == 0 and grad[1].abs().max() == 0
    assert normalized_log_ratio(policy.logps, ref.logps, policy.num_tokens)[1] == 0


def test_losses_stay_finite_for_huge_log_ratios():
    policy = torch.tensor([-1e4, 0.0, -5.0], requires_grad=True)
    ref = torch.tensor([0.0, -1e4, float("-inf")])
    m = torch.tensor([100, 100, 3])
    for loss_fn in (minorsft_loss, sft_dpo_loss):
        losses, coef = loss_fn(policy, ref, m, 0.5)
        (grad,) = torch.autograd.grad(losses.sum(), policy)
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all() and torch.isfinite(coef).all()
    # the limits are right, not just finite: |β·r| = 5000
    losses, coef = minorsft_loss(policy, ref, m, 0.5)
    assert coef.tolist()[:2] == [2.0, 0.0] and losses[0].item() == pytest.approx(2 * 1e4 / 100)
    losses, coef = sft_dpo_loss(policy, ref, m, 0.5)
    assert losses[0].item() == pytest.approx(0.5 * 1e4) and losses[1].item() == 0.0
    # a reference probability 0 (log πref = −inf) leaves the deviation metric and rewards finite
    means = metric_means(DEVIATION_METRICS, deviation_pairs(policy.detach(), ref, m, 0.5).sum(0))
    assert all(torch.isfinite(torch.tensor(value)) for value in means.values()), means


def test_metric_sums_are_eq8_means_over_valid_samples():
    policy = torch.tensor([-10.0, -4.0, 0.0])
    ref = torch.tensor([-12.0, -3.0, 0.0])
    m = torch.tensor([5, 2, 0])  # the third sample has no answer token
    coef = torch.tensor([0.009, 1.1, 0.0])  # the first sample has practically stopped training

    def sums(part: slice) -> torch.Tensor:
        pairs = [deviation_pairs(policy[part], ref[part], m[part], 0.1), coef_pairs(coef[part], m[part])]
        return torch.cat(pairs, dim=-1).sum(0)

    names = (*DEVIATION_METRICS, *COEF_METRICS)
    means = metric_means(names, sums(slice(None)))
    assert means["deviation"] == pytest.approx(((2 / 5) + (-1 / 2)) / 2)
    assert means["rewards"] == pytest.approx(0.1 * (2 - 1) / 2)
    assert means["coef"] == pytest.approx((0.009 + 1.1) / 2)
    assert means["coef_below_0.01"] == pytest.approx(1 / 2)  # of the valid samples only
    assert means["coef_std"] == pytest.approx(statistics.pstdev([0.009, 1.1]))
    assert means["logps/policy"] == pytest.approx(-7.0) and means["logps/ref"] == pytest.approx(-7.5)
    # sums from two halves add up to the sums of the whole batch (accumulation/data-parallel safe)
    torch.testing.assert_close(sums(slice(0, 1)) + sums(slice(1, None)), sums(slice(None)))
    assert metric_means(names, sums(slice(2, None))) == {}
