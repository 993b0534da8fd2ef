"""Trainer of the reference-aware stages: LLaMA-Factory's SFT trainer with a reference model.

``CustomSeq2SeqTrainer`` already prepares a ``ref_model`` for DeepSpeed, FSDP or plain accelerate the way
DPO does; we override ``compute_loss`` (TRL style: log-probs → loss function → metrics) and keep the
loss normalisation exact under gradient accumulation and data parallelism.
"""

import gc
from contextlib import nullcontext
from typing import TYPE_CHECKING, Optional

import torch
from tqdm import tqdm
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from typing_extensions import override

from .. import REFERENCE_SFT_STAGES
from ..losses import IGNORE_INDEX, answer_logps, minorsft_loss, sft_dpo_loss
from ..metrics import METRIC_NAMES, metric_means, metric_sums


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..hparams import ReferenceSFTFinetuningArguments


LOSS_FUNCTIONS = {"minorsft": minorsft_loss, "sft_dpo": sft_dpo_loss}
REF_LOGPS = "ref_logps"  # the batch key of precomputed log πref(y|x)


def count_answered_samples(batch_samples: list[dict[str, torch.Tensor]]) -> int:
    """Number of samples with at least one answer token (after the causal shift) in a list of batches."""
    return sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).any(-1).sum()) for batch in batch_samples)


class ReferenceSFTTrainer(CustomSeq2SeqTrainer):
    r"""SFT trainer for `minorsft`, `sft_dpo` and `sft` + `track_deviation`.

    Loss normalisation (minorsft, sft_dpo): the loss of a micro-batch is Σ_i L_i / N · P, where N is the
    number of valid samples in the whole global batch (all accumulation steps, all P processes, counted in
    ``get_batch_samples``). Gradient accumulation sums the micro-batches and data parallelism averages the
    processes, so the update is that of the mean over the global batch, as one big batch would give.
    """

    def __init__(
        self,
        finetuning_args: "ReferenceSFTFinetuningArguments",
        ref_model: Optional["PreTrainedModel"] = None,
        **kwargs,
    ) -> None:
        super().__init__(finetuning_args=finetuning_args, ref_model=ref_model, **kwargs)
        self.loss_type = finetuning_args.stage  # "minorsft", "sft_dpo", or "sft" (stock loss, metrics only)
        self.beta = finetuning_args.pref_beta
        if self.loss_type in REFERENCE_SFT_STAGES:
            # compute_loss normalises by the global batch itself, so the Trainer must neither divide by the
            # accumulation steps (it does when this is False) nor let the model average the loss.
            self.model_accepts_loss_kwargs = True

        self.precomputed_reference = False
        self._num_answered_samples: Optional[torch.Tensor] = None
        self._stored_sums: dict[str, Optional[torch.Tensor]] = {"train": None, "eval": None}

    @override
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.loss_type in REFERENCE_SFT_STAGES:
            count = torch.tensor(count_answered_samples(batch_samples), device=device, dtype=torch.float32)
            if self.accelerator.num_processes > 1:
                count = self.accelerator.reduce(count, reduction="sum")

            self._num_answered_samples = count

        return batch_samples, num_items_in_batch

    @torch.no_grad()
    def compute_reference_logps(self, dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad pass of the reference over ``dataset`` in order: (summed answer logps, m) per sample.

        Batched by ``per_device_eval_batch_size`` through the trainer's own (distributed) eval loader; every
        process returns the values of the whole data set.
        """
        dataloader = self.get_eval_dataloader(dataset)
        logps, num_tokens = [], []
        model = self.model  # only used (adapters disabled) when there is no separate reference
        was_training = model.training
        model.eval()  # no dropout in the reference pass
        for batch in tqdm(dataloader, desc=desc, disable=not self.is_local_process_zero()):
            batch = self._prepare_inputs(batch)
            labels = batch["labels"]
            model_inputs = {key: value for key, value in batch.items() if key not in ("labels", REF_LOGPS)}
            batch_logps = self.reference_logps(model, model_inputs, labels)
            batch_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
            logps.append(self.accelerator.gather_for_metrics(batch_logps).cpu())
            num_tokens.append(self.accelerator.gather_for_metrics(batch_tokens).cpu())

        model.train(was_training)
        return torch.cat(logps)[: len(dataset)], torch.cat(num_tokens)[: len(dataset)]

    def release_reference(self) -> None:
        """Free the reference model once its log-probs are precomputed: training then holds the policy only."""
        if self.ref_model is not None and hasattr(self.ref_model, "destroy"):
            self.ref_model.destroy()  # a DeepSpeed engine

        self.ref_model = None
        self.precomputed_reference = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def reference_logps(self, model: "PreTrainedModel", model_inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """log πref(y|x) summed over answer tokens: the frozen ``ref_model``, or the policy without adapters."""
        if self.ref_model is None:  # LoRA: the base model with the adapters disabled, no second copy
            ref_model, ref_context = model, self.accelerator.unwrap_model(model).disable_adapter()
        else:
            ref_model, ref_context = self.ref_model, nullcontext()

        with ref_context:
            logits = ref_model(**model_inputs, use_cache=False).logits

        return answer_logps(logits, labels).logps

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key not in ("labels", REF_LOGPS)}
        train_eval = "train" if model.training else "eval"
        if self.loss_type == "sft":  # track_deviation: the stock SFT loss, untouched
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            policy = answer_logps(outputs.logits.detach(), labels)
            coef = torch.ones_like(policy.logps)
        else:
            outputs = model(**model_inputs, use_cache=False)
            policy = answer_logps(outputs.logits, labels)

        if self.precomputed_reference:
            if REF_LOGPS not in inputs:
                raise RuntimeError("precompute_ref_logps: a batch came without precomputed reference log-probs.")
            ref_logps = inputs[REF_LOGPS].float()
        else:
            ref_logps = self.reference_logps(model, model_inputs, labels)

        if self.loss_type != "sft":
            losses, coef = LOSS_FUNCTIONS[self.loss_type](policy.logps, ref_logps, policy.num_tokens, self.beta)
            if train_eval == "train" and self._num_answered_samples is not None:
                denominator = self._num_answered_samples.clamp(min=1) / self.accelerator.num_processes
            else:  # evaluation: the mean over this batch's valid samples
                denominator = (policy.num_tokens > 0).sum().clamp(min=1)

            loss = losses.sum() / denominator

        self._store_sums(train_eval, metric_sums(policy.logps, ref_logps, policy.num_tokens, coef, self.beta))
        return (loss, outputs) if return_outputs else loss

    def _store_sums(self, train_eval: str, sums: torch.Tensor) -> None:
        stored = self._stored_sums[train_eval]
        self._stored_sums[train_eval] = sums if stored is None else stored + sums

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        r"""Add the means of the stored metrics since the last log (all processes reduced) to ``logs``."""
        train_eval = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if train_eval is not None:  # every process logs the same keys, so the reduce below is collective-safe
            sums = self._stored_sums[train_eval]
            self._stored_sums[train_eval] = None
            sums = sums if sums is not None else torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64)
            sums = sums.to(self.accelerator.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")

            means = metric_means(sums.cpu(), prefix="eval_" if train_eval == "eval" else "")
            if self.loss_type == "sft":  # no dynamic coefficient in plain SFT
                means = {key: value for key, value in means.items() if not key.endswith("coef")}

            logs.update(means)

        return super().log(logs, *args, **kwargs)
