"""Workflow of `stage: sft_go`: token importance fixed before training, then the shared workflow."""

from ..metrics import GROUP_METRICS
from ..workflow import run_workflow
from .importance import KeepProbabilityScorer, add_llmlingua2_importance, training_idf
from .trainer import SFTGOTrainer


def prepare_sft_go(tokenizer, dataset_module: dict, finetuning_args) -> dict:
    """The TF-IDF table (a trainer argument), or an LLMLingua-2 column on every split; Rho-1 needs neither."""
    grouping = finetuning_args.sft_go_grouping
    if grouping == "tfidf":
        if dataset_module.get("train_dataset") is None:
            raise ValueError("`sft_go_grouping: tfidf` takes its IDF from the training answers: set `dataset`.")
        return {"idf": training_idf(dataset_module["train_dataset"], len(tokenizer))}

    if grouping == "llmlingua2":
        scorer = KeepProbabilityScorer(finetuning_args.sft_go_classifier)
        with scorer.gathered():
            for key in ("train_dataset", "eval_dataset"):
                split = dataset_module.get(key)
                if isinstance(split, dict):
                    dataset_module[key] = {
                        name: add_llmlingua2_importance(data, tokenizer, scorer, f"LLMLingua-2 ({name})")
                        for name, data in split.items()
                    }
                elif split is not None:
                    dataset_module[key] = add_llmlingua2_importance(split, tokenizer, scorer, f"LLMLingua-2 ({key})")

    return {}


def run_sft_go(model_args, data_args, training_args, finetuning_args, callbacks=None) -> None:
    run_workflow(
        model_args,
        data_args,
        training_args,
        finetuning_args,
        callbacks,
        SFTGOTrainer,
        prepare_sft_go,
        (*GROUP_METRICS, "sft_go_lambda"),  # λ's schedule, next to the group losses it weighs
    )
