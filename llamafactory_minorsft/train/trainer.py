"""Trainer of this package's stages: LLaMA-Factory's SFT trainer with a reference model and per-sample losses.

``CustomSeq2SeqTrainer`` already prepares a ``ref_model`` for DeepSpeed, FSDP or plain accelerate the way
DPO does; we override ``compute_loss`` (TRL style: log-probs → loss function → metrics) and keep the
loss normalisation exact under gradient accumulation and data parallelism.
"""

import gc
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Optional

import torch
from tqdm import tqdm
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from trl.trainer import disable_dropout_in_model
from typing_extensions import override

from .. import NEW_STAGES, SFT_GO_STAGE
from ..losses import IGNORE_INDEX, answer_token_logps, minorsft_loss, sft_dpo_loss, sft_sample_loss
from ..metrics import COEF_METRICS, DEVIATION_SUMS_SIZE, GROUP_SUMS_SIZE, group_means, group_sums, metric_means, metric_sums
from ..sft_go import (
    batch_worst_group,
    group_losses,
    rho1_scores,
    scheduled_lambda,
    sft_go_objective,
    tfidf_scores,
    top_fraction_mask,
)
from .columns import EXTRA_COLUMNS, REF_LOGPS, REF_TOKEN_LOGPS, TOKEN_IMPORTANCE, answer_values


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..hparams import ReferenceSFTFinetuningArguments


LOSS_FUNCTIONS = {"minorsft": minorsft_loss, "sft_dpo": sft_dpo_loss}


def disable_dropout(model: torch.nn.Module) -> None:
    """TRL's ``disable_dropout_in_model`` (``nn.Dropout`` modules), plus the attention dropout that Hugging Face
    attention layers keep as a float attribute (Qwen2, Llama: ``attention_dropout``), which TRL's leaves on.
    The saved config is untouched."""
    disable_dropout_in_model(model)
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Run ``module`` in eval mode (no dropout), then give it back its train/eval mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def count_answered_samples(batch_samples: list[dict[str, torch.Tensor]]) -> int:
    """Number of samples with at least one answer token (after the causal shift) in a list of batches."""
    return sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).any(-1).sum()) for batch in batch_samples)


