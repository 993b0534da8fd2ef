"""Arguments of the reference-aware stages, in LLaMA-Factory's hparams style.

``ReferenceSFTFinetuningArguments`` replaces LLaMA-Factory's ``FinetuningArguments`` in its parsers
(see ``integration``). It only adds options and checks: every stock option keeps its meaning, β is the
stock ``pref_beta`` and the reference is the stock ``ref_model`` / ``ref_model_adapters`` /
``ref_model_quantization_bit``.
"""

import math
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from llamafactory.hparams.finetuning_args import FinetuningArguments

from . import REFERENCE_SFT_STAGES


STOCK_STAGES: tuple[str, ...] = typing.get_args(typing.get_type_hints(FinetuningArguments)["stage"])
ALL_STAGES: tuple[str, ...] = STOCK_STAGES + REFERENCE_SFT_STAGES
#: Stages that can log the deviation metric: the reference stages always do, plain SFT on request.
DEVIATION_STAGES = ("sft",) + REFERENCE_SFT_STAGES


@dataclass
class ReferenceSFTArguments:
    r"""Arguments of MinorSFT / SFT using DPO that LLaMA-Factory does not have."""

    track_deviation: bool = field(
        default=False,
        metadata={
            "help": (
                "For `stage: sft`: keep the stock SFT loss and also run the reference model to log the deviation "
                "metric of arXiv 2408.10642 Eq. 8 (`deviation`, `rewards`, `coef`, `logps/*`). "
                "The minorsft and sft_dpo stages always log them."
            )
        },
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={
            "help": (
                "Compute log πref(y|x) of every train/eval sample in one no-grad pass before training, cache it on "
                "disk and release the reference model, so training holds only the policy."
            )
        },
    )
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": (
                "Where precomputed reference log-probs are cached (default: $LLAMAFACTORY_MINORSFT_CACHE or "
                "~/.cache/llamafactory_minorsft/ref_logps)."
            )
        },
    )


@dataclass
class ReferenceSFTFinetuningArguments(FinetuningArguments, ReferenceSFTArguments):
    r"""LLaMA-Factory's ``FinetuningArguments`` plus the reference-aware SFT stages."""

    stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto", "minorsft", "sft_dpo"] = field(
        default="sft",
        metadata={
            "help": (
                "Which stage will be performed in training. `minorsft`: MinorSFT (arXiv 2408.10642 Eq. 7); "
                "`sft_dpo`: SFT using DPO (Eq. 3). Both need a reference model and use `pref_beta` as β."
            )
        },
    )

    @property
    def uses_reference_sft(self) -> bool:
        """True when this run takes the reference-aware workflow (minorsft, sft_dpo, sft + track_deviation)."""
        return self.stage in REFERENCE_SFT_STAGES or (self.stage == "sft" and self.track_deviation)

    def __post_init__(self):
        if self.stage not in ALL_STAGES:
            raise ValueError(f"Unknown `stage: {self.stage}`. Choose one of: {', '.join(ALL_STAGES)}.")

        super().__post_init__()

        if self.track_deviation and self.stage not in DEVIATION_STAGES:
            raise ValueError(
                f"`track_deviation` means nothing for `stage: {self.stage}`: it applies to `stage: sft` only "
                "(minorsft and sft_dpo always log the deviation). Remove `track_deviation`."
            )

        if self.precompute_ref_logps and not self.uses_reference_sft:
            raise ValueError(
                f"`precompute_ref_logps` needs a reference model, which `stage: {self.stage}` does not use here: "
                "use it with stage minorsft, sft_dpo, or sft with `track_deviation: true`."
            )

        if self.uses_reference_sft:
            self.use_ref_model = True
            if not (isinstance(self.pref_beta, (int, float)) and math.isfinite(self.pref_beta) and self.pref_beta > 0):
                raise ValueError(
                    f"`pref_beta` is β of MinorSFT / SFT using DPO and must be a positive number, got {self.pref_beta}. "
                    "The paper uses `pref_beta: 0.04`."
                )

            if self.pissa_init:
                raise ValueError(
                    f"`pissa_init` cannot be used with `stage: {self.stage}`: PiSSA rewrites the base weights, so the "
                    "adapter-disabled model is no longer the reference. Remove `pissa_init`."
                )


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "org/name"; anything absolute, relative-dotted or home-based is meant as a local path.
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or name.count("/") > 1


def verify_reference_sft_args(model_args, data_args, training_args, finetuning_args, dataset_attrs) -> None:
    """Cross-argument checks of the reference-aware workflow, run before anything is loaded or written.

    ``dataset_attrs`` are LLaMA-Factory's ``DatasetAttr`` of the train and eval datasets.
    """
    stage = finetuning_args.stage
    ranking = sorted({attr.dataset_name for attr in dataset_attrs if attr.ranking})
    if ranking:
        raise ValueError(
            f"`dataset`/`eval_dataset` {', '.join(ranking)} is a ranking (pairwise) dataset, but `stage: {stage}` "
            "trains on single answers. Use a non-ranking (alpaca/sharegpt SFT) dataset, or `stage: dpo` for pairs."
        )

    if finetuning_args.ref_model is not None:
        ref = os.path.expanduser(finetuning_args.ref_model)
        offline = os.getenv("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if (offline or _looks_like_local_path(finetuning_args.ref_model)) and not os.path.exists(ref):
            raise ValueError(
                f"`ref_model` path {finetuning_args.ref_model!r} does not exist. Point `ref_model` at a model "
                "directory, or remove it to use the initial model as the reference."
            )

    if data_args.packing or data_args.neat_packing:
        raise ValueError(
            f"`packing`/`neat_packing` cannot be used with `stage: {stage}`"
            + (" + `track_deviation`" if stage == "sft" else "")
            + ": packed sequences mix several samples, so per-sample log-probs are not defined. Set `packing: false`."
        )

    if training_args.predict_with_generate or training_args.do_predict:
        raise ValueError(
            "`predict_with_generate`/`do_predict` are not supported by the reference-aware workflow. "
            "Predict with a separate `stage: sft` run (`do_train: false`) on the trained model."
        )

    if finetuning_args.precompute_ref_logps and data_args.streaming:
        raise ValueError(
            "`precompute_ref_logps` needs the whole data set before training, which `streaming: true` never has. "
            "Set `streaming: false`, or remove `precompute_ref_logps` to run the reference online."
        )

    if getattr(finetuning_args, "use_mca", False) or getattr(finetuning_args, "use_hyper_parallel", False):
        raise ValueError(f"`use_mca`/`use_hyper_parallel` are not supported with `stage: {stage}`.")
