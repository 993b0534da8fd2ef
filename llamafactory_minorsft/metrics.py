"""Per-step metric sums of the reference-aware stages, reduced once per logging step (TRL style).

We keep sums and a sample count rather than per-step means, so that the logged value is the mean over
all valid samples of the logging window: gradient accumulation and data parallelism give the same
number as one big batch (the paper's Eq. 8 is a mean over the N samples of a batch).
"""

import torch

from .losses import log_ratio, normalized_log_ratio


METRIC_NAMES = ("deviation", "rewards", "coef", "logps/policy", "logps/ref")


def metric_sums(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, coef: torch.Tensor, beta: float
) -> torch.Tensor:
    """Sums over the valid samples of ``METRIC_NAMES`` followed by their count: a float64 vector of 6.

    - ``deviation``: (1/m_i)·r_i, Eq. 8;  - ``rewards``: β·r_i;  - ``coef``: the dynamic coefficient;
    - ``logps/policy`` and ``logps/ref``: summed answer log-probs.
    """
    valid = num_tokens > 0
    policy_logps, ref_logps, coef = policy_logps.detach(), ref_logps.detach(), coef.detach()
    per_sample = torch.stack(
        [
            normalized_log_ratio(policy_logps, ref_logps, num_tokens),
            beta * log_ratio(policy_logps, ref_logps),
            coef.float(),
            policy_logps.float(),
            ref_logps.float(),
        ]
    ).double()
    sums = torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum(-1)
    return torch.cat([sums, valid.sum().double().view(1)])


def metric_means(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Turn accumulated (and already all-reduced) sums into logged means; empty if no valid sample."""
    count = float(sums[-1])
    if count == 0:
        return {}

    return {f"{prefix}{name}": float(value) / count for name, value in zip(METRIC_NAMES, sums[:-1].tolist())}
