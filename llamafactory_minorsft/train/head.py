"""Answer log-probs without the full logits: the output head computes them inside the model's forward.

Within ``head_computes``, the model's output head returns what a function of the final hidden states and the head
computes (``losses.projected_token_logps``, ``losses.fused_answer_loss``) in place of the logits. The head is still
called by the model's own forward, so everything around that call holds as for stock training: accelerate's
autocast, DeepSpeed ZeRO-3's hooks (they gather the head's weight for the forward and again for the backward, and
reduce its gradient), and DDP, which sees the weight used in its forward (``find_unused_parameters``).

A head tied to the input embeddings that is trained (full tuning) takes one more step: the embedding's backward
adds its rows into the head's gradient (``_TiedEmbedding``) instead of making a dense gradient of the head's size
that autograd then sums with it, a transient of the head's size at the end of every backward (933 MB at Qwen2-1.5B's
head in float32). Not under ZeRO-3, whose hooks own the partitioned weight and its gradient.

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


class _TiedGradient:
    """The tied weight's gradient from the head's backward, handed to the embedding's backward (which runs later)."""

    def __init__(self) -> None:
        self.grad: Optional[torch.Tensor] = None
        self.embedded = False  # the embedding's backward has run

    def check_consumed(self) -> None:
        if self.grad is not None:  # never drop a gradient silently
            self.grad = None
            raise RuntimeError(
                "The tied head's gradient was not added to the input embedding's: its backward never ran."
            )


class _HeadSide(torch.autograd.Function):
    """The tied weight as the head sees it; backward passes the head's gradient on to the embedding's backward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, tied: _TiedGradient) -> torch.Tensor:
        ctx.tied = tied
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.tied.embedded:  # the embedding went first after all: autograd sums the two, as stock
            return grad, None
        ctx.tied.grad = grad
        torch.autograd.Variable._execution_engine.queue_callback(ctx.tied.check_consumed)
        return None, None


class _TiedEmbedding(torch.autograd.Function):
    """``F.embedding`` whose weight gradient is the head's, plus the embedding's rows added in place.

    Stock's sum (the head's gradient + the embedding's dense gradient) without the dense one: each distinct token's
    rows are summed by stock's own kernel (``embedding_dense_backward``: float32 accumulation on a GPU, deterministic)
    and added once, so a frequent token rounds once in half precision, as stock.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int], tied: _TiedGradient):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.dtype, ctx.padding_idx, ctx.tied = weight.shape, weight.dtype, padding_idx, tied
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (ids,) = ctx.saved_tensors
        grad, ctx.tied.grad, ctx.tied.embedded = ctx.tied.grad, None, True
        if grad is None:  # the head made no gradient (it was not reached)
            grad = grad_output.new_zeros(ctx.shape, dtype=ctx.dtype)
        tokens, inverse = ids.reshape(-1).unique(return_inverse=True)
        padding = -1  # as nn.Embedding: the padding row gets no gradient
        if ctx.padding_idx is not None and (tokens == ctx.padding_idx).any():
            padding = int((tokens == ctx.padding_idx).nonzero()[0, 0])
        rows = torch.ops.aten.embedding_dense_backward(
            grad_output.reshape(-1, ctx.shape[1]), inverse, tokens.numel(), padding, False
        )
        return None, grad.index_add_(0, tokens, rows.to(grad.dtype)), None, None


def tied_embedding(model: torch.nn.Module, head: torch.nn.Linear) -> Optional[torch.nn.Embedding]:
    """The input embedding that shares ``head``'s weight, if its gradient can be added into the head's here."""
    embedding = causal_lm(model).get_input_embeddings()
    if (
        type(embedding) is not torch.nn.Embedding
        or embedding.weight is not head.weight
        or not head.weight.requires_grad
        or hasattr(head.weight, "ds_id")  # ZeRO-3 partitions it
        or embedding.max_norm is not None
        or embedding.scale_grad_by_freq
        or embedding.sparse
        or "forward" in vars(embedding)
    ):
        return None
    return embedding


@contextmanager
def head_computes(model: torch.nn.Module, compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Within, the head of ``model`` returns ``compute(hidden_states, head.weight)``, so ``model(...).logits`` is that.

    The head's ``forward`` is shadowed on the instance (its module call and module hooks stay); ``plain_head(model)``
    must hold, so no other instance-level ``forward`` (accelerate's device-map hooks) is there to shadow.
    """
    head = plain_head(model)
    if head is None:
        raise ValueError("head_computes needs a plain output head whose forward nothing wraps (see plain_head).")
    embedding = tied_embedding(model, head) if torch.is_grad_enabled() else None
    if embedding is None:
        head.forward = lambda hidden_states: compute(hidden_states, head.weight)
    else:
        pending: list[_TiedGradient] = []  # from the embedding to the head, within one call of the model

        def embed(ids: torch.Tensor) -> torch.Tensor:
            pending.clear()
            if not torch.is_grad_enabled():
                return torch.nn.functional.embedding(ids, embedding.weight, embedding.padding_idx)
            pending.append(_TiedGradient())
            return _TiedEmbedding.apply(ids, embedding.weight, embedding.padding_idx, pending[0])

        def project(hidden_states: torch.Tensor) -> torch.Tensor:
            weight = _HeadSide.apply(head.weight, pending.pop()) if pending else head.weight
            return compute(hidden_states, weight)

        embedding.forward, head.forward = embed, project
        hook = causal_lm(model).register_forward_pre_hook(lambda *_: pending.clear())
    try:
        yield head
    finally:
        del head.forward
        if embedding is not None:
            del embedding.forward
            hook.remove()
