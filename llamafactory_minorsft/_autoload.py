"""Executed at interpreter start-up by ``llamafactory_minorsft.pth``.

It installs one import hook (``hooks.PostImportFinder``, standard library only) and imports nothing else: not
LLaMA-Factory, torch or transformers, not even this package's ``integration``. The hook patches LLaMA-Factory right
after the relevant module is imported, in every process of the environment: ``llamafactory-cli``, its
torchrun/DeepSpeed children, the web UI and Ray workers.

What every other Python process of the environment pays is this package's ``__init__``, ``stages``, ``hooks`` and
this module, and one set lookup per import. ``benchmarks/bench_startup.py`` measures it against the same interpreter
with ``LLAMAFACTORY_MINORSFT_DISABLE=1``, in wall-clock start-up time and in ``python -X importtime``
(``benchmarks/STARTUP.md``).
"""

import os

from . import DISABLE_ENV


def _disabled() -> bool:
    # LLaMA-Factory's ``is_env_enabled`` rule; the helper itself cannot be imported here (it imports torch, and a
    # post-import hook can fire while the module that imports it is only half-initialized)
    return os.getenv(DISABLE_ENV, "0").lower() in ("true", "y", "1")


if not _disabled():
    from .hooks import install

    install()