class ReferenceSFTTrainer(CustomSeq2SeqTrainer):
    r"""SFT trainer for `minorsft`, `sft_dpo`, `sft_go` and `sft` + `track_deviation` / `sft_loss_reduction: sample`.

    Loss normalisation (minorsft, sft_dpo, sft_go, sft with sample reduction): the loss of a micro-batch is Σ_i L_i / N · P, where N is the
    number of valid samples in the whole global batch (all accumulation steps, all P processes, counted in
    ``get_batch_samples``). Gradient accumulation sums the micro-batches and data parallelism averages the
    processes, so the update is that of the mean over the global batch, as one big batch would give.
    """

    def __init__(
        self,
        finetuning_args: "ReferenceSFTFinetuningArguments",
        ref_model: Optional["PreTrainedModel"] = None,
        idf: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> None:
        super().__init__(finetuning_args=finetuning_args, **kwargs)
        self.ref_model = self._prepare_reference(ref_model)
        self.loss_type = finetuning_args.stage  # "minorsft", "sft_dpo", "sft_go", or "sft"
        if self.loss_type in LOSS_FUNCTIONS:
            # as LLaMA-Factory's DPO trainer (`disable_dropout=True`): the log-ratio r compares πθ and πref under
            # the same deterministic forward (r = 0 at the first LoRA step); the reference is always in eval mode
            disable_dropout(self.model)
        # per-sample losses averaged over the global batch's samples; plain "sft" keeps the stock token mean
        self.per_sample = self.loss_type in NEW_STAGES or finetuning_args.sample_mean_sft
        self.beta = finetuning_args.pref_beta
        self.uses_reference = finetuning_args.needs_reference
        self.go_args = finetuning_args  # sft_go_* options
        self.idf = idf  # SFT-GO TF-IDF grouping: idf of every token id over the training answers
        if self.per_sample:
            # compute_loss normalises by the global batch itself, so the Trainer must neither divide by the
            # accumulation steps (it does when this is False) nor let the model average the loss.
            self.model_accepts_loss_kwargs = True

        self.precomputed_reference = False
        self._num_answered_samples: Optional[torch.Tensor] = None
        self._train_lambda: Optional[float] = None
        self._stored_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        # every process logs the same metric groups, so their all-reduce in ``log`` is collective-safe
        self._metric_groups = {"deviation": DEVIATION_SUMS_SIZE} if self.uses_reference else {}
        if self.loss_type == SFT_GO_STAGE:
            self._metric_groups["groups"] = GROUP_SUMS_SIZE

    def _prepare_reference(self, ref_model: Optional["PreTrainedModel"]) -> Optional[torch.nn.Module]:
        """Prepare the frozen reference as LLaMA-Factory's DPO trainer does: sharded by DeepSpeed or FSDP, else
        placed by accelerate in eval mode. Done here because LLaMA-Factory 0.9.4's SFT trainer takes no reference."""
        if ref_model is None:
            return None

        if self.is_deepspeed_enabled:
            if getattr(ref_model, "is_loaded_in_8bit", False) or getattr(ref_model, "is_loaded_in_4bit", False):
                return ref_model  # quantized models are already on their device

            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(ref_model, self.accelerator)

        if self.is_fsdp_enabled:
            if self.accelerator.is_fsdp2:
                from accelerate.utils.fsdp_utils import fsdp2_prepare_model

                return fsdp2_prepare_model(self.accelerator, ref_model)

            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(ref_model, self.accelerator)

        return self.accelerator.prepare_model(ref_model, evaluation_mode=True).eval()

    @override
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.per_sample:
            count = torch.tensor(count_answered_samples(batch_samples), device=device, dtype=torch.float32)
            if self.accelerator.num_processes > 1:
                count = self.accelerator.reduce(count, reduction="sum")

            self._num_answered_samples = count

        return batch_samples, num_items_in_batch

    @torch.no_grad()
    def compute_reference_logps(self, dataset, desc: str, per_token: bool = False) -> dict[str, torch.Tensor]:
        """One no-grad pass of the reference over ``dataset`` in order.

        Returns the summed answer log-probs ``logps`` and answer lengths ``num_tokens`` per sample, and with
        ``per_token`` also ``token_logps``: every answer token's log-prob, flat in sample order. Batched by
        ``per_device_eval_batch_size`` through the trainer's own (distributed) eval loader; every process
        returns the values of the whole data set.
        """
        dataloader = self.get_eval_dataloader(dataset)
        logps, num_tokens, token_logps = [], [], []
        model = self.model  # only used (adapters disabled) when there is no separate reference
        for batch in tqdm(dataloader, desc=desc, disable=not self.is_local_process_zero()):
            batch = self._prepare_inputs(batch)
            labels = batch["labels"]
            model_inputs = {key: value for key, value in batch.items() if key not in ("labels",) + EXTRA_COLUMNS}
            batch_token_logps, mask = self.reference_token_logps(model, model_inputs, labels)
            logps.append(self.accelerator.gather_for_metrics(batch_token_logps.sum(-1)).cpu())
            num_tokens.append(self.accelerator.gather_for_metrics(mask.sum(-1)).cpu())
            if per_token:  # rows of different lengths on each process: pad to a common length, then gather
                padded = self.accelerator.pad_across_processes(batch_token_logps, dim=1)
                padded_mask = self.accelerator.pad_across_processes(mask.long(), dim=1)
                gathered = self.accelerator.gather_for_metrics((padded, padded_mask))
                token_logps += [row[row_mask.bool()].cpu() for row, row_mask in zip(*gathered)]

        values = {"logps": torch.cat(logps)[: len(dataset)], "num_tokens": torch.cat(num_tokens)[: len(dataset)]}
        if per_token:
            values["token_logps"] = torch.cat(token_logps[: len(dataset)]) if token_logps else torch.zeros(0)
        return values

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
    def reference_token_logps(
        self, model: "PreTrainedModel", model_inputs: dict, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log πref of each answer token and the answer mask: the frozen ``ref_model``, or the policy without adapters."""
        if self.ref_model is None:  # LoRA: the base model with the adapters disabled, no second copy
            ref_model, ref_context = model, self.accelerator.unwrap_model(model).disable_adapter()
        else:
            ref_model, ref_context = self.ref_model, nullcontext()

        with ref_context, eval_mode(ref_model):  # a reference never uses dropout (the policy's is on in training)
            logits = ref_model(**model_inputs, use_cache=False).logits

        return answer_token_logps(logits, labels)

    def _reference(self, model, model_inputs: dict, inputs: dict, labels: torch.Tensor, mask: torch.Tensor):
        """(per-token log πref or None, summed log πref): precomputed columns, or a reference forward."""
        need_tokens = self.loss_type == SFT_GO_STAGE and self.go_args.sft_go_grouping == "rho1"
        if not self.precomputed_reference:
            ref_token_logps, _ = self.reference_token_logps(model, model_inputs, labels)
            return ref_token_logps, ref_token_logps.sum(-1)

        needed = (REF_LOGPS, REF_TOKEN_LOGPS) if need_tokens else (REF_LOGPS,)
        if any(name not in inputs for name in needed):
            raise RuntimeError("precompute_ref_logps: a batch came without its precomputed reference log-probs.")
        ref_token_logps = answer_values(inputs[REF_TOKEN_LOGPS], mask, REF_TOKEN_LOGPS) if need_tokens else None
        return ref_token_logps, inputs[REF_LOGPS].float()

    def current_lambda(self) -> float:
        """SFT-GO's λ at this step of training (its schedule runs over ``max_steps``)."""
        args = self.go_args
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 0.0
        return scheduled_lambda(args.sft_go_lambda, args.sft_go_lambda_min, args.sft_go_lambda_schedule, progress)

    def _important_tokens(self, inputs, labels, token_logps, mask, ref_token_logps) -> torch.Tensor:
        grouping = self.go_args.sft_go_grouping
        if grouping == "tfidf":
            scores = tfidf_scores(labels[:, 1:], mask, self.idf)
        elif grouping == "rho1":
            scores = rho1_scores(token_logps, ref_token_logps)
        else:  # llmlingua2: keep-probabilities computed before training
            if TOKEN_IMPORTANCE not in inputs:
                raise RuntimeError("sft_go llmlingua2: a batch came without its token importance column.")
            scores = answer_values(inputs[TOKEN_IMPORTANCE], mask, TOKEN_IMPORTANCE)

        return top_fraction_mask(scores, mask, self.go_args.sft_go_eta)

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key not in ("labels",) + EXTRA_COLUMNS}
        train_eval = "train" if model.training else "eval"
        if self.loss_type == SFT_GO_STAGE or not self.per_sample:
            # the stock SFT loss (token mean): untouched for sft + track_deviation, SFT-GO's CE term
            stock_inputs = {key: value for key, value in inputs.items() if key not in EXTRA_COLUMNS}
            loss, outputs = super().compute_loss(
                model, stock_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            logits = outputs.logits if self.loss_type == SFT_GO_STAGE else outputs.logits.detach()
            token_logps, mask = answer_token_logps(logits, labels)
        else:
            outputs = model(**model_inputs, use_cache=False)
            token_logps, mask = answer_token_logps(outputs.logits, labels)

        policy_logps, num_tokens = token_logps.sum(-1), mask.sum(-1)
        ref_token_logps = ref_logps = None
        if self.uses_reference:
            ref_token_logps, ref_logps = self._reference(model, model_inputs, inputs, labels, mask)

        if self.per_sample:  # Σ_i L_i / denominator: the mean over the global batch's valid samples
            if train_eval == "train" and self._num_answered_samples is not None:
                denominator = self._num_answered_samples.clamp(min=1) / self.accelerator.num_processes
            else:  # evaluation: the mean over this batch's valid samples
                denominator = (num_tokens > 0).sum().clamp(min=1)

        coef = torch.ones_like(policy_logps)
        if self.loss_type in LOSS_FUNCTIONS:
            losses, coef = LOSS_FUNCTIONS[self.loss_type](policy_logps, ref_logps, num_tokens, self.beta)
            loss = losses.sum() / denominator
        elif self.loss_type == "sft" and self.per_sample:
            loss = sft_sample_loss(policy_logps, num_tokens).sum() / denominator
        elif self.loss_type == SFT_GO_STAGE:
            important = self._important_tokens(inputs, labels, token_logps, mask, ref_token_logps)
            lam = self.current_lambda()
            if train_eval == "train":
                self._train_lambda = lam  # logged as used, not as of the next step
            groups = group_losses(token_logps, mask, important)
            if self.go_args.sft_go_group_reduction == "sample":
                worst = groups.worst.sum() / denominator
            else:  # each micro-batch of each process is one Group DRO mini-batch, weighted by its valid samples
                worst = batch_worst_group(token_logps, mask, important) * (num_tokens > 0).sum() / denominator
            loss = sft_go_objective(loss, worst, lam)
            self._store_sums(train_eval, "groups", group_sums(*groups[1:], num_tokens))

        if self.uses_reference:
            self._store_sums(train_eval, "deviation", metric_sums(policy_logps, ref_logps, num_tokens, coef, self.beta))
        return (loss, outputs) if return_outputs else loss

    def _store_sums(self, train_eval: str, group: str, sums: torch.Tensor) -> None:
        stored = self._stored_sums[train_eval].get(group)
        self._stored_sums[train_eval][group] = sums if stored is None else stored + sums

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        r"""Add the means of the stored metrics since the last log (all processes reduced) to ``logs``."""
        train_eval = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if train_eval is not None and self._metric_groups:
            stored = self._stored_sums[train_eval]
            self._stored_sums[train_eval] = {}
            sums = torch.cat([
                stored.get(group, torch.zeros(size, dtype=torch.float64)).double().cpu()
                for group, size in self._metric_groups.items()
            ]).to(self.accelerator.device)  # fmt: skip
            if self.accelerator.num_processes > 1:  # one reduce for every metric
                sums = self.accelerator.reduce(sums, reduction="sum")

            prefix = "eval_" if train_eval == "eval" else ""
            parts = dict(zip(self._metric_groups, sums.cpu().split(list(self._metric_groups.values()))))
            if "deviation" in parts:
                means = metric_means(parts["deviation"], prefix=prefix)
                if self.loss_type not in LOSS_FUNCTIONS:  # no dynamic coefficient in sft / sft_go
                    means = {key: value for key, value in means.items() if key[len(prefix) :] not in COEF_METRICS}
                logs.update(means)
            if "groups" in parts:
                logs.update(group_means(parts["groups"], prefix=prefix))
                if train_eval == "train" and self._train_lambda is not None:
                    logs["sft_go_lambda"] = self._train_lambda

        return super().log(logs, *args, **kwargs)
