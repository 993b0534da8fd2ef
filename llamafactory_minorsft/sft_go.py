"""The math of SFT-GO (supervised fine-tuning with group optimization, arXiv 2506.15021) as pure functions.

Each sample's answer tokens are split by a token-importance score into an *important* group (the top η
fraction) and an *unimportant* group (the rest). The loss is

    L = (1 − λ)·CE + λ·W

with CE the standard SFT loss (the token mean over the batch's answer tokens, as stock LLaMA-Factory SFT) and W
the worst-group term, max(L_important, L_unimportant) of Group DRO: per sample then averaged over samples, or
over the batch (``sft_go_group_reduction``). λ decays during training (``scheduled_lambda``), moving the weight
from the worst group back to the standard loss. The grouping is a selection, not a function to differentiate:
scores are always taken without gradient.

Tensors are laid out as ``answer_token_logps`` returns them: (batch, length) with a boolean answer mask.
"""

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import torch


GROUPINGS = ("tfidf", "rho1", "llmlingua2")
GROUP_REDUCTIONS = ("batch", "sample")
LAMBDA_SCHEDULES = ("constant", "linear", "cosine")


def top_fraction_mask(scores: torch.Tensor, mask: torch.Tensor, eta: float) -> torch.Tensor:
    """The important group: per row, the ceil(η·m_i) answer tokens with the highest scores.

    ``mask`` marks the m_i answer tokens of row i. Ties are broken by position (earlier first), so the
    result is deterministic. A row with one answer token puts it in the important group (ceil rounds up),
    and the unimportant group is then empty.
    """
    finite = torch.finfo(torch.float32).max  # ±inf scores (a reference probability 0) rank as extremes, before padding
    scores = scores.detach().float().nan_to_num(nan=0.0, posinf=finite, neginf=-finite).masked_fill(~mask, -math.inf)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.size(-1), device=order.device).expand_as(order)
    )
    # ceil(η·m) in Python integers (exact, unbounded), η as the decimal it was written as: in floating point
    # 0.3 · 100 is 30.000000000000004, and η = 0.3333333333333333 times m overflows int64 as a fraction
    eta = Fraction(repr(float(eta)))
    counts = [math.ceil(eta * m) for m in mask.sum(-1).tolist()]
    num_important = torch.tensor(counts, dtype=torch.long, device=mask.device).unsqueeze(-1)
    return (ranks < num_important) & mask


