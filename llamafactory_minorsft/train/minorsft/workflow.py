"""Workflow of `stage: minorsft` and `stage: sft_dpo`."""

from ..workflow import run_workflow
from .trainer import MinorSFTTrainer


def run_minorsft(model_args, data_args, training_args, finetuning_args, callbacks=None) -> None:
    run_workflow(model_args, data_args, training_args, finetuning_args, callbacks, MinorSFTTrainer)
