"""Arguments of this package's stages, in LLaMA-Factory's hparams style.

``PluginFinetuningArguments`` replaces LLaMA-Factory's ``FinetuningArguments`` in its parsers
(see ``integration``). It only adds options and checks: every stock option keeps its meaning, β is the
stock ``pref_beta`` and the reference is the stock ``ref_model`` / ``ref_model_adapters`` /
``ref_model_quantization_bit``.
"""

import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from typing import Literal


# LLaMA-Factory's parser imports this module: a fork's (patches/) at its top, the plugin's hook when it patches the
# parser. Imported before LLaMA-Factory's hparams, this module steps out of sys.modules while they load, so that the
# parser imports a complete copy instead of this half-run one; the import system then returns that copy. (Another
# thread that imports LLaMA-Factory's hparams in that moment gets Python's "deadlock detected": import them first.)
if "llamafactory.hparams" not in sys.modules:
    _this = sys.modules.pop(__name__, None)
    try:
        import llamafactory.hparams  # noqa: F401
    finally:
        if _this is not None:
            sys.modules.setdefault(__name__, _this)
    del _this

from llamafactory.hparams.finetuning_args import FinetuningArguments

from .paths import looks_like_local_path, unwritable
from .sft_go import GROUP_REDUCTIONS, GROUPINGS, LAMBDA_SCHEDULES
from .stages import NEW_STAGES, REFERENCE_STAGES, SFT_GO_STAGE, is_plugin_run, needs_token_ref_logps, uses_reference


STOCK_STAGES: tuple[str, ...] = typing.get_args(typing.get_type_hints(FinetuningArguments)["stage"])
ALL_STAGES: tuple[str, ...] = STOCK_STAGES + NEW_STAGES
#: Stages that can log the deviation metric: the reference stages always do, sft and sft_go on request.
DEVIATION_STAGES = ("sft", SFT_GO_STAGE, *REFERENCE_STAGES)
SFT_LOSS_REDUCTIONS = ("token", "sample")


