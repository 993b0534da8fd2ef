"""Base trainer of this package's stages: LLaMA-Factory's SFT trainer with an optional reference model.

``CustomSeq2SeqTrainer`` already prepares a ``ref_model`` for DeepSpeed, FSDP or plain accelerate the way DPO
does. The base adds what every stage shares: the reference forward (or its precomputed columns), the
normalisation over the global batch, and the metric sums. Each stage's trainer (``minorsft/``, ``sft_go/``,
``sft/``) implements ``batch_loss`` or its per-sample hook ``sample_losses``, TRL style: log-probs in, loss out.
"""

import gc
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
from llamafactory.extras import logging
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from torch.utils.data import DataLoader, SequentialSampler
from tqdm import tqdm
from typing_extensions import override

from ..losses import IGNORE_INDEX, answer_token_logps, fused_answer_loss, projected_token_logps
from . import reference_cache
from .columns import NON_MODEL_KEYS, REF_LOGPS, REF_TOKEN_LOGPS, add_reference_columns, answer_values
from .head import PLAIN_HEAD_MODEL_TYPES, head_computes, plain_head
from .metrics import DEVIATION_METRICS, deviation_pairs, metric_means
from .packing import SAMPLE_IDS, Samples, count_packed_answered, samples_per_row, unpacked


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..hparams import PluginFinetuningArguments


#: the stored sums (Σ L_i, answered samples) of an evaluation's per-sample losses
EVAL_LOSS = "eval_loss"
# under LLaMA-Factory's root logger: its format, its level, its web UI log
logger = logging.get_logger(f"llamafactory.{__name__}")


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
    """Number of samples with at least one answer token (after the causal shift) in a list of batches.

    A packed row (`neat_packing`) counts its samples.
    """
    return sum(
        count_packed_answered(batch["labels"], batch[SAMPLE_IDS])
        if SAMPLE_IDS in batch
        else int((batch["labels"][:, 1:] != IGNORE_INDEX).any(-1).sum())
        for batch in batch_samples
    )


@dataclass
class Batch:
    """What a stage's loss sees of one micro-batch: one row per sample; per-sample tensors have shape (batch,).

    A packed batch (`neat_packing`) is seen as its samples (``samples``): ``labels``, ``token_logps``, ``mask`` and the
    reference's values have a row per sample, as the same samples unpacked would give them; ``inputs`` stays packed.
    """

    inputs: dict[str, torch.Tensor]  # the collated batch, with its extra columns
    labels: torch.Tensor
    token_logps: torch.Tensor  # log πθ of each answer token, (batch, length − 1)
    mask: torch.Tensor  # the answer tokens, (batch, length − 1)
    training: bool
    stock_loss: Optional[torch.Tensor] = None  # the stock token-mean loss, where ``uses_stock_loss`` (stock path)
    num_items: Optional[torch.Tensor] = None  # what the stock token mean divides by (fused path)
    ref_token_logps: Optional[torch.Tensor] = None  # log πref of each answer token (online, or precomputed for Rho-1)
    ref_logps: Optional[torch.Tensor] = None  # log πref(y|x), where a reference model is involved
    samples: Optional[Samples] = None  # where the samples of packed rows lie

    @classmethod
    def of(cls, inputs: dict, token_logps: Optional[torch.Tensor], mask: torch.Tensor, training: bool, **fields):
        """From (rows, length − 1) token log-probs (None: filled in later) and answer mask of the collated batch."""
        if SAMPLE_IDS not in inputs:
            return cls(inputs, inputs["labels"], token_logps, mask, training, **fields)

        samples = Samples.of(inputs[SAMPLE_IDS])
        labels, mask = samples.labels(inputs["labels"]), samples.take(mask, fill=False)
        token_logps = samples.take(token_logps) if token_logps is not None else None
        return cls(inputs, labels, token_logps, mask, training, samples=samples, **fields)

    def per_sample(self, values: torch.Tensor) -> torch.Tensor:
        """A (rows, length − 1) tensor of the collated batch, one row per sample."""
        return values if self.samples is None else self.samples.take(values)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """A (samples, …) tensor summed over the samples of each row of the collated batch."""
        return values if self.samples is None else self.samples.row_sums(values)

    @property
    def logps(self) -> torch.Tensor:
        return self.token_logps.sum(-1)

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.mask.sum(-1)


