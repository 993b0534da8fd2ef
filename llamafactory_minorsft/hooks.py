"""Post-import hooks with the standard library alone: patch LLaMA-Factory's modules right after they are imported.

``PostImportFinder`` sits first on ``sys.meta_path`` and finds nothing itself. For a module named in ``HOOKED`` it
asks the finders after it for the module's spec, and wraps that spec's loader (``PatchingLoader``) to run the
module's patch (``integration.HOOKED_MODULES``) as soon as the module has executed, before ``import`` hands it out. Every other
import costs one set lookup. Import-light: this module imports ``sys`` only, and ``integration`` (with its own
imports) is imported the first time a hooked module is.
"""

import sys


#: the modules that ``integration.HOOKED_MODULES`` patches (its keys; ``tests/test_registration.py`` keeps them equal)
HOOKED = frozenset(
    {
        "llamafactory.hparams.parser",
        "llamafactory.train.tuner",
        "llamafactory.extras.constants",
        "llamafactory.webui.locales",
        "llamafactory.webui.components.train",
        "llamafactory.webui.runner",
        "llamafactory.webui.control",
    }
)


def patch(module) -> None:
    from .integration import HOOKED_MODULES

    HOOKED_MODULES[module.__name__](module)


class PostImportFinder:
    """A meta path finder that wraps the loader of each hooked module to patch it after it executes."""

    def __init__(self) -> None:
        self.finding: set[str] = set()  # the names being looked up by the finders after this one

    def find_spec(self, name: str, path=None, target=None):
        if name not in HOOKED or name in self.finding:
            return None

        self.finding.add(name)
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is not self and find is not None:
                    spec = find(name, path, target)
                    if spec is not None:
                        break
        finally:
            self.finding.discard(name)

        if getattr(spec, "loader", None) is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = PatchingLoader(spec.loader)  # this module's only (a zip importer serves a whole archive)
        return spec


class PatchingLoader:
    """The module's own loader, which then patches it; every other attribute is the loader's."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        patch(module)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), and patch the hooked modules already imported."""
    if not any(isinstance(finder, PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())

    for name in HOOKED:
        if name in sys.modules:
            patch(sys.modules[name])