@dataclass
class ReferenceArguments:
    r"""Arguments of the reference model that LLaMA-Factory does not have (β and the model are its own)."""

    track_deviation: bool = field(
        default=False,
        metadata={
            "help": (
                "For `stage: sft` or `sft_go`: keep the stage's loss and also run the reference model to log the "
                "deviation metric of arXiv 2408.10642 Eq. 8 (`deviation`, `rewards`, `coef`, `logps/*`). "
                "The minorsft and sft_dpo stages always log them; sft_go with `sft_go_grouping: rho1` too."
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
class SFTGOArguments:
    r"""Arguments of SFT-GO (`stage: sft_go`, arXiv 2506.15021)."""

    sft_go_grouping: Literal["tfidf", "rho1", "llmlingua2"] = field(
        default="tfidf",
        metadata={
            "help": (
                "How SFT-GO ranks a sample's answer tokens by importance. `tfidf`: in-sample frequency × IDF over "
                "the training answers; `rho1`: excess loss, policy token loss − reference token loss (needs "
                "`ref_model`); `llmlingua2`: keep-probabilities of the "
                "token-classification model `sft_go_classifier`. Default tfidf: it needs no extra model."
            )
        },
    )
    sft_go_eta: float = field(
        default=0.5,
        metadata={
            "help": (
                "η: the important fraction, i.e. the share of each sample's answer tokens (rounded up) with the "
                "highest importance scores that forms the important group; in (0, 1). Default 0.5: two groups of "
                "equal size (the paper's per-grouping values are not public to us)."
            )
        },
    )
    sft_go_lambda: float = field(
        default=0.9,
        metadata={
            "help": (
                "λ in [0, 1] of L = (1 − λ)·CE + λ·max(L_important, L_unimportant): 0 is stock SFT, 1 keeps "
                "only the worst group. With a decaying schedule it is the starting value. Default 0.9, the value "
                "the SFT-GO paper uses for all settings."
            )
        },
    )
    sft_go_lambda_schedule: Literal["constant", "linear", "cosine"] = field(
        default="linear",
        metadata={
            "help": (
                "How λ changes over the training steps: `linear` (default) or `cosine` decay from `sft_go_lambda` to "
                "`sft_go_lambda_min`, or `constant`. The paper decays λ, weighting the worst group early and moving "
                "back to the standard loss."
            )
        },
    )
    sft_go_lambda_min: float = field(
        default=0.0,
        metadata={
            "help": (
                "Where a `linear`/`cosine` schedule ends, in [0, `sft_go_lambda`]. Default 0. Step k of T uses the "
                "schedule at (k - 1)/T, as learning-rate schedules do."
            )
        },
    )
    sft_go_group_reduction: Literal["batch", "sample"] = field(
        default="batch",
        metadata={
            "help": (
                "Where the group losses are averaged. `batch` (default, Group DRO's mini-batch procedure): each "
                "group's token mean over the whole micro-batch, then the max of the two. `sample`: each sample's "
                "own max(L_important,i, L_unimportant,i), averaged over samples (exact under gradient accumulation "
                "and data parallelism; `batch` treats each micro-batch of each process as one mini-batch)."
            )
        },
    )
    sft_go_classifier: str | None = field(
        default=None,
        metadata={
            "help": (
                "For `sft_go_grouping: llmlingua2`: path of a 2-label token-classification model (label 1 = keep, "
                "as LLMLingua-2) with a fast tokenizer; its scores are mapped to the LLM's tokens by characters."
            )
        },
    )


#: stock DPO's loss options besides β (LLaMA-Factory 0.9.4 lacks ``ld_alpha``)
DPO_OPTIONS = ("pref_loss", "pref_ftx", "dpo_label_smoothing", "pref_bco_weight", "simpo_gamma", "ld_alpha")


def _check_writable_dir(option: str, path: str) -> None:
    """``path`` is, or can be made, a directory this process can write into."""
    why = unwritable(path)
    if why:
        raise ValueError(f"`{option}` {path!r} cannot be used: {why}. Point `{option}` at a writable directory.")


def _in_range(value, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


@dataclass
class PluginFinetuningArguments(FinetuningArguments, ReferenceArguments, SFTGOArguments):
    r"""LLaMA-Factory's ``FinetuningArguments`` plus this package's stages and options."""

    stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto", "minorsft", "sft_dpo", "sft_go"] = field(
        default="sft",
        metadata={
            "help": (
                "Which stage will be performed in training. `minorsft`: MinorSFT (arXiv 2408.10642 Eq. 7); "
                "`sft_dpo`: SFT using DPO (Eq. 3). Both need a reference model and use `pref_beta` as β. "
                "`sft_go`: SFT-GO, group-optimized SFT (arXiv 2506.15021), see the `sft_go_*` options."
            )
        },
    )

    sft_loss_reduction: Literal["token", "sample"] | None = field(
        default=None,
        metadata={
            "help": (
                "For `stage: sft` only: how the answer-token NLLs of a batch are averaged. `token` (the default, "
                "stock LLaMA-Factory): over all answer tokens of the global batch, so long answers weigh more. "
                "`sample`: each sample's mean token NLL, averaged over samples (arXiv 2408.10642 Eq. 5), the "
                "reduction of MinorSFT and SFT using DPO: the like-for-like baseline for them."
            )
        },
    )

    @property
    def is_plugin_run(self) -> bool:
        """This package's workflow trains the run (see ``stages``)."""
        return is_plugin_run(self)

    @property
    def uses_reference(self) -> bool:
        """A reference model is involved (see ``stages``)."""
        return uses_reference(self)

    def _beta_use(self) -> str:
        """What β scales in this run, for the messages."""
        uses = {"minorsft": "the coefficient 2σ(−β·r)", "sft_dpo": "the loss −log σ(β·r)"}
        return f"`stage: {self.stage}` ({uses.get(self.stage, 'its logged `rewards`, β·r')})"

    @property
    def needs_token_ref_logps(self) -> bool:
        """Per-token reference log-probs are needed: SFT-GO's Rho-1 grouping."""
        return needs_token_ref_logps(self)

    def __post_init__(self):
        if self.stage not in ALL_STAGES:
            raise ValueError(f"Unknown `stage: {self.stage}`. Choose one of: {', '.join(ALL_STAGES)}.")

        super().__post_init__()
        for name in ("ref_model", "sft_go_classifier"):  # checked as local paths below, so loaded as those
            if isinstance(getattr(self, name, None), str) and getattr(self, name).startswith("~"):
                setattr(self, name, os.path.expanduser(getattr(self, name)))

        if self.track_deviation and self.stage not in DEVIATION_STAGES:
            raise ValueError(
                f"`track_deviation` means nothing for `stage: {self.stage}`: it applies to `stage: sft` and "
                "`stage: sft_go` only (minorsft and sft_dpo always log the deviation). Remove `track_deviation`."
            )

        if self.sft_loss_reduction is not None:
            if self.stage != "sft":
                raise ValueError(
                    f"`sft_loss_reduction` is an option of `stage: sft`, not `{self.stage}` (minorsft, sft_dpo and "
                    "sft_go define their own reduction). Remove `sft_loss_reduction`."
                )
            if self.sft_loss_reduction not in SFT_LOSS_REDUCTIONS:
                raise ValueError(
                    f"`sft_loss_reduction` must be one of {', '.join(SFT_LOSS_REDUCTIONS)}, "
                    f"got {self.sft_loss_reduction!r}."
                )

        if self.precompute_ref_logps and not self.uses_reference:
            raise ValueError(
                f"`precompute_ref_logps` needs a reference model, which `stage: {self.stage}` does not use here: "
                "use it with stage minorsft, sft_dpo, sft_go with `sft_go_grouping: rho1`, or sft/sft_go with "
                "`track_deviation: true`."
            )

        self._check_sft_go()
        self._check_dpo_options()
        if self.is_plugin_run and not self.uses_reference:  # stock DPO's reference options, silently unused here
            for name in ("ref_model", "ref_model_adapters", "ref_model_quantization_bit"):
                if getattr(self, name, None) is not None:
                    raise ValueError(
                        f"`{name}` sets the reference model, which {_run_label(self)} does not use: set "
                        "`track_deviation: true` to log the deviation from it (or, with `stage: sft_go`, "
                        f"`sft_go_grouping: rho1` to group tokens by it), or remove `{name}`."
                    )
        if self.precompute_ref_logps and self.ref_logps_cache_dir:  # the cache is written after the reference pass
            _check_writable_dir("ref_logps_cache_dir", self.ref_logps_cache_dir)

        if self.uses_reference:
            self.use_ref_model = True
            if self.ref_model_adapters is not None and self.ref_model is None:
                raise ValueError(
                    "`ref_model_adapters` are applied to `ref_model`, which is not set: without `ref_model` the "
                    f"reference of `stage: {self.stage}` is the initial model, and the adapters would be ignored. "
                    "Set `ref_model` (for example to `model_name_or_path`), or remove `ref_model_adapters`."
                )
            if not (isinstance(self.pref_beta, (int, float)) and math.isfinite(self.pref_beta) and self.pref_beta > 0):
                raise ValueError(
                    f"`pref_beta` is β of the log-ratio r of {self._beta_use()} and must be a positive number, got "
                    f"{self.pref_beta}. The MinorSFT paper uses `pref_beta: 0.04`."
                )

            if self.pissa_init:
                raise ValueError(
                    f"`pissa_init` cannot be used with `stage: {self.stage}`: PiSSA rewrites the base weights, so the "
                    "adapter-disabled model is no longer the reference. Remove `pissa_init`."
                )

    def _options_set(self, names) -> list[str]:
        """Those of ``names`` that this LLaMA-Factory has and that are set away from their defaults."""
        return [f.name for f in fields(self) if f.name in names and getattr(self, f.name) != f.default]

    def _check_dpo_options(self) -> None:
        """Stock DPO's loss options, which the new stages' losses (Eq. 3, 7, SFT-GO) would silently ignore."""
        if self.stage not in NEW_STAGES:  # stock sft ignores them too, as in LLaMA-Factory
            return

        for name in self._options_set(DPO_OPTIONS):
            raise ValueError(
                f"`{name}` is an option of stock `stage: dpo`; the loss of `stage: {self.stage}` is its own "
                f"(β is `pref_beta`) and would ignore it. Remove `{name}`."
            )

    def _check_sft_go(self) -> None:
        if self.stage != SFT_GO_STAGE:
            for name in self._options_set([f.name for f in fields(SFTGOArguments)]):  # ignored by every other stage
                raise ValueError(
                    f"`{name}` is an option of `stage: sft_go`, not `{self.stage}`. Remove it, or set `stage: sft_go`."
                )
            return

        checks = [
            ("sft_go_grouping", self.sft_go_grouping in GROUPINGS, f"one of {', '.join(GROUPINGS)}"),
            ("sft_go_eta", _in_range(self.sft_go_eta, 0, 1, True, True), "a fraction strictly between 0 and 1"),
            ("sft_go_lambda", _in_range(self.sft_go_lambda, 0, 1, False, False), "a number in [0, 1]"),
            (
                "sft_go_lambda_schedule",
                self.sft_go_lambda_schedule in LAMBDA_SCHEDULES,
                f"one of {', '.join(LAMBDA_SCHEDULES)}",
            ),
            (
                "sft_go_group_reduction",
                self.sft_go_group_reduction in GROUP_REDUCTIONS,
                f"one of {', '.join(GROUP_REDUCTIONS)}",
            ),
            (
                "sft_go_lambda_min",
                _in_range(self.sft_go_lambda_min, 0, self.sft_go_lambda, False, False)
                if _in_range(self.sft_go_lambda, 0, 1, False, False)
                else True,
                "a number in [0, `sft_go_lambda`]",
            ),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"`{name}` must be {wanted}, got {getattr(self, name)!r}.")

        if self.sft_go_grouping == "rho1" and self.ref_model is None:
            raise ValueError(
                "`sft_go_grouping: rho1` needs `ref_model`: Rho-1 scores tokens by their excess loss against a "
                "reference trained on high-quality data. Without one the initial model is the reference, every excess "
                "loss is 0 at the start, and the important group is just the first tokens by position. Set `ref_model`, "
                "or use `sft_go_grouping: tfidf`."
            )

        if self.sft_go_grouping == "llmlingua2":
            if self.sft_go_classifier is None:
                raise ValueError(
                    "`sft_go_grouping: llmlingua2` needs `sft_go_classifier`: the path of a token-classification "
                    "model (for example an LLMLingua-2 checkpoint)."
                )
            if not os.path.isdir(os.path.expanduser(self.sft_go_classifier)):
                raise ValueError(
                    f"`sft_go_classifier` path {self.sft_go_classifier!r} does not exist. Point it at a local "
                    "token-classification model directory."
                )
        elif self.sft_go_classifier is not None:
            raise ValueError(
                f"`sft_go_classifier` is only used by `sft_go_grouping: llmlingua2`, not {self.sft_go_grouping}. "
                "Remove it, or set `sft_go_grouping: llmlingua2`."
            )


def _check_reference_vocabulary(policy: str, reference: str, trust_remote_code: bool) -> None:
    """Check that the reference scores the policy's token ids.

    The reference must score the policy's token ids: same vocabulary size, and same tokens where both ship a
    tokenizer. Reads configs and tokenizers only, never weights.
    """
    if not (os.path.isdir(reference) and os.path.isdir(os.path.expanduser(policy))):
        return  # hub ids are checked by the loader itself

    from transformers import AutoConfig, AutoTokenizer

    def vocab_size(path: str):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return getattr(config.get_text_config(), "vocab_size", None)

    sizes = vocab_size(os.path.expanduser(policy)), vocab_size(reference)
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(
            f"`ref_model` {reference!r} has a vocabulary of {sizes[1]} tokens, the policy {policy!r} one of {sizes[0]}: "
            "the reference must use the policy's tokenizer. Point `ref_model` at a model of the same family."
        )

    def vocab(path: str):
        if not any(os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
            return None
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab()

    vocabularies = vocab(os.path.expanduser(policy)), vocab(reference)
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        raise ValueError(
            f"`ref_model` {reference!r} has another tokenizer vocabulary than the policy {policy!r}: its log-probs "
            "would score other tokens. Point `ref_model` at a model with the policy's tokenizer."
        )


#: transformers releases whose FlashAttention-2 path crashes (huggingface/transformers#45588, LLaMA-Factory #10610).
FA2_BROKEN_TRANSFORMERS = ("5.6.0",)


def check_flash_attention(flash_attn, transformers_version: str) -> None:
    """Refuse `flash_attn: fa2` on a transformers release whose FlashAttention-2 forward is broken."""
    if str(getattr(flash_attn, "value", flash_attn)) == "fa2" and transformers_version in FA2_BROKEN_TRANSFORMERS:
        raise ValueError(
            f"`flash_attn: fa2` crashes on transformers {transformers_version}: its flash_attention_forward calls "
            "`s_aux.to(...)` on None (huggingface/transformers#45588, LLaMA-Factory #10610). Install transformers "
            "5.5.4 (this project's pin) or >= 5.6.1 where your LLaMA-Factory allows it, or set `flash_attn: sdpa`."
        )


#: DeepSpeed releases whose ZeRO-3 gives a wrong reference model here (LLaMA-Factory 0.9.4 caps deepspeed at 0.16.9).
ZERO3_REFERENCE_MIN_DEEPSPEED = "0.17.0"


def check_zero3_reference(deepspeed_version: str) -> None:
    """Refuse a ZeRO-3 reference model on DeepSpeed < 0.17.

    Refuse a ZeRO-3 reference model on DeepSpeed < 0.17: measured with 0.16.9 (2 processes, CPU), its reference
    log-probs differed from one process at step 1 (torch 2.7) or were NaN (torch 2.9 and 2.11; stock DPO too).
    """
    from packaging.version import Version

    if Version(deepspeed_version) < Version(ZERO3_REFERENCE_MIN_DEEPSPEED):
        raise ValueError(
            f"`deepspeed` ZeRO-3 with a reference model needs deepspeed >= {ZERO3_REFERENCE_MIN_DEEPSPEED}, but "
            f"{deepspeed_version} is installed: its ZeRO-3 reference gave wrong or NaN log-probs in our tests (stock "
            "DPO too). Install deepspeed 0.19.8 (with LLaMA-Factory 0.9.4 also set DISABLE_VERSION_CHECK=1), or use "
            "ZeRO-2 (`ds_z2_config.json`)."
        )


def check_zero3_reference_early(raw) -> None:
    """``check_zero3_reference`` from the raw args (``integration.peek_args``), before anything starts DeepSpeed.

    Only where the raw args tell: a ZeRO-3 config file or dict, and a stage whose reference the raw routing options
    show. ``verify_plugin_args`` checks every run again once parsed.
    """
    import json
    from importlib.metadata import PackageNotFoundError, version

    from .stages import uses_reference

    config = raw.deepspeed
    if isinstance(config, str):
        try:
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return  # LLaMA-Factory reports a missing or broken file itself
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage == 3 and uses_reference(raw):
        try:
            check_zero3_reference(version("deepspeed"))
        except PackageNotFoundError:
            return


def reference_loaded_apart(finetuning_args) -> bool:
    """Whether the reference is a model loaded apart from the policy, not the policy with its adapters disabled.

    So it is with `ref_model`, full/freeze tuning, or LoRA's precompute pass under ZeRO-3 (which loads the base
    again, ``workflow.load_base_model``).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    return (
        finetuning_args.ref_model is not None
        or finetuning_args.finetuning_type != "lora"
        or (finetuning_args.precompute_ref_logps and is_deepspeed_zero3_enabled())
    )


def check_resized_vocabulary(tokenizer, template_added: int, model_args, data_args, finetuning_args) -> None:
    """Refuse `resize_vocab` growing the policy's vocabulary where the reference is loaded apart.

    LLaMA-Factory resizes the embeddings when the tokenizer has more tokens than the model has rows, and gives the new
    rows random values. A reference loaded apart (``create_ref_model``) loads the tokenizer again, without the
    template's tokens, so it keeps the old rows (an index error at the first step), or draws other random ones.
    Called once the template has fixed the tokenizer (``template_added``: the tokens it added), before any model loads.
    """
    from llamafactory.model import load_config

    if not (model_args.resize_vocab and finetuning_args.uses_reference and reference_loaded_apart(finetuning_args)):
        return
    config = load_config(model_args)
    if config.get_text_config() is not config:
        return  # a multimodal model's embedding may have more rows than its text vocabulary (mllama: 8 more)
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        cause = f"`template: {data_args.template}` added {template_added}" if template_added else "the tokenizer's own"
        raise ValueError(
            f"`resize_vocab` would grow the model's {rows} embedding rows to the tokenizer's {len(tokenizer)} tokens "
            f"({cause}) with random values, which a reference loaded apart from the policy (`ref_model`, full/freeze "
            "tuning, or LoRA's reference pass under ZeRO-3) would not have: it would not be the initial model. Add "
            "the tokens in a stock `stage: sft` run first (with `resize_vocab: true`) and train from its output, or "
            "use `finetuning_type: lora` without `ref_model`."
        )


def _run_label(finetuning_args) -> str:
    """`stage: x`, with the option that sends a `stage: sft` run to this package's workflow."""
    if finetuning_args.stage != "sft":
        return f"`stage: {finetuning_args.stage}`"
    return "`stage: sft` + " + (
        "`track_deviation`" if finetuning_args.track_deviation else "`sft_loss_reduction: sample`"
    )


def verify_plugin_args(model_args, data_args, training_args, finetuning_args, dataset_attrs) -> None:
    """Cross-argument checks of this package's runs, run before anything is loaded or written.

    ``dataset_attrs`` are LLaMA-Factory's ``DatasetAttr`` of the train and eval datasets.
    """
    import transformers
    from llamafactory.extras.misc import is_env_enabled
    from transformers.integrations import is_deepspeed_zero3_enabled

    stage = finetuning_args.stage
    check_flash_attention(model_args.flash_attn, transformers.__version__)
    ranking = sorted({attr.dataset_name for attr in dataset_attrs if attr.ranking})
    if ranking:
        raise ValueError(
            f"`dataset`/`eval_dataset` {', '.join(ranking)} is a ranking (pairwise) dataset, but `stage: {stage}` "
            "trains on single answers. Use a non-ranking (alpaca/sharegpt SFT) dataset, or `stage: dpo` for pairs."
        )

    if finetuning_args.ref_model is not None:
        ref = os.path.expanduser(finetuning_args.ref_model)
        offline = is_env_enabled("HF_HUB_OFFLINE")
        if (offline or looks_like_local_path(finetuning_args.ref_model)) and not os.path.exists(ref):
            raise ValueError(
                f"`ref_model` path {finetuning_args.ref_model!r} does not exist. Point `ref_model` at a model "
                "directory, or remove it to use the initial model as the reference."
            )

        if os.path.isfile(os.path.join(ref, "adapter_config.json")) and not os.path.isfile(
            os.path.join(ref, "config.json")
        ):
            raise ValueError(
                f"`ref_model` {finetuning_args.ref_model!r} is a LoRA adapter, not a model. Set `ref_model` to its "
                "base model and `ref_model_adapters` to this directory."
            )
        if os.path.exists(ref) and not os.path.isfile(os.path.join(ref, "config.json")):
            raise ValueError(
                f"`ref_model` {finetuning_args.ref_model!r} is "
                + ("a directory without a config.json" if os.path.isdir(ref) else "a file")
                + ", not a model directory. Point `ref_model` at the directory that holds the model's config.json "
                "and weights, or remove it to use the initial model as the reference."
            )
        _check_reference_vocabulary(model_args.model_name_or_path, ref, model_args.trust_remote_code)

    if stage == SFT_GO_STAGE and finetuning_args.sft_go_grouping == "tfidf" and not data_args.dataset:
        raise ValueError(
            "`sft_go_grouping: tfidf` takes its IDF from the training answers of `dataset`, which is not set. Set "
            "`dataset` (an evaluation-only run reads it too), or use `sft_go_grouping: rho1`."
        )

    run = _run_label(finetuning_args)
    if data_args.neat_packing:  # it sets `packing` too
        check_neat_packing(run, model_args, finetuning_args)
    elif data_args.packing:
        raise ValueError(
            f"`packing: true` cannot be used with {run}: it packs samples into one sequence with attention across "
            "them, so a sample's log π(y|x) would depend on the samples packed before it. Use `neat_packing: true` "
            "instead, which packs samples without attention between them, or set `packing: false`."
        )

    if not data_args.ignore_pad_token_for_loss:
        raise ValueError(
            f"`ignore_pad_token_for_loss: false` cannot be used with {run}: pad tokens would count as answer tokens, "
            "so m, log π(y|x), r and the token groups would depend on how each batch is padded. Remove "
            "`ignore_pad_token_for_loss` (its default is true)."
        )

    if finetuning_args.uses_reference and is_deepspeed_zero3_enabled():
        from importlib.metadata import version

        check_zero3_reference(version("deepspeed"))

    if (
        finetuning_args.uses_reference
        and finetuning_args.ref_model is None
        and finetuning_args.finetuning_type == "lora"
        and not training_args.do_train
    ):
        raise ValueError(
            f"{run} with `finetuning_type: lora` and `do_train: false` needs `ref_model`: without training, "
            "LLaMA-Factory merges the LoRA adapters into the model (or loads none), so there is no adapter-disabled "
            "model to serve as the reference. Set `ref_model` to the reference (for example the base model of "
            "`model_name_or_path`)."
        )

    if training_args.predict_with_generate or training_args.do_predict:
        raise ValueError(
            "`predict_with_generate`/`do_predict` are not supported by this package's workflow. "
            "Predict with a separate `stage: sft` run (`do_train: false`) on the trained model."
        )

    from .train.reference_cache import NEW_TOKEN_OPTIONS

    new_tokens = [name for name in NEW_TOKEN_OPTIONS if getattr(model_args, name, None)]
    loaded_apart = reference_loaded_apart(finetuning_args)
    if new_tokens and finetuning_args.uses_reference and loaded_apart:
        raise ValueError(
            f"`{new_tokens[0]}` cannot be used with {run} and a reference model loaded apart from the policy "
            "(`ref_model`, full/freeze tuning, or LoRA's reference pass under ZeRO-3): the new tokens' embeddings "
            "are initialised anew in each model load, so the reference would not be the initial model (and "
            "LLaMA-Factory cannot copy a parsed token list into a second model's arguments). Add the tokens in a "
            "stock `stage: sft` run first and train from its output, or use `finetuning_type: lora` without "
            f"`ref_model`, or remove `{new_tokens[0]}`."
        )

    # LLaMA-Factory loads the reference (`ref_model` too) with these options: weights drawn anew in each load
    drawn = "train_from_scratch" if model_args.train_from_scratch else None
    if getattr(model_args, "mixture_of_depths", None) == "convert":  # new routers
        drawn = drawn or "mixture_of_depths: convert"
    if drawn and finetuning_args.uses_reference and loaded_apart:
        raise ValueError(
            f"`{drawn}` cannot be used with {run} and a reference model loaded apart from the policy (`ref_model`, "
            "full/freeze tuning, or LoRA's reference pass under ZeRO-3): LLaMA-Factory loads the reference with the "
            "same option, so it draws other random weights and is neither the initial model nor `ref_model`'s "
            "weights. Use `finetuning_type: lora` without `ref_model` (its reference is the policy with the adapters "
            f"disabled), or remove `{drawn.split(':')[0]}`."
        )

    grouping = getattr(finetuning_args, "sft_go_grouping", None)
    if stage == SFT_GO_STAGE and grouping in ("tfidf", "llmlingua2") and data_args.streaming:
        raise ValueError(
            f"`sft_go_grouping: {grouping}` scores every training answer before training (the IDF over all of them, "
            "or the classifier's pass), which `streaming: true` never allows. Set `streaming: false`, or use "
            "`sft_go_grouping: rho1`, which groups by the reference during training."
        )

    if finetuning_args.precompute_ref_logps and data_args.streaming:
        raise ValueError(
            "`precompute_ref_logps` needs the whole data set before training, which `streaming: true` never has. "
            "Set `streaming: false`, or remove `precompute_ref_logps` to run the reference online."
        )

    check_loss_options(model_args, training_args, finetuning_args)

    engines = ("use_mca", "use_hyper_parallel", "use_megatron_bridge")  # main adds Megatron-Bridge
    other_engines = [name for name in engines if getattr(finetuning_args, name, False)]
    if other_engines:
        raise ValueError(
            f"`{'`/`'.join(other_engines)}` cannot be used with `stage: {stage}`: those engines have their own "
            "trainers, which have no reference model. Remove it."
        )


#: LLaMA-Factory's options that replace stock sft's token cross-entropy (0.9.4 has only the first)
LOSS_OPTIONS = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")


def check_neat_packing(run: str, model_args, finetuning_args) -> None:
    """`neat_packing` where its samples' per-sample quantities are those of the samples unpacked."""
    from .integration import layout

    if not layout().neat_packing:
        raise ValueError(
            f"`neat_packing` cannot be used with {run} on LLaMA-Factory {layout().label}: that version refuses it "
            'itself with transformers >= 4.53 ("Neat packing is incompatible with transformers>=4.53.0"), which '
            "its dependencies need, and this package is not tested with it there. Set `neat_packing: false`, or use "
            "LLaMA-Factory 0.9.5 or later."
        )
    if finetuning_args.precompute_ref_logps and str(model_args.flash_attn) == "fa2":
        raise ValueError(
            f"`neat_packing` with `precompute_ref_logps` and `flash_attn: fa2` is not supported yet with {run}: "
            "LLaMA-Factory's FlashAttention-2 packing collator takes one row per batch, and the reference pass batches "
            "samples. Precompute without `neat_packing` first (the cache is shared by packed and unpacked runs of the "
            "same data), or use `flash_attn: sdpa`."
        )
    if finetuning_args.stage == SFT_GO_STAGE and finetuning_args.sft_go_grouping == "llmlingua2":
        raise ValueError(
            "`neat_packing` with `sft_go_grouping: llmlingua2` is not supported yet: the classifier would score the "
            "answers of a packed row together. Use `sft_go_grouping: tfidf` or `rho1`, or `neat_packing: false`."
        )


def check_loss_options(model_args, training_args, finetuning_args) -> None:
    """Refuse what this package's runs would silently drop or could not compute.

    - LLaMA-Factory's loss options replace stock sft's cross-entropy. `stage: sft` + `track_deviation` keeps the
      stock loss, so `use_dft_loss` and `use_eaft_loss` work there (the deviation is logged beside them); every other
      run of this package has a loss of its own (Eq. 3, 5 or 7), which would ignore them, or SFT-GO's objective,
      which would apply them to its CE term alone. ASFT
      runs its own reference inside LLaMA-Factory's loss and returns no model outputs, so `track_deviation` has no
      log-probs to use.
    - Label smoothing changes the stock cross-entropy only, so it is refused where the loss is not that one.
    - Unsloth replaces the model's forward with its own, which reads the head's weight directly in some paths.
    """
    run = _run_label(finetuning_args)
    own_loss = finetuning_args.stage != "sft" or finetuning_args.sft_loss_reduction == "sample"
    if finetuning_args.stage == SFT_GO_STAGE:
        why = (
            "SFT-GO's objective (1 − λ)·CE + λ·max(L_important, L_unimportant) would apply it to CE alone, not to "
            "the group losses, a combination that neither paper defines"
        )
    else:
        why = "this run's loss is its own (MinorSFT Eq. 7, SFT using DPO Eq. 3 or Eq. 5's sample mean) and would ignore it"
    for name in LOSS_OPTIONS:
        if not getattr(finetuning_args, name, False):
            continue
        if own_loss:
            raise ValueError(
                f"`{name}` cannot be used with {run}: it replaces stock sft's token cross-entropy, and {why}. Remove "
                f"`{name}`, or use it with plain `stage: sft` (add `track_deviation: true` to log the deviation "
                "beside it)."
            )
        if name == "use_asft_loss":
            raise ValueError(
                f"`use_asft_loss` cannot be used with {run}: LLaMA-Factory's ASFT loss runs its own reference model "
                "and returns no model outputs, so there are no policy log-probs for the deviation metric. Remove "
                "`track_deviation` (ASFT then trains as stock sft does), or `use_asft_loss`."
            )

    if own_loss and getattr(training_args, "label_smoothing_factor", 0.0):
        raise ValueError(
            f"`label_smoothing_factor` cannot be used with {run}: it smooths stock sft's token cross-entropy, and "
            f"{why}. Remove `label_smoothing_factor`."
        )

    if getattr(model_args, "use_unsloth", False):
        refuse_unsloth(finetuning_args)


def refuse_unsloth(finetuning_args) -> None:
    """`use_unsloth` with a run of this package (``finetuning_args``: parsed, or the raw ones)."""
    raise ValueError(
        f"`use_unsloth` cannot be used with {_run_label(finetuning_args)}: Unsloth replaces the model's forward with "
        "its own, which reads the output head's weight directly in some of its paths, while this package's stages "
        "compute the answer log-probs (and the reference's) through that head; the combination is untested (Unsloth "
        "needs CUDA). "
        "Remove `use_unsloth`; `enable_liger_kernel: true` gives fused kernels that these stages support."
    )
