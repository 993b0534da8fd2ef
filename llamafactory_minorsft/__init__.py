"""Reference-aware SFT stages for LLaMA-Factory: MinorSFT, SFT using DPO, SFT-GO and the deviation metric.

Paper: "Minor SFT loss for LLM fine-tune to increase performance and reduce model deviation",
arXiv 2408.10642. Installing the package registers the stages in every Python process of the
environment (see ``_autoload``); :func:`register` does it explicitly.

This module stays import-light: it runs at interpreter start-up through a ``.pth`` file.
"""

from .stages import NEW_STAGES, REFERENCE_STAGES, SFT_GO_STAGE


__version__ = "0.1.0"

#: Set to 1/true to turn the automatic registration at import of ``llamafactory`` off.
DISABLE_ENV = "LLAMAFACTORY_MINORSFT_DISABLE"


def register() -> None:
    """Register the new stages and options with LLaMA-Factory.

    Idempotent; call it before ``llamafactory.train.tuner.run_exp(...)`` when the automatic
    registration is turned off (``LLAMAFACTORY_MINORSFT_DISABLE=1``) or in an environment where the
    ``.pth`` file is not installed. Raises ``RuntimeError`` on an untested LLaMA-Factory version.
    """
    from .integration import register_all

    register_all()


__all__ = ["DISABLE_ENV", "NEW_STAGES", "REFERENCE_STAGES", "SFT_GO_STAGE", "__version__", "register"]