def smooth_idf(answers: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Inverse document frequency of every token id over the training answers (one document per answer).

    idf(t) = ln((1 + N) / (1 + df(t))) + 1, the smoothed IDF of scikit-learn's TfidfTransformer: finite for
    tokens that never occur, and ≥ 1 so a token's in-sample frequency still counts when it occurs everywhere.
    """
    document_frequency = torch.zeros(vocab_size, dtype=torch.float64)
    for answer in answers:
        unique = torch.unique(torch.as_tensor(list(answer), dtype=torch.long))
        document_frequency[unique] += 1

    return (torch.log((1 + len(answers)) / (1 + document_frequency)) + 1).float()


def tfidf_scores(targets: torch.Tensor, mask: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """tf(t, y_i)·idf(t) at every answer position: tf is how often the token occurs in the sample's answer."""
    safe = targets.masked_fill(~mask, 0)
    counts = torch.zeros(targets.size(0), idf.numel(), device=targets.device)
    counts.scatter_add_(-1, safe, mask.float())
    tf = counts.gather(-1, safe)
    return torch.where(mask, tf * idf.to(targets.device)[safe], torch.zeros_like(tf))


def rho1_scores(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor) -> torch.Tensor:
    """Rho-1's excess loss (arXiv 2404.07965): policy token loss − reference token loss = log πref − log πθ."""
    return ref_token_logps.detach().float() - policy_token_logps.detach().float()


def spans_from_prefix_ends(ends: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token from the decoded length of every token prefix (``ends[k]``: tokens 0..k).

    A token inside a multi-byte character (byte-level BPE splits 净 over 3 tokens) adds no whole character:
    it gets the span of the character it helps complete, as the tokenizer's own offsets give it.
    """
    spans, start = [], 0
    for k, end in enumerate(ends):
        if end > start:
            spans.append((start, end))
            start = end
        else:
            spans.append((start, next((later for later in ends[k + 1 :] if later > start), start)))

    return spans


def map_scores_by_offsets(
    token_spans: Sequence[tuple[int, int]], source_spans: Sequence[tuple[int, int]], source_scores: Sequence[float]
) -> list[float]:
    """Score of each LLM token: the mean score of the classifier tokens whose characters overlap its own.

    LLMLingua-2 averages sub-token keep-probabilities into word probabilities the same way. An LLM token that
    overlaps none (whitespace, special characters the classifier dropped) scores 0: it is never kept first.
    """
    mapped = []
    for start, end in token_spans:
        overlapping = [s for (a, b), s in zip(source_spans, source_scores) if a < end and start < b and a < b]
        mapped.append(sum(overlapping) / len(overlapping) if overlapping else 0.0)

    return mapped


class GroupLosses(NamedTuple):
    """Per-sample group losses of ``group_losses``, each of shape (batch,)."""

    worst: torch.Tensor  # max(L_important,i, L_unimportant,i) over the non-empty groups (0 without answer tokens)
    important: torch.Tensor  # L_important,i (nan where the group is empty)
    unimportant: torch.Tensor  # L_unimportant,i (nan where the group is empty)
    worst_is_important: torch.Tensor  # bool: the max is the important group


def _group_mean_nll(token_logps: torch.Tensor, group: torch.Tensor, dim=-1) -> tuple[torch.Tensor, torch.Tensor]:
    size = group.sum(dim)
    nll = -(token_logps * group).sum(dim) / size.clamp(min=1)
    return nll, size > 0


def _worst(imp, has_imp, unimp, has_unimp) -> torch.Tensor:
    """Max over the non-empty groups (an empty group never wins), 0 where both are empty; never NaN."""
    worst = torch.maximum(imp.masked_fill(~has_imp, -math.inf), unimp.masked_fill(~has_unimp, -math.inf))
    return worst.masked_fill(~(has_imp | has_unimp), 0.0)


def group_losses(token_logps: torch.Tensor, mask: torch.Tensor, important: torch.Tensor) -> GroupLosses:
    """Each sample's group losses (``sft_go_group_reduction: sample``).

    Each sample's group losses, ``sft_go_group_reduction: sample``: L_g,i is the mean token NLL of sample i's
    tokens in group g, and the worst group term of the sample is max(L_important,i, L_unimportant,i).

    An empty group (one answer token, or every token in one group) is left out of the max, so the other group is
    the worst; a sample without answer tokens has a worst term 0 and no gradient.
    """
    important = important & mask
    imp, has_imp = _group_mean_nll(token_logps, important)
    unimp, has_unimp = _group_mean_nll(token_logps, mask & ~important)
    worst = _worst(imp, has_imp, unimp, has_unimp)
    worst_is_important = has_imp & (~has_unimp | (imp.detach() >= unimp.detach()))
    nan = torch.full_like(imp, math.nan)
    return GroupLosses(
        worst,
        torch.where(has_imp, imp.detach(), nan),
        torch.where(has_unimp, unimp.detach(), nan),
        worst_is_important & mask.any(-1),
    )


def batch_worst_group(token_logps: torch.Tensor, mask: torch.Tensor, important: torch.Tensor) -> torch.Tensor:
    """The worst group term over a whole batch (``sft_go_group_reduction: batch``).

    The worst group term over a whole batch, ``sft_go_group_reduction: batch`` (Group DRO's mini-batch
    procedure): L_g is the mean token NLL of ALL the batch's tokens in group g, and the term is
    max(L_important, L_unimportant). A scalar; 0 for a batch without answer tokens.
    """
    important = important & mask
    imp, has_imp = _group_mean_nll(token_logps, important, dim=None)
    unimp, has_unimp = _group_mean_nll(token_logps, mask & ~important, dim=None)
    return _worst(imp, has_imp, unimp, has_unimp)


def sft_go_objective(ce: torch.Tensor, worst: torch.Tensor, lam: float) -> torch.Tensor:
    """SFT-GO's loss L = (1 − λ)·CE + λ·W.

    SFT-GO's loss L = (1 − λ)·CE + λ·W: CE is the standard SFT loss, the token mean over the batch's answer
    tokens (so λ = 0 is stock SFT), and W the worst-group term (``group_losses``/``batch_worst_group``).
    Its gradient is (1 − λ)·∇CE + λ·∇L_worst.
    """
    return (1 - lam) * ce + lam * worst


def scheduled_lambda(start: float, end: float, schedule: str, progress: float) -> float:
    """λ at training progress ∈ [0, 1]: constant, or decayed from ``start`` to ``end`` linearly or by cosine."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))

    raise ValueError(f"Unknown λ schedule {schedule!r}; choose one of {', '.join(LAMBDA_SCHEDULES)}.")
