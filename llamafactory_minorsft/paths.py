"""What a path the user gave can be used for: standard library only.

The tools (``llamafactory-minorsft``, ``reproduction/reproduce.py``) refuse an unusable path with these before they
import torch, transformers or LLaMA-Factory, so such a refusal takes a moment, not the seconds those imports do.
"""

import os


def unwritable(path: str) -> str | None:
    """Why ``path`` cannot be, or be made, a directory this process writes into; None if it can."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable"
    return None


def looks_like_local_path(name: str) -> bool:
    # Hub ids are "org/name"; anything absolute, relative-dotted or home-based is meant as a local path.
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or name.count("/") > 1
