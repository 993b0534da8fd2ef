"""Trainer of `stage: minorsft` (Eq. 7) and `stage: sft_dpo` (Eq. 3): per-sample losses with a dynamic coefficient."""

import torch
from trl.trainer import disable_dropout_in_model
from typing_extensions import override

from ...losses import minorsft_loss, sft_dpo_loss
from ..metrics import COEF_METRICS, coef_pairs
from ..trainer import BaseSFTTrainer, Batch


LOSS_FUNCTIONS = {"minorsft": minorsft_loss, "sft_dpo": sft_dpo_loss}


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn every dropout of ``model`` off, attention dropout included.

    TRL's ``disable_dropout_in_model`` (``nn.Dropout`` modules), plus the attention dropout that Hugging Face
    attention layers keep as a float attribute (Qwen2, Llama: ``attention_dropout``), which TRL's leaves on.
    The saved config is untouched.
    """
    disable_dropout_in_model(model)
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class MinorSFTTrainer(BaseSFTTrainer):
    r"""MinorSFT and SFT using DPO: L_i from the log-ratio r_i = log πθ(y_i|x_i) − log πref(y_i|x_i)."""

    def __init__(self, finetuning_args, **kwargs) -> None:
        super().__init__(finetuning_args=finetuning_args, **kwargs)
        self.loss_function = LOSS_FUNCTIONS[finetuning_args.stage]
        self.metric_groups["coef"] = COEF_METRICS
        # as LLaMA-Factory's DPO trainer (`disable_dropout=True`): r compares πθ and πref under the same
        # deterministic forward (r = 0 at the first LoRA step); the reference is always in eval mode
        disable_dropout(self.model)

    @override
    def sample_losses(self, logps: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss_function(logps, batch.ref_logps, batch.num_tokens, self.beta)[0]

    @override
    def store_batch_metrics(self, batch: Batch) -> None:
        super().store_batch_metrics(batch)
        coef = self.loss_function(batch.logps.detach(), batch.ref_logps, batch.num_tokens, self.beta)[1]
        self.store_metrics("coef", coef_pairs(coef, batch.num_tokens), batch)
