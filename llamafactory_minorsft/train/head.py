"""Answer log-probs without the full logits.

The decoder runs with its output head switched off, and the head then
projects only the answer positions, a chunk at a time (``losses.projected_token_logps`` and
``losses.fused_answer_loss``).

This needs a causal LM whose forward is ``logits = self.lm_head(hidden_states[...])`` and nothing else: no logit
scaling or soft-capping, a plain ``nn.Linear`` head (tied to the embeddings or not) that no adapter wraps. Other
models keep the full-logits path, which gives the same values.
"""

from contextlib import contextmanager
from typing import Optional

import torch


#: model types whose causal LM forward only applies ``lm_head`` to the final hidden states
PLAIN_HEAD_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside DeepSpeed, DDP and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DeepSpeed, DDP
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def plain_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The output head of ``model`` if the head-free path gives exactly its log-probs, else None."""
    lm = causal_lm(model)
    head = getattr(lm, "lm_head", None)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in PLAIN_HEAD_MODEL_TYPES and type(head) is torch.nn.Linear and head.bias is None:
        return head
    return None


@contextmanager
def hidden_states_as_logits(model: torch.nn.Module):
    """Within, ``model(...).logits`` are the final hidden states: the head is an identity. Yields the head."""
    lm = causal_lm(model)
    head = lm.lm_head
    lm.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        lm.lm_head = head
