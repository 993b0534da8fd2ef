"""Entry of this package's runs: each stage to its workflow.

Entry of this package's runs, as LLaMA-Factory's ``train/tuner.py`` dispatches its own: each stage to its
workflow.
"""

from ..stages import REFERENCE_STAGES, SFT_GO_STAGE


def run_stage(model_args, data_args, training_args, finetuning_args, callbacks=None) -> None:
    """Train a run for which ``is_plugin_run`` holds."""
    if finetuning_args.stage in REFERENCE_STAGES:
        from .minorsft.workflow import run_minorsft as run
    elif finetuning_args.stage == SFT_GO_STAGE:
        from .sft_go.workflow import run_sft_go as run
    else:  # sft with track_deviation or sft_loss_reduction: sample
        from .sft.workflow import run_sft as run

    run(model_args, data_args, training_args, finetuning_args, callbacks)
