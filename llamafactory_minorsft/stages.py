"""The stages this package adds and the three questions every layer asks about a run.

Import-light (no torch, no LLaMA-Factory): the post-import hooks and the raw-argument peek use it too. Each
predicate reads the attributes ``stage``, ``track_deviation``, ``sft_loss_reduction`` and ``sft_go_grouping`` of
parsed arguments, or of a namespace of raw ones (missing attributes take their defaults).
"""

#: MinorSFT (Eq. 7) and SFT using DPO (Eq. 3) of arXiv 2408.10642: their loss needs a reference model.
REFERENCE_STAGES = ("minorsft", "sft_dpo")
#: SFT-GO, group-optimized SFT (arXiv 2506.15021).
SFT_GO_STAGE = "sft_go"
#: Every stage this package adds.
NEW_STAGES = (*REFERENCE_STAGES, SFT_GO_STAGE)


def _get(args, name: str, default=None):
    return getattr(args, name, default)


def is_plugin_run(args) -> bool:
    """This package's workflow trains the run: a new stage, or `stage: sft` with an option of ours."""
    stage = _get(args, "stage")
    return stage in NEW_STAGES or (
        stage == "sft" and (bool(_get(args, "track_deviation")) or _get(args, "sft_loss_reduction") == "sample")
    )


def needs_token_ref_logps(args) -> bool:
    """Every answer token's reference log-prob is needed, not only their sum: SFT-GO's Rho-1 grouping."""
    return _get(args, "stage") == SFT_GO_STAGE and _get(args, "sft_go_grouping", "tfidf") == "rho1"


def uses_reference(args) -> bool:
    """A reference model is involved: for the loss, the Rho-1 grouping or the deviation metric (Eq. 8)."""
    stage = _get(args, "stage")
    return (
        stage in REFERENCE_STAGES
        or (stage in ("sft", SFT_GO_STAGE) and bool(_get(args, "track_deviation")))
        or needs_token_ref_logps(args)
    )
