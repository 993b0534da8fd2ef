"""Per-step metric sums of this package's stages, reduced once per logging step (TRL style).

Each metric is kept as a (sum, count) pair over the valid samples rather than a per-step mean, so the logged
value is the mean over all samples of the logging window: gradient accumulation and data parallelism give the
same number as one big batch (the paper's Eq. 8 is a mean over the N samples of a batch). The functions here give
each sample's pairs, (samples, 2 × metrics), so that an evaluation can gather them per row and drop the samples
that accelerate repeats (``BaseSFTTrainer.store_metrics``).
"""

import torch

from ..losses import floored_ref_logps, log_ratio, normalized_log_ratio


#: Logged whenever a reference model is involved.
DEVIATION_METRICS = ("deviation", "rewards", "logps/policy", "logps/ref")
#: Logged by the dynamic-coefficient stages (minorsft, sft_dpo) only.
COEF_METRICS = ("coef", "coef_below_0.01", "coef_std")
#: A logged spread: its sums hold the squares of the named metric, and the log shows the population std over samples.
SPREADS = {"coef_std": "coef"}
#: Logged by SFT-GO.
GROUP_METRICS = ("group_loss/important", "group_loss/unimportant", "worst_group/important")
#: A sample whose coefficient is below this has practically stopped training (its gradient is scaled by < 1 %).
SWITCHED_OFF_COEF = 0.01


def _pairs(values: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
    """Interleave each sample's value and count (0 where not ``present``) of each metric: (samples, 2 × metrics)."""
    pairs = []
    for value, mask in zip(values, present):
        pairs += [torch.where(mask, value.double(), torch.zeros_like(value, dtype=torch.float64)), mask.double()]
    return torch.stack(pairs, dim=-1)


def deviation_pairs(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float
) -> torch.Tensor:
    """``DEVIATION_METRICS`` over the valid samples: (1/m_i)·r_i (Eq. 8), β·r_i and the summed answer log-probs."""
    valid = num_tokens > 0
    policy_logps, ref_logps = policy_logps.detach(), ref_logps.detach()
    values = [
        normalized_log_ratio(policy_logps, ref_logps, num_tokens),
        beta * log_ratio(policy_logps, ref_logps),
        policy_logps.float(),
        floored_ref_logps(ref_logps),
    ]
    return _pairs(values, [valid] * len(values))


def coef_pairs(coef: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Pairs of ``COEF_METRICS``.

    ``COEF_METRICS``: the dynamic coefficient, 1 where it is below 0.01 (the share of samples that have practically
    stopped training: long, well-fit answers reach it without any warning), and its square (``coef_std``, the
    coefficient's spread over the samples, which shows how unevenly the samples are weighted).
    """
    valid = num_tokens > 0
    coef = coef.detach().double()
    return _pairs([coef, (coef < SWITCHED_OFF_COEF).double(), coef.square()], [valid] * 3)


def group_pairs(
    important: torch.Tensor, unimportant: torch.Tensor, worst_is_important: torch.Tensor, num_tokens: torch.Tensor
) -> torch.Tensor:
    """Pairs of ``GROUP_METRICS``.

    ``GROUP_METRICS``: each group's mean token NLL over the samples where it is not empty (NaN marks an empty
    group), and the share of valid samples whose worst (higher-loss) group is the important one.
    """
    valid = num_tokens > 0
    present = [~torch.isnan(important) & valid, ~torch.isnan(unimportant) & valid, valid]
    values = [important.nan_to_num(0.0), unimportant.nan_to_num(0.0), worst_is_important.float()]
    return _pairs(values, present)


def metric_means(names: tuple[str, ...], sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Logged means of (all-reduced) sums; a metric without any sample is left out.

    A ``SPREADS`` metric is the population std, sqrt(E[x²] − E[x]²), of the metric it names.
    """
    values = sums.tolist()
    means = {name: values[2 * i] / values[2 * i + 1] for i, name in enumerate(names) if values[2 * i + 1] > 0}
    for name, of in SPREADS.items():
        if name in means:
            means[name] = max(means[name] - means[of] ** 2, 0.0) ** 0.5
    return {f"{prefix}{name}": value for name, value in means.items()}
