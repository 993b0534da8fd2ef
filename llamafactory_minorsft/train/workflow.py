"""Workflow of `minorsft`, `sft_dpo`, `sft_go` and `sft` + `track_deviation`, mirroring LLaMA-Factory's sft
workflow: tokenizer → template → dataset → (SFT-GO importance) → model → reference → trainer → train / eval →
plots → model card."""

from typing import TYPE_CHECKING, Optional

from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.logging import get_logger
from llamafactory.extras.misc import calculate_tps
from llamafactory.extras.ploting import plot_loss
from llamafactory.hparams import FinetuningArguments, ModelArguments
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.sft.metric import ComputeAccuracy, eval_logit_processor
from llamafactory.train.trainer_utils import create_modelcard_and_push, create_ref_model
from transformers.integrations import is_deepspeed_zero3_enabled

from .callbacks import DeviationLogCallback
from .columns import ExtraColumnsCollator
from .importance import KeepProbabilityScorer, add_llmlingua2_importance, training_idf
from .precompute import PrecomputedReference
from .trainer import ReferenceSFTTrainer


if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from llamafactory.hparams import DataArguments, ModelArguments

    from ..hparams import ReferenceSFTFinetuningArguments


logger = get_logger(__name__)


def load_base_model(model_args: "ModelArguments"):
    """The frozen base model without any adapter: LoRA's reference."""
    base_args = ModelArguments.copyfrom(model_args, adapter_name_or_path=None)
    return load_model(load_tokenizer(base_args)["tokenizer"], base_args, FinetuningArguments(), is_trainable=False)


def prepare_sft_go(tokenizer, dataset_module: dict, finetuning_args) -> dict:
    """Importance fixed before training: the TF-IDF table, or an LLMLingua-2 column on every split."""
    grouping = finetuning_args.sft_go_grouping
    if grouping == "rho1" and finetuning_args.ref_model is None:
        logger.warning_rank0(
            "sft_go rho1 without `ref_model`: the initial model is the reference, so every excess loss is 0 until "
            "the policy moves. Rho-1 uses a reference trained on high-quality data; set `ref_model` to one."
        )
    if grouping == "tfidf":
        if dataset_module.get("train_dataset") is None:
            raise ValueError("`sft_go_grouping: tfidf` takes its IDF from the training answers: set `do_train: true`.")
        return {"idf": training_idf(dataset_module["train_dataset"], len(tokenizer))}

    if grouping == "llmlingua2":
        scorer = KeepProbabilityScorer(finetuning_args.sft_go_classifier)
        for key in ("train_dataset", "eval_dataset"):
            split = dataset_module.get(key)
            if isinstance(split, dict):
                dataset_module[key] = {name: add_llmlingua2_importance(data, tokenizer, scorer, f"LLMLingua-2 ({name})")
                                       for name, data in split.items()}  # fmt: skip
            elif split is not None:
                dataset_module[key] = add_llmlingua2_importance(split, tokenizer, scorer, f"LLMLingua-2 ({key})")
        del scorer

    return {}


def run_reference_sft(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "Seq2SeqTrainingArguments",
    finetuning_args: "ReferenceSFTFinetuningArguments",
    callbacks: Optional[list["TrainerCallback"]] = None,
):
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    # the stock sft data pipeline: prompt tokens are IGNORE_INDEX, answer tokens are labels
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    go_kwargs = prepare_sft_go(tokenizer, dataset_module, finetuning_args) if finetuning_args.stage == "sft_go" else {}
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    precomputed = None
    if finetuning_args.precompute_ref_logps:  # a cache hit on every split: no reference model is loaded at all
        precomputed = PrecomputedReference(model_args, data_args, finetuning_args, dataset_module)

    ref_model = None  # also when no reference is needed (sft_go with TF-IDF/LLMLingua-2, no deviation tracking)
    if finetuning_args.needs_reference and (precomputed is None or precomputed.needs_reference_model):
        # the initial model (frozen copy; None for LoRA = adapters disabled) or `ref_model`, as DPO does;
        # it is built from `model_name_or_path`, never from a checkpoint we resume from
        ref_model = create_ref_model(model_args, finetuning_args)
        if ref_model is None and precomputed is not None and is_deepspeed_zero3_enabled():
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
        **tokenizer_module,
    )
    data_collator = ExtraColumnsCollator(data_collator)

    metric_module = {}
    if finetuning_args.compute_accuracy:
        metric_module["compute_metrics"] = ComputeAccuracy()
        metric_module["preprocess_logits_for_metrics"] = eval_logit_processor

    trainer = ReferenceSFTTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=[*(callbacks or []), DeviationLogCallback()],
        **go_kwargs,
        **dataset_module,
        **tokenizer_module,
        **metric_module,
    )

    precompute_metrics = precomputed.attach(trainer) if precomputed is not None else {}
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
            # training_loss.png as stock sft, plus training_deviation.png (the paper's Fig. 1) and SFT-GO's groups
            keys = ["loss", "eval_loss", "deviation", "eval_deviation"]
            if finetuning_args.stage == "sft_go":
                keys += ["group_loss/important", "group_loss/unimportant", "worst_group/important"]
            plot_loss(training_args.output_dir, keys=keys)

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    create_modelcard_and_push(trainer, model_args, data_args, training_args, finetuning_args)