class BaseSFTTrainer(CustomSeq2SeqTrainer):
    r"""The stages' shared trainer.

    Loss normalisation (``per_sample``): the loss of a micro-batch is Σ_i L_i / N · P, where N is the number of
    valid samples in the whole global batch (all accumulation steps, all P processes, counted in
    ``get_batch_samples``). Gradient accumulation sums the micro-batches and data parallelism averages the
    processes, so the update is that of the mean over the global batch, as one big batch would give.
    """

    per_sample = True  # losses are per-sample means over the global batch; False keeps the stock token mean
    uses_stock_loss = False  # the loss has the stock token-mean cross-entropy in it (``token_mean_loss``)
    logps_need_grad = True  # False: the answer log-probs only feed metrics

    def __init__(
        self,
        finetuning_args: "PluginFinetuningArguments",
        ref_model: Optional["PreTrainedModel"] = None,
        packed: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(finetuning_args=finetuning_args, **kwargs)
        self.ref_model = self._prepare_reference(ref_model)
        self.beta = finetuning_args.pref_beta
        self.uses_reference = finetuning_args.uses_reference
        self.needs_token_ref_logps = finetuning_args.needs_token_ref_logps
        if self.per_sample:
            # compute_loss normalises by the global batch itself, so the Trainer must neither divide by the
            # accumulation steps (it does when this is False) nor let the model average the loss.
            self.model_accepts_loss_kwargs = True

        self.precomputed_reference = False
        self.packed = packed
        self._path_logged = False
        self._num_answered_samples: Optional[torch.Tensor] = None
        self._stored_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._eval_rows: dict[str, torch.Tensor] = {}  # this eval batch's per-row pairs, until gathered
        # group → metric names; every process logs the same groups, so their all-reduce in ``log`` is collective-safe
        self.metric_groups: dict[str, tuple[str, ...]] = (
            {"deviation": DEVIATION_METRICS} if self.uses_reference else {}
        )

    def _prepare_reference(self, ref_model: Optional["PreTrainedModel"]) -> Optional[torch.nn.Module]:
        """Prepare the frozen reference as LLaMA-Factory's DPO trainer does.

        Prepare the frozen reference as LLaMA-Factory's DPO trainer does: sharded by DeepSpeed or FSDP, else
        placed by accelerate in eval mode. Done here because LLaMA-Factory 0.9.4's SFT trainer takes no reference.
        """
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
    def reference_token_logps(
        self, model: "PreTrainedModel", model_inputs: dict, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log πref of each answer token and the answer mask: the frozen ``ref_model``, or the policy without adapters."""
        if self.ref_model is None:  # LoRA: the base model with the adapters disabled, no second copy
            ref_model, ref_context = model, self.accelerator.unwrap_model(model).disable_adapter()
        else:
            ref_model, ref_context = self.ref_model, nullcontext()

        with ref_context, eval_mode(ref_model):  # a reference never uses dropout (the policy's is on in training)
            if not (self.head_free(model) and plain_head(ref_model) is not None):
                return answer_token_logps(ref_model(**model_inputs, use_cache=False).logits, labels)

            with head_computes(ref_model, lambda hidden, weight: projected_token_logps(hidden, weight, labels)[0]):
                token_logps = ref_model(**model_inputs, use_cache=False).logits  # the head's answer log-probs
            return token_logps, labels[:, 1:] != IGNORE_INDEX

    def in_order_loader(self, dataset) -> DataLoader:
        """The trainer's eval loader over ``dataset``, in the data set's order and with every sample.

        The reference pass attaches its values by position: a length-grouped sampler (``group_by_length``) or
        ``dataloader_drop_last`` must not reach it.
        """
        drop_last = self.args.dataloader_drop_last
        self._get_eval_sampler = SequentialSampler  # an instance attribute shadows the method, for this loader only
        self.args.dataloader_drop_last = False
        try:
            return self.get_eval_dataloader(dataset)
        finally:
            del self._get_eval_sampler
            self.args.dataloader_drop_last = drop_last

    @torch.no_grad()
    def compute_reference_logps(self, dataset, desc: str) -> dict[str, torch.Tensor]:
        """One no-grad pass of the reference over ``dataset`` in order.

        Returns the summed answer log-probs ``logps`` and answer lengths ``num_tokens`` per sample, plus
        ``token_logps`` (every answer token's log-prob, flat in sample order) where ``needs_token_ref_logps``.
        Batched by ``per_device_eval_batch_size`` through the trainer's own (distributed) eval loader; every
        process returns the values of the whole data set.
        """
        logps, num_tokens, token_logps = [], [], []
        # with `dataloader_persistent_workers` the Trainer keeps one loader under "eval", whatever its data set: the
        # pass must neither get an earlier split's loader nor leave its own for the evaluation
        cached = getattr(self, "_eval_dataloaders", {})
        cached.pop("eval", None)
        loader = self.in_order_loader(dataset)
        cached.pop("eval", None)
        for batch in tqdm(loader, desc=desc, disable=not self.is_local_process_zero()):
            batch = self._prepare_inputs(batch)
            model_inputs = {key: value for key, value in batch.items() if key not in NON_MODEL_KEYS}
            with self.accelerator.autocast():  # as in training: the policy is not wrapped by accelerate yet
                batch_token_logps, mask = self.reference_token_logps(self.model, model_inputs, batch["labels"])
            logps.append(self.accelerator.gather_for_metrics(batch_token_logps.sum(-1)).cpu())
            num_tokens.append(self.accelerator.gather_for_metrics(mask.sum(-1)).cpu())
            if self.needs_token_ref_logps:  # rows of different lengths per process: pad to one length, gather
                padded = self.accelerator.pad_across_processes(batch_token_logps, dim=1)
                padded_mask = self.accelerator.pad_across_processes(mask.long(), dim=1)
                gathered = self.accelerator.gather_for_metrics((padded, padded_mask))
                token_logps += [row[row_mask.bool()].cpu() for row, row_mask in zip(*gathered)]

        values = {"logps": torch.cat(logps)[: len(dataset)], "num_tokens": torch.cat(num_tokens)[: len(dataset)]}
        if self.needs_token_ref_logps:
            values["token_logps"] = torch.cat(token_logps[: len(dataset)]) if token_logps else torch.zeros(0)
        return values

    def rng_kept(self):
        """A context that leaves the global RNG as it found it (on the CPU and the trainer's device).

        A pass's loader draws its seed from the global RNG: without this, the training after a cache miss would
        shuffle and drop out otherwise than after a cache hit, or with the online reference.
        """
        device = self.accelerator.device
        if device.type == "cpu" or not hasattr(getattr(torch, device.type, None), "get_rng_state"):
            return torch.random.fork_rng(devices=[])  # the CPU's (a device without a torch RNG module: its own)
        return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)

    def precompute_reference(self, cache: dict[str, reference_cache.CachedSplit]) -> dict[str, float]:
        """Attach precomputed reference log-probs and free the reference model.

        ``precompute_ref_logps``: attach log πref of every split as columns, from ``cache`` or one reference
        pass per missing split (then cached), switch the loss to them and free the reference model. The pass and the
        cache go sample by sample: rows packed by `neat_packing` are split for the pass, and get a list per row.

        Returns the runtime of each pass.
        """
        metrics, columns = {}, {}
        for split, dataset in reference_cache.dataset_splits(self.train_dataset, self.eval_dataset).items():
            values = cache[split].values
            if values is None:
                start = time.perf_counter()
                samples = unpacked(dataset) if self.packed else dataset
                with self.rng_kept():
                    values = self.compute_reference_logps(samples, desc=f"Reference log-probs ({split})")
                metrics[f"ref_precompute_{split}_runtime"] = round(time.perf_counter() - start, 4)
                cache[split].check(values)
                if self.is_world_process_zero():
                    cache[split].save(values, {"split": split})

            per_row = samples_per_row(dataset) if self.packed else None
            columns[split] = add_reference_columns(dataset, values, self.needs_token_ref_logps, per_row)

        self.accelerator.wait_for_everyone()
        if "train" in columns:
            self.train_dataset = columns["train"]
        if "eval" in columns:
            self.eval_dataset = columns["eval"]
        elif any(split.startswith("eval_") for split in columns):
            self.eval_dataset = {split[5:]: dataset for split, dataset in columns.items() if split.startswith("eval_")}

        self.precomputed_reference = True
        self.release_reference()
        return metrics

    def release_reference(self) -> None:
        """Free the reference model: training then holds the policy only."""
        if self.ref_model is not None and hasattr(self.ref_model, "destroy"):
            self.ref_model.destroy()  # a DeepSpeed engine

        self.ref_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _reference(self, model, model_inputs: dict, batch: Batch) -> None:
        """Fill ``batch.ref_logps`` (and the per-token values): precomputed columns, or a reference forward."""
        if not self.precomputed_reference:
            token_logps, _ = self.reference_token_logps(model, model_inputs, batch.inputs["labels"])
            batch.ref_token_logps = batch.per_sample(token_logps)
            batch.ref_logps = batch.ref_token_logps.sum(-1)
            return

        needed = (REF_LOGPS, REF_TOKEN_LOGPS) if self.needs_token_ref_logps else (REF_LOGPS,)
        if any(name not in batch.inputs for name in needed):
            raise RuntimeError("precompute_ref_logps: a batch came without its precomputed reference log-probs.")
        if batch.inputs[REF_LOGPS].numel() != batch.mask.size(0):
            raise RuntimeError(f"Column {REF_LOGPS!r} does not match the samples of its batch; rebuild it.")
        if self.needs_token_ref_logps:
            batch.ref_token_logps = answer_values(batch.inputs[REF_TOKEN_LOGPS], batch.mask, REF_TOKEN_LOGPS)
        batch.ref_logps = batch.inputs[REF_LOGPS].float()

    def denominator(self, batch: Batch) -> torch.Tensor:
        """N·P/P: in training the global batch's valid samples per process; in evaluation this batch's."""
        if batch.training and self._num_answered_samples is not None:
            return self._num_answered_samples.clamp(min=1) / self.accelerator.num_processes

        return (batch.num_tokens > 0).sum().clamp(min=1)

    def sample_losses(self, logps: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The hook of per-sample stages: L_i of every sample from its log π(y_i|x_i).

        Shape (batch,), 0 for invalid samples. Elementwise and without side effects: the fused path calls it once
        per sample.
        """
        raise NotImplementedError

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """The loss of a micro-batch: Σ_i L_i / N·P by default (see the class docstring).

        A function of ``batch.token_logps`` without side effects: the fused path differentiates it by autograd.
        """
        return self.sample_losses(batch.logps, batch).sum() / self.denominator(batch)

    def store_batch_metrics(self, batch: Batch) -> None:
        """Add the batch's metric sums; stages with metrics of their own extend it."""
        if self.uses_reference:
            pairs = deviation_pairs(batch.logps, batch.ref_logps, batch.num_tokens, self.beta)
            self.store_metrics("deviation", pairs, batch)

    def head_free(self, model) -> bool:
        """The stage takes its log-probs from the hidden states and the head, fused with its loss in training.

        See ``head_free_fallback``. The reference then follows the same path, so both make the same float operations
        (r = 0 exactly where the weights are equal).
        """
        return self.head_free_fallback(model) is None

    def head_free_fallback(self, model) -> Optional[str]:
        """Why the stage takes its log-probs from the full logits instead (None: it does not).

        The head-free path takes a plain head (``train/head.py``), no FSDP (not verified with it), and, where the
        stage's loss holds the stock loss, a stock loss that ``token_mean_loss`` reproduces.
        """
        if self.is_fsdp_enabled:
            return "FSDP is enabled (the head-free path is verified with DDP and DeepSpeed only)"
        if self.args.n_gpu > 1:  # DataParallel's replicas would share the head's shadowed forward
            return "DataParallel runs several GPUs in one process (launch one process per GPU instead)"
        if self.uses_stock_loss and not self.stock_loss_is_token_mean():
            return (
                "the stock loss is not the plain token-mean cross-entropy (a LLaMA-Factory loss option, label "
                "smoothing or sequence parallelism)"
            )
        if plain_head(model) is None:
            return (
                "the model's output head is not a plain linear layer of a " + "/".join(PLAIN_HEAD_MODEL_TYPES) + " "
                "model, or its forward is wrapped (an adapter, device-map or offload hooks)"
            )
        return None

    def stock_loss_is_token_mean(self) -> bool:
        """The stock loss is the model's own token-mean cross-entropy, normalised by the Trainer alone.

        Not so with LLaMA-Factory's loss functions (``use_dft_loss``, ``use_eaft_loss``, ``use_asft_loss``), label
        smoothing, DataParallel over several GPUs in one process, or sequence parallelism: those keep the stock loss.
        """
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return (
            self.compute_loss_func is None
            and self.label_smoother is None
            and self.args.n_gpu <= 1
            and not getattr(parallelism, "sp_enabled", False)
        )

    def token_mean_loss(self, batch: Batch) -> torch.Tensor:
        r"""Stock SFT's loss: the answer tokens' NLL summed, over the Trainer's count of them.

        The count is ``num_items_in_batch`` (the tokens of all accumulation steps, of all processes where
        ``average_tokens_across_devices``, whose loss the Trainer scales back up by P), else the micro-batch's
        tokens (the Trainer then divides by the accumulation steps), as ``transformers`` does for the model's loss.
        """
        if batch.stock_loss is not None:
            return batch.stock_loss

        return -batch.token_logps.sum() / batch.num_items

    def stock_num_items(self, batch: Batch, num_items_in_batch) -> torch.Tensor:
        """What ``token_mean_loss`` divides by on the fused path (see there)."""
        if not self.model_accepts_loss_kwargs or num_items_in_batch is None:
            return batch.mask.sum().clamp(min=1)

        num_items = torch.as_tensor(num_items_in_batch, device=batch.mask.device).clamp(min=1)  # 0: loss 0, not NaN
        if self.args.average_tokens_across_devices:
            num_items = num_items / self.accelerator.num_processes
        return num_items

    @override
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}
        labels = inputs["labels"]
        if model.training and not self._path_logged:
            self._path_logged = True
            fallback = self.head_free_fallback(model)
            logger.info_rank0(
                "Answer log-probs: head-free (the output head projects the answer positions only, fused with the loss)."
                if fallback is None
                else f"Answer log-probs: from the full logits, because {fallback}."
            )
        if model.training and self.head_free(model):
            return self._fused_loss(model, model_inputs, inputs, return_outputs, num_items_in_batch)
        elif self.uses_stock_loss:
            stock_inputs = {
                key: value for key, value in inputs.items() if key == "labels" or key not in NON_MODEL_KEYS
            }
            stock_loss, outputs = super().compute_loss(
                model, stock_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            logits = outputs.logits if self.logps_need_grad else outputs.logits.detach()
            batch = Batch.of(inputs, *answer_token_logps(logits, labels), model.training, stock_loss=stock_loss)
        else:  # evaluation keeps the logits in ``outputs`` for `compute_accuracy`
            outputs = model(**model_inputs, use_cache=False)
            batch = Batch.of(inputs, *answer_token_logps(outputs.logits, labels), model.training)

        if self.uses_reference:
            self._reference(model, model_inputs, batch)

        loss = self.batch_loss(batch)
        self.store_batch_metrics(batch)
        if not model.training and self.eval_loss_per_sample:
            answered = batch.num_tokens > 0
            losses = torch.where(answered, self.sample_losses(batch.logps, batch).detach(), 0.0)
            self.store_metrics(EVAL_LOSS, torch.stack([losses.double(), answered.double()], dim=-1), batch)
        if not model.training:
            self.gather_eval_metrics(batch)
        return (loss, outputs) if return_outputs else loss

    @property
    def eval_loss_per_sample(self) -> bool:
        """The logged ``eval_loss`` of the per-sample losses is the mean of L_i over the answered samples.

        The Trainer weighs each batch's loss by its rows: a packed row holds several samples, and the last batch of an
        eval set that the batch size does not divide counted as a full one (transformers 5.5).
        """
        return self.per_sample and not self.uses_stock_loss

    def _fused_loss(self, model, model_inputs: dict, inputs: dict, return_outputs: bool, num_items_in_batch):
        """``compute_loss`` through ``fused_answer_loss``: ``batch_loss`` as a function of the token log-probs.

        The head computes the loss inside the model's forward (``head_computes``), which returns it as its logits.
        """
        labels = inputs["labels"]
        batch = Batch.of(inputs, None, labels[:, 1:] != IGNORE_INDEX, training=True)
        if self.uses_stock_loss:
            batch.num_items = self.stock_num_items(batch, num_items_in_batch)
        if self.uses_reference:
            self._reference(model, model_inputs, batch)

        def loss_of(token_logps: torch.Tensor) -> torch.Tensor:
            return self.batch_loss(replace(batch, token_logps=batch.per_sample(token_logps)))

        def fused(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            loss, token_logps, _ = fused_answer_loss(hidden, weight, labels, loss_of)
            batch.token_logps = batch.per_sample(token_logps)
            return loss

        with head_computes(model, fused):
            outputs = model(**model_inputs, use_cache=False)
        self.store_batch_metrics(batch)
        return (outputs.logits, outputs) if return_outputs else outputs.logits

    def store_metrics(self, group: str, pairs: torch.Tensor, batch: Batch) -> None:
        """Add a micro-batch's per-sample (value, count) pairs of one metric group (``metrics``) to its sums.

        Evaluation keeps them per row until ``gather_eval_metrics``.
        """
        if not batch.training:
            self._eval_rows[group] = batch.per_row(pairs)
            return
        stored, sums = self._stored_sums["train"], pairs.sum(0)
        stored[group] = sums if group not in stored else stored[group] + sums

    def gather_eval_metrics(self, batch: Batch) -> None:
        """Add an eval batch's metric pairs of every process to the (then global) eval sums, in one gather.

        Per row, with ``gather_for_metrics``, as the Trainer gathers its losses: accelerate completes the processes'
        last batches with repeated rows, which the gather drops, so every sample counts once, packed or not.
        """
        groups, self._eval_rows = self._eval_rows, {}
        if not groups:
            return
        rows = torch.cat([pairs.to(batch.mask.device) for pairs in groups.values()], dim=-1)
        if self.accelerator.num_processes > 1:
            rows = self.accelerator.gather_for_metrics(rows)
        sums = rows.sum(0).cpu().split([pairs.size(-1) for pairs in groups.values()])
        stored = self._stored_sums["eval"]
        for group, part in zip(groups, sums):
            stored[group] = part if group not in stored else stored[group] + part

    @override
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        r"""Add the means of the stored metrics since the last log to ``logs``.

        Training's sums are reduced over the processes here; evaluation's were gathered batch by batch.
        """
        # an evaluation logs `eval_loss`, or `eval_<name>_loss` for each of several eval sets
        eval_key = next((key for key in logs if key.startswith("eval") and key.endswith("_loss")), None)
        train_eval = "train" if "loss" in logs else "eval" if eval_key else None
        if train_eval == "eval" and self.eval_loss_per_sample:  # the eval sums are gathered from every process
            sums = self._stored_sums["eval"].pop(EVAL_LOSS, torch.zeros(2))
            if sums[1] > 0:
                logs[eval_key] = (sums[0] / sums[1]).item()
        if train_eval is not None and self.metric_groups:
            stored, self._stored_sums[train_eval] = self._stored_sums[train_eval], {}
            sums = [stored.get(group, torch.zeros(2 * len(names))) for group, names in self.metric_groups.items()]
            sums = torch.cat([part.double().cpu() for part in sums]).to(self.accelerator.device)
            if train_eval == "train" and self.accelerator.num_processes > 1:  # one reduce for every metric
                sums = self.accelerator.reduce(sums, reduction="sum")

            prefix = eval_key[: -len("loss")] if train_eval == "eval" else ""
            parts = sums.cpu().split([2 * len(names) for names in self.metric_groups.values()])
            for names, part in zip(self.metric_groups.values(), parts):
                logs.update(metric_means(names, part, prefix))

        return super().log(logs, *args, **kwargs)
