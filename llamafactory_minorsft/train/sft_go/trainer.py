"""Trainer of `stage: sft_go`: L = (1 − λ)·CE + λ·max(L_important, L_unimportant), arXiv 2506.15021."""

from typing import Optional

import torch
from typing_extensions import override

from ...sft_go import (
    batch_worst_group,
    group_losses,
    rho1_scores,
    scheduled_lambda,
    sft_go_objective,
    tfidf_scores,
    top_fraction_mask,
)
from ..columns import TOKEN_IMPORTANCE, answer_values
from ..metrics import GROUP_METRICS, group_pairs
from ..trainer import BaseSFTTrainer, Batch


class SFTGOTrainer(BaseSFTTrainer):
    r"""SFT-GO: CE is the stock token-mean loss, so λ = 0 is stock SFT (up to float32 rounding on the fused path)."""

    uses_stock_loss = True

    def __init__(self, finetuning_args, idf: Optional[torch.Tensor] = None, **kwargs) -> None:
        super().__init__(finetuning_args=finetuning_args, **kwargs)
        self.go_args = finetuning_args  # sft_go_* options
        self.idf = idf  # TF-IDF grouping: idf of every token id over the training answers
        self.metric_groups["groups"] = GROUP_METRICS
        self._lambda = 0.0
        self._train_lambda: Optional[float] = None

    def current_lambda(self) -> float:
        """λ at this step of training (its schedule runs over ``max_steps``)."""
        args = self.go_args
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 0.0
        return scheduled_lambda(args.sft_go_lambda, args.sft_go_lambda_min, args.sft_go_lambda_schedule, progress)

    def important_tokens(self, batch: Batch) -> torch.Tensor:
        """The important group: the top η fraction of each answer's tokens by the grouping's scores."""
        grouping = self.go_args.sft_go_grouping
        if grouping == "tfidf":
            scores = tfidf_scores(batch.labels[:, 1:], batch.mask, self.idf)
        elif grouping == "rho1":
            scores = rho1_scores(batch.token_logps, batch.ref_token_logps)
        else:  # llmlingua2: keep-probabilities computed before training
            if TOKEN_IMPORTANCE not in batch.inputs:
                raise RuntimeError("sft_go llmlingua2: a batch came without its token importance column.")
            scores = answer_values(batch.inputs[TOKEN_IMPORTANCE], batch.mask, TOKEN_IMPORTANCE)

        return top_fraction_mask(scores, batch.mask, self.go_args.sft_go_eta)

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._lambda = self.current_lambda()  # once per batch: ``batch_loss`` may run once per sample
        if model.training:
            self._train_lambda = self._lambda  # logged as used, not as of the next step
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @override
    def batch_loss(self, batch: Batch) -> torch.Tensor:
        important = self.important_tokens(batch)
        if self.go_args.sft_go_group_reduction == "sample":
            worst = group_losses(batch.token_logps, batch.mask, important).worst.sum() / self.denominator(batch)
        else:  # each micro-batch of each process is one Group DRO mini-batch, weighted by its valid samples
            worst = batch_worst_group(batch.token_logps, batch.mask, important)
            worst = worst * (batch.num_tokens > 0).sum() / self.denominator(batch)

        return sft_go_objective(self.token_mean_loss(batch), worst, self._lambda)

    @override
    def store_batch_metrics(self, batch: Batch) -> None:
        super().store_batch_metrics(batch)
        groups = group_losses(batch.token_logps.detach(), batch.mask, self.important_tokens(batch))
        self.store_metrics("groups", group_pairs(*groups[1:], batch.num_tokens), batch)

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._train_lambda is not None:
            logs["sft_go_lambda"] = self._train_lambda
        return super().log(logs, *args, **kwargs)
