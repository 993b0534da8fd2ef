"""Executed at interpreter start-up by ``llamafactory_minorsft.pth``.

It only installs post-import hooks (wrapt): nothing of LLaMA-Factory, torch or transformers is imported here,
so Python processes that never import ``llamafactory`` pay nothing. The hooks patch LLaMA-Factory right after
the relevant module is imported, in every process of the environment: ``llamafactory-cli``, its
torchrun/DeepSpeed children and the web UI.
"""

import os

from . import DISABLE_ENV


def _disabled() -> bool:
    # LLaMA-Factory's ``is_env_enabled`` rule; the helper itself cannot be imported here (it imports torch, and a
    # post-import hook can fire while the module that imports it is only half-initialized)
    return os.getenv(DISABLE_ENV, "0").lower() in ("true", "y", "1")


def _install_hooks() -> None:
    import wrapt

    from .integration import HOOKED_MODULES

    for module_name, patch in HOOKED_MODULES.items():
        wrapt.register_post_import_hook(patch, module_name)


if not _disabled():
    _install_hooks()
