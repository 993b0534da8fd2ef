"""Workflow of `stage: sft` with `track_deviation` or `sft_loss_reduction: sample`."""

from ..workflow import run_workflow
from .trainer import SFTTrainer


def run_sft(model_args, data_args, training_args, finetuning_args, callbacks=None) -> None:
    run_workflow(model_args, data_args, training_args, finetuning_args, callbacks, SFTTrainer)
