"""Trainer of `stage: sft` with `track_deviation` or `sft_loss_reduction: sample`."""

import torch
from typing_extensions import override

from ...losses import sft_sample_loss
from ..trainer import BaseSFTTrainer, Batch


class SFTTrainer(BaseSFTTrainer):
    r"""Stock SFT with the deviation metric, or with Eq. 5's sample mean.

    Stock SFT with the deviation metric beside it (`track_deviation`), and/or each sample's mean token NLL
    averaged over samples (`sft_loss_reduction: sample`, Eq. 5) instead of the stock token mean.
    """

    def __init__(self, finetuning_args, **kwargs) -> None:
        sample_mean = finetuning_args.sft_loss_reduction == "sample"
        self.per_sample = sample_mean
        self.uses_stock_loss = not sample_mean  # the stock token mean; log-probs only feed the metrics
        self.logps_need_grad = sample_mean
        super().__init__(finetuning_args=finetuning_args, **kwargs)

    @override
    def sample_losses(self, logps: torch.Tensor, batch: Batch) -> torch.Tensor:
        return sft_sample_loss(logps, batch.num_tokens)

    @override
    def batch_loss(self, batch: Batch) -> torch.Tensor:
        return super().batch_loss(batch) if self.per_sample else self.token_mean_loss(batch)
