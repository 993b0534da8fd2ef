"""The math of SFT-GO (supervised fine-tuning with group optimization, arXiv 2506.15021) as pure functions.

Each sample's answer tokens are split by a token-importance score into an *important* group (the top η
fraction) and an *unimportant* group (the rest). With L_g the mean token NLL of group g and CE the mean
token NLL of the whole answer, the per-sample loss is

    L_i = (1 − λ)·CE_i + λ·max(L_important,i, L_unimportant,i)

(λ = 1 keeps only the worst group; with Rho-1 grouping that is close to Rho-1 itself). The grouping is a
selection, not a function to differentiate: scores are always taken without gradient.

Tensors are laid out as ``answer_token_logps`` returns them: (batch, length) with a boolean answer mask.
"""

import math
from typing import NamedTuple, Sequence

import torch


GROUPINGS = ("tfidf", "rho1", "llmlingua2")
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
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.size(-1), device=order.device).expand_as(order))
    num_important = torch.ceil(eta * mask.sum(-1, keepdim=True).float()).long()
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


def spans_from_pieces(pieces: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join decoded token pieces into one text and return each piece's character span in it."""
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)

    return "".join(pieces), spans


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
    """Per-sample outputs of ``sft_go_loss``, each of shape (batch,)."""

    losses: torch.Tensor  # L_i (0 for samples without answer tokens)
    important: torch.Tensor  # L_important,i (nan where the group is empty)
    unimportant: torch.Tensor  # L_unimportant,i (nan where the group is empty)
    worst_is_important: torch.Tensor  # bool: the max is the important group


def _group_mean_nll(token_logps: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = group.sum(-1)
    nll = -(token_logps * group).sum(-1) / size.clamp(min=1)
    return nll, size > 0


def sft_go_loss(token_logps: torch.Tensor, mask: torch.Tensor, important: torch.Tensor, lam: float) -> GroupLosses:
    """SFT-GO per-sample loss L_i = (1 − λ)·CE_i + λ·max(L_important,i, L_unimportant,i).

    The gradient is (1 − λ)·∇CE_i + λ·∇L_worst,i. An empty group (one answer token, or every token in one
    group) is left out of the max, so the worst group is the only one and L_i = CE_i; a sample without answer
    tokens has loss 0 and no gradient. Nothing divides by zero and nothing returns NaN into the loss.
    """
    important = important & mask
    unimportant = mask & ~important
    ce, valid = _group_mean_nll(token_logps, mask)
    imp, has_imp = _group_mean_nll(token_logps, important)
    unimp, has_unimp = _group_mean_nll(token_logps, unimportant)
    # an empty group never wins the max
    worst = torch.maximum(imp.masked_fill(~has_imp, -math.inf), unimp.masked_fill(~has_unimp, -math.inf))
    worst_is_important = has_imp & (~has_unimp | (imp.detach() >= unimp.detach()))
    losses = torch.where(valid, (1 - lam) * ce + lam * worst.masked_fill(~valid, 0.0), torch.zeros_like(ce))
    nan = torch.full_like(ce, math.nan)
    return GroupLosses(
        losses,
        torch.where(has_imp, imp.detach(), nan),
        torch.where(has_unimp, unimp.detach(), nan),
        worst_is_important & valid,
    )


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
