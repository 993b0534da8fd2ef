"""Per-step metric sums of the reference-aware stages, reduced once per logging step (TRL style).

We keep sums and a sample count rather than per-step means, so that the logged value is the mean over
all valid samples of the logging window: gradient accumulation and data parallelism give the same
number as one big batch (the paper's Eq. 8 is a mean over the N samples of a batch).
"""

import torch

from .losses import floored_ref_logps, log_ratio, normalized_log_ratio


METRIC_NAMES = ("deviation", "rewards", "coef", "coef_below_0.01", "logps/policy", "logps/ref")
#: The logged names that only the dynamic-coefficient stages (minorsft, sft_dpo) have.
COEF_METRICS = ("coef", "coef_below_0.01")
#: A sample whose coefficient is below this has practically stopped training (its gradient is scaled by < 1 %).
SWITCHED_OFF_COEF = 0.01
DEVIATION_SUMS_SIZE = len(METRIC_NAMES) + 1
GROUP_SUMS_SIZE = 6


def metric_sums(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, coef: torch.Tensor, beta: float
) -> torch.Tensor:
    """Sums over the valid samples of ``METRIC_NAMES`` followed by their count: a float64 vector of 7.

    - ``deviation``: (1/m_i)·r_i, Eq. 8;  - ``rewards``: β·r_i;  - ``coef``: the dynamic coefficient;
    - ``coef_below_0.01``: 1 where the coefficient is below 0.01 (its mean is the fraction of samples that have
      practically stopped training: long, well-fit answers reach it without any warning);
    - ``logps/policy`` and ``logps/ref``: summed answer log-probs.
    """
    valid = num_tokens > 0
    policy_logps, ref_logps, coef = policy_logps.detach(), ref_logps.detach(), coef.detach()
    per_sample = torch.stack(
        [
            normalized_log_ratio(policy_logps, ref_logps, num_tokens),
            beta * log_ratio(policy_logps, ref_logps),
            coef.float(),
            (coef < SWITCHED_OFF_COEF).float(),
            policy_logps.float(),
            floored_ref_logps(ref_logps),
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


GROUP_METRIC_NAMES = ("group_loss/important", "group_loss/unimportant", "worst_group/important")


def group_sums(important: torch.Tensor, unimportant: torch.Tensor, worst_is_important: torch.Tensor,
               num_tokens: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """SFT-GO sums, each followed by its own count: a float64 vector of 6.

    - ``group_loss/important`` / ``group_loss/unimportant``: a group's mean token NLL, over the samples where
      that group is not empty (NaN marks an empty group);
    - ``worst_group/important``: the fraction of valid samples whose worst (higher-loss) group is the important one.
    """
    valid = num_tokens > 0
    parts = []
    for values in (important, unimportant):
        present = ~torch.isnan(values) & valid
        parts += [torch.where(present, values, torch.zeros_like(values)).double().sum(), present.sum().double()]
    parts += [(worst_is_important & valid).sum().double(), valid.sum().double()]
    return torch.stack(parts)


def group_means(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Logged means of (all-reduced) ``group_sums``; a metric without any sample is left out."""
    values = sums.tolist()
    return {f"{prefix}{name}": values[2 * i] / values[2 * i + 1]
            for i, name in enumerate(GROUP_METRIC_NAMES) if values[2 * i + 1] > 0}  # fmt: skip
