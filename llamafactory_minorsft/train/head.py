"""Answer log-probs without the full logits: the output head computes them inside the model's forward.

Within ``head_computes``, the model's output head returns what a function of the final hidden states and the head
computes (``losses.projected_token_logps``, ``losses.fused_answer_loss``) in place of the logits. The head is still
called by the model's own forward, so everything around that call holds as for stock training: accelerate's
autocast, DeepSpeed ZeRO-3's hooks (they gather the head's weight for the forward and again for the backward, and
reduce its gradient), and DDP, which sees the weight used in its forward (``find_unused_parameters``).

This needs a causal LM whose forward is ``logits = self.lm_head(hidden_states[...])`` and nothing else: no logit
scaling or soft-capping, a plain ``nn.Linear`` head (tied to the embeddings or not) that no adapter wraps. Other
models keep the full-logits path, which gives the same values.
"""

from collections.abc import Callable
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
    plain = type(head) is torch.nn.Linear and head.bias is None
    if model_type in PLAIN_HEAD_MODEL_TYPES and plain and "forward" not in vars(head):  # no hook wraps its forward
        return head
    return None


@contextmanager
def head_computes(model: torch.nn.Module, compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Within, the head of ``model`` returns ``compute(hidden_states, head.weight)``, so ``model(...).logits`` is that.

    The head's ``forward`` is shadowed on the instance (its module call and module hooks stay); ``plain_head(model)``
    must hold, so no other instance-level ``forward`` (accelerate's device-map hooks) is there to shadow.
    """
    head = plain_head(model)
    if head is None:
        raise ValueError("head_computes needs a plain output head whose forward nothing wraps (see plain_head).")
    head.forward = lambda hidden_states: compute(hidden_states, head.weight)
    try:
        yield head
    finally:
        del head.forward
