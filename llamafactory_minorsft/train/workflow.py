"""The workflow every stage of this package shares.

The workflow every stage of this package shares, mirroring LLaMA-Factory's sft workflow: tokenizer → template →
dataset → (stage preparation) → model → reference → trainer → train / eval → plots → model card.

Each stage folder's ``workflow.py`` calls ``run_workflow`` with its trainer and, where it needs one, a preparation
step between the data set and the model.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.misc import calculate_tps
from llamafactory.extras.ploting import plot_loss
from llamafactory.hparams import FinetuningArguments, ModelArguments
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.sft.metric import ComputeAccuracy, eval_logit_processor
from llamafactory.train.trainer_utils import create_modelcard_and_push, create_ref_model
from transformers.integrations import is_deepspeed_zero3_enabled

from ..hparams import check_resized_vocabulary
from ..integration import logits_kept
from . import reference_cache
from .callbacks import DeviationLogCallback
from .columns import ExtraColumnsCollator


if TYPE_CHECKING:
    from llamafactory.hparams import DataArguments
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from ..hparams import PluginFinetuningArguments
    from .trainer import BaseSFTTrainer


#: prepare(tokenizer, dataset_module, finetuning_args) → extra trainer arguments; may add columns to the splits
Prepare = Callable[[Any, dict, "PluginFinetuningArguments"], dict[str, Any]]


def load_base_model(model_args: "ModelArguments"):
    """The frozen base model without any adapter: LoRA's reference."""
    base_args = ModelArguments.copyfrom(model_args, adapter_name_or_path=None)
    return load_model(load_tokenizer(base_args)["tokenizer"], base_args, FinetuningArguments(), is_trainable=False)


def load_policy(tokenizer, model_args: "ModelArguments", finetuning_args: "PluginFinetuningArguments", is_trainable):
    """LLaMA-Factory's ``load_model``, with Liger's kernels but never its fused loss (see ``integration.logits_kept``)."""
    with logits_kept():
        return load_model(tokenizer, model_args, finetuning_args, is_trainable)


def run_workflow(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "Seq2SeqTrainingArguments",
    finetuning_args: "PluginFinetuningArguments",
    callbacks: Optional[list["TrainerCallback"]],
    trainer_class: type["BaseSFTTrainer"],
    prepare: Optional[Prepare] = None,
    plot_keys: tuple[str, ...] = (),
) -> None:
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    vocabulary = len(tokenizer)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    check_resized_vocabulary(tokenizer, len(tokenizer) - vocabulary, model_args, data_args, finetuning_args)
    # the stock sft data pipeline: prompt tokens are IGNORE_INDEX, answer tokens are labels
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    stage_kwargs = prepare(tokenizer, dataset_module, finetuning_args) if prepare is not None else {}
    cache = None
    if finetuning_args.precompute_ref_logps:  # a cache hit on every split: no reference model is loaded at all
        # before the policy loads: its lookup refuses what the pass cannot do (packed media) early
        cache = reference_cache.look_up(model_args, data_args, training_args, finetuning_args, dataset_module)
    model = load_policy(tokenizer, model_args, finetuning_args, training_args.do_train)

    ref_model = None
    if finetuning_args.uses_reference and (cache is None or any(entry.values is None for entry in cache.values())):
        # the initial model (frozen copy; None for LoRA = adapters disabled) or `ref_model`, as DPO does;
        # it is built from `model_name_or_path`, never from a checkpoint we resume from
        ref_model = create_ref_model(model_args, finetuning_args)
        if ref_model is None and cache is not None and is_deepspeed_zero3_enabled():
            # the policy is sharded and not yet wrapped by DeepSpeed when the reference pass runs, so the
            # adapter-disabled policy cannot serve; load the base model for the pass (released afterwards)
            ref_model = load_base_model(model_args)

    data_collator = SFTDataCollatorWith4DAttentionMask(
        template=template,
        model=model,
        pad_to_multiple_of=8 if training_args.do_train else None,
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        block_diag_attn=model_args.block_diag_attn,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        compute_dtype=model_args.compute_dtype,
        **({"neat_packing": True} if data_args.neat_packing else {}),  # as stock sft (0.9.4's collator lacks it)
        **tokenizer_module,
    )

    metric_module = {}
    if finetuning_args.compute_accuracy:
        metric_module["compute_metrics"] = ComputeAccuracy()
        metric_module["preprocess_logits_for_metrics"] = eval_logit_processor

    trainer = trainer_class(
        model=model,
        ref_model=ref_model,
        packed=data_args.neat_packing,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=ExtraColumnsCollator(data_collator, packed=data_args.neat_packing),
        callbacks=[*(callbacks or []), DeviationLogCallback()],
        **stage_kwargs,
        **dataset_module,
        **tokenizer_module,
        **metric_module,
    )

    precompute_metrics = trainer.precompute_reference(cache) if cache is not None else {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        train_result.metrics.update(precompute_metrics)
        trainer.save_model()
        if finetuning_args.include_effective_tokens_per_second:
            train_result.metrics["effective_tokens_per_sec"] = calculate_tps(
                dataset_module["train_dataset"], train_result.metrics, stage="sft"
            )

        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero() and finetuning_args.plot_loss:
            # stock sft's plots (per eval set where there are several), plus the deviation (the paper's Fig. 1) and
            # the stage's own metrics
            deviation = ["deviation"] if finetuning_args.uses_reference else []
            evaluated = ["loss", *(["accuracy"] if finetuning_args.compute_accuracy else []), *deviation]
            eval_sets = dataset_module.get("eval_dataset")
            if isinstance(eval_sets, dict):
                prefixes = [f"eval_{name}_" for name in eval_sets]
            else:  # without an eval set, no eval figure to warn about
                prefixes = ["eval_"] if eval_sets is not None else []
            keys = ["loss", *deviation, *plot_keys, *(prefix + key for prefix in prefixes for key in evaluated)]
            plot_loss(training_args.output_dir, keys=keys)

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    create_modelcard_and_push(trainer, model_args, data_args, training_args, finetuning_args)
