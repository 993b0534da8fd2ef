"""The math of arXiv 2408.10642 §3 as pure functions: tensors in, tensors out.

Notation (per sample i): y_i is the answer, m_i its number of tokens (labels that are not IGNORE_INDEX),
``log π(y_i|x_i)`` the SUM of its answer-token log-probs, and r_i = log πθ(y_i|x_i) − log πref(y_i|x_i).

A sample whose answer was cut away by ``cutoff_len`` (m_i = 0) is not "valid": it gets loss 0, zero
gradient, and is left out of every batch mean. Nothing here divides by zero.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100  # LLaMA-Factory's extras.constants.IGNORE_INDEX (kept here so this module stays pure)
# A reference that gives an answer probability 0 (log πref = −inf, e.g. a masked or underflowed token) would make
# r = +inf and the deviation metric inf. Its log-prob counts as this floor instead: e^(−1e6) is 0 in every float
# format, and no real answer reaches it (that would take 100,000 tokens at 10 nats each), so no real value moves.
REF_LOGPS_FLOOR = -1.0e6


class AnswerLogps(NamedTuple):
    """Summed answer log-probs and answer lengths of a batch, both of shape (batch,)."""

    logps: torch.Tensor  # float32 sums of answer-token log-probs (0 for m_i = 0)
    num_tokens: torch.Tensor  # m_i, int64


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] at every position, without a full-vocabulary float32 copy.

    Forward keeps only the float32 log-sum-exp per position (batch × length); backward recomputes the
    softmax one chunk of positions at a time: ∂/∂logits = (onehot(target) − softmax(logits))·grad.
    Peak extra memory is one float32 chunk (batch × chunk × vocab) instead of two full copies.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        logsumexp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for start in range(0, targets.size(1), chunk_size):
            logsumexp[:, start : start + chunk_size] = torch.logsumexp(
                logits[:, start : start + chunk_size].float(), -1
            )

        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, targets, logsumexp)
        ctx.chunk_size = chunk_size
        return picked - logsumexp

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, targets.size(1), ctx.chunk_size):
            window = slice(start, start + ctx.chunk_size)
            upstream = grad_output[:, window].unsqueeze(-1).float()
            grad = torch.exp(logits[:, window].float() - logsumexp[:, window].unsqueeze(-1)).mul_(-upstream)
            grad.scatter_add_(-1, targets[:, window].unsqueeze(-1), upstream)
            grad_logits[:, window] = grad.to(grad_logits.dtype)

        return grad_logits, None, None


def answer_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log πθ(y_t | x, y_<t) of the answer tokens, and their mask.

    Causal shift as in the model's own loss: the logits at position t score the label at t + 1. Memory-lean
    (see ``_TokenLogps``): for Qwen2's 151,646-token vocabulary a batch of 4 × 1024 tokens would otherwise
    cost about 2.5 GB per float32 log-softmax copy. Values are float32 whatever the logits' dtype.

    Returns ``(token_logps, mask)``, both (batch, length − 1); masked positions hold 0.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match.")

    # targets[t] = labels[t + 1]: align without slicing (and copying) the logits
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), ignore_index)], dim=1)
    mask = targets != ignore_index
    token_logps = _TokenLogps.apply(logits, targets.masked_fill(~mask, 0), chunk_size)
    token_logps = token_logps.masked_fill(~mask, 0.0)
    return token_logps[:, :-1], mask[:, :-1]


#: logits projected at once (float32): about 256 MB, 441 rows at Qwen2's 151,936-token vocabulary
CHUNK_ELEMENTS = 2**26


def _answer_chunks(mask: torch.Tensor, vocab_size: int):
    """(row, answer positions, last chunk of the row?) of each chunk: at most ``CHUNK_ELEMENTS`` logits of a sample.

    The chunks are the same wherever they are used, so the reference and the fused policy make the same float
    operations (identical log-probs for identical weights).
    """
    rows = max(16, CHUNK_ELEMENTS // vocab_size)
    for i in range(mask.size(0)):
        positions = mask[i].nonzero().squeeze(-1)
        for start in range(0, positions.numel(), rows):
            yield i, positions[start : start + rows], start + rows >= positions.numel()


def _picked_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each row's target, log-sum-exp of each row) of float32 ``logits``."""
    logsumexp = torch.logsumexp(logits, -1, keepdim=True)
    return (logits.gather(-1, targets.unsqueeze(-1)) - logsumexp).squeeze(-1), logsumexp


def projected_token_logps(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``answer_token_logps`` from the final hidden states, never building the (batch, length, vocabulary) logits.

    Only the answer positions are projected through ``head`` (a module call, so DeepSpeed ZeRO-3 gathers its
    weight), one chunk of a sample at a time. Meant for no-grad reference passes; with gradients on, every chunk's
    logits are kept for backward. Returns ``(token_logps, mask)``, both (batch, length − 1).
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    for i, positions, _ in _answer_chunks(mask, head.out_features):
        token_logps[i, positions] = _picked_logps(head(hidden[i, positions]).float(), targets[i, positions])[0]

    return token_logps, mask


def _head_grads(logits, logsumexp, targets, slope, hidden, weight, grad_weight) -> torch.Tensor:
    """The gradient of a chunk's hidden states (returned) and head weight (added to ``grad_weight``).

    dL/dlogits = slope · (onehot − softmax) is built in place in the float32 ``logits``; ``slope`` is
    dL/d log π of each position of the chunk, shape (positions, 1).
    """
    grad_logits = logits.sub_(logsumexp).exp_().mul_(-slope)
    grad_logits.scatter_add_(-1, targets.unsqueeze(-1), slope)
    grad_logits = grad_logits.to(weight.dtype)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t().float(), hidden.float())
    return grad_logits @ weight


class _FusedAnswerLoss(torch.autograd.Function):
    """A loss of the answer-token log-probs, with the head's gradients computed in the forward pass.

    The answer logits are built one chunk at a time; their log-probs and the loss's slopes dL/d log π(y_t|x, y_<t)
    are taken, and the logits turned in place into dL/dlogits. Backward only scales the stored gradients.

    ``rowwise``: each sample's term depends on its own tokens only, so a sample's slopes are known once its last
    chunk is in, and its logits are kept until then: three head matmuls per step, as stock SFT's cross-entropy.
    Otherwise (a loss that couples the samples, as a worst group over the batch) the slopes wait for the whole
    batch and the logits are projected a second time: four matmuls, memory for one chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, loss_fn, rowwise):
        token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None

        def project(i, positions):
            logits = torch.nn.functional.linear(hidden[i, positions], weight).float()
            token_logps[i, positions], logsumexp = _picked_logps(logits, targets[i, positions])
            return logits, logsumexp

        def backprop(i, positions, logits, logsumexp, slopes):
            slope = slopes[i, positions].unsqueeze(-1)
            rows = hidden[i, positions]
            grad_hidden[i, positions] = _head_grads(
                logits, logsumexp, targets[i, positions], slope, rows, weight, grad_weight
            )

        if rowwise:
            chunks = []  # the current sample's (positions, logits, log-sum-exp)
            for i, positions, last in _answer_chunks(mask, weight.size(0)):
                chunks.append((positions, *project(i, positions)))
                if last:  # sample i is complete; the other samples' terms do not depend on it
                    row = torch.zeros_like(token_logps)
                    row[i] = token_logps[i]
                    slopes = _slopes(loss_fn, row)
                    for chunk in chunks:
                        backprop(i, *chunk, slopes)
                    chunks = []
        else:
            chunks = [(i, positions) for i, positions, _ in _answer_chunks(mask, weight.size(0))]
            logsumexps = [project(i, positions)[1] for i, positions in chunks]
            slopes = _slopes(loss_fn, token_logps)
            for (i, positions), logsumexp in zip(chunks, logsumexps):
                logits = torch.nn.functional.linear(hidden[i, positions], weight).float()
                backprop(i, positions, logits, logsumexp, slopes)

        loss = loss_fn(token_logps)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(token_logps)
        return loss, token_logps

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight, None, None, None, None


def _slopes(loss_fn, token_logps: torch.Tensor) -> torch.Tensor:
    """dL/d log π of every answer token, by autograd of ``loss_fn`` at ``token_logps``."""
    with torch.enable_grad():
        leaf = token_logps.detach().requires_grad_()
        return torch.autograd.grad(loss_fn(leaf), leaf)[0]


def fused_answer_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_fn,
    rowwise: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loss of the answer-token log-probs straight from the final hidden states and the head's ``weight`` (no bias).

    ``loss_fn`` maps the token log-probs (batch, length − 1), 0 off the answers, to a scalar. ``rowwise``: each
    sample's term depends on its own row only (Eq. 3, 5, 7 and the token-mean cross-entropy do); False for a loss
    that couples the samples. Same values and gradients as ``loss_fn`` of ``projected_token_logps``, without
    keeping any logits for backward. Returns ``(loss, token_logps, mask)``; the token log-probs carry no gradient.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    loss, token_logps = _FusedAnswerLoss.apply(hidden[:, :-1], weight, targets.clamp(min=0), mask, loss_fn, rowwise)
    return loss, token_logps, mask


def answer_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> AnswerLogps:
    """Log π(y_i|x_i) as the SUM over answer tokens (the paper's convention, as in DPO), and m_i."""
    token_logps, mask = answer_token_logps(logits, labels, ignore_index)
    return AnswerLogps(token_logps.sum(-1), mask.sum(-1))


def log_ratio(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """r_i = log πθ(y_i|x_i) − log πref(y_i|x_i); β·r_i is the implicit reward r̂θ of §3.1.

    log πref is floored at ``REF_LOGPS_FLOOR`` (a reference probability of 0 stays finite), in float32.
    """
    return policy_logps.float() - floored_ref_logps(ref_logps)


def floored_ref_logps(ref_logps: torch.Tensor) -> torch.Tensor:
    """Log πref(y|x) in float32, with −inf (a reference probability 0) raised to ``REF_LOGPS_FLOOR``."""
    return ref_logps.float().nan_to_num(neginf=REF_LOGPS_FLOOR).clamp(min=REF_LOGPS_FLOOR)


def sft_sample_loss(policy_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """SFT per-sample loss as the paper writes it, Eq. 5:  L_i = −(1/m_i)·log πθ(y_i|x_i).

    Eq. 5 averages L_i over the samples of a batch, as MinorSFT (Eq. 7) and SFT using DPO (Eq. 3) do; stock
    LLaMA-Factory SFT instead averages over all answer tokens of the batch. Returns shape (batch,); invalid
    samples (m_i = 0) have loss 0.
    """
    mean_nll = -policy_logps.float() / num_tokens.clamp(min=1)
    return torch.where(num_tokens > 0, mean_nll, torch.zeros_like(mean_nll))


def minorsft_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MinorSFT per-sample loss whose gradient is Eq. 7.

    Eq. 7:  ∇θ L_MinorSFT = −E[(2/m)·σ(−β·r)·∇θ log πθ(y|x)].

    The paper gives only the gradient. We use the surrogate L_i = c_i · (−log πθ(y_i|x_i) / m_i) with the
    coefficient c_i = 2σ(−β r_i) held constant (detached): its gradient is exactly Eq. 7, and its value is
    the coefficient times the mean token NLL, so it reads like plain SFT's loss (c_i = 1 at the start,
    where πθ = πref).

    Returns ``(losses, coef)`` of shape (batch,); invalid samples (m_i = 0) have loss 0.
    """
    coef = 2.0 * torch.sigmoid(-beta * log_ratio(policy_logps, ref_logps).detach())
    return coef * sft_sample_loss(policy_logps, num_tokens), coef


def sft_dpo_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss of "SFT using DPO", Eq. 3:  L_i = −log σ(β·r_i).

    Its gradient is Eq. 4, −β·σ(−β r_i)·∇θ log πθ(y_i|x_i); the returned coefficient is σ(−β r_i).
    ``logsigmoid`` keeps it finite for |β·r| in the thousands.

    Returns ``(losses, coef)`` of shape (batch,); invalid samples (m_i = 0) have loss 0.
    """
    valid = num_tokens > 0
    ratio = log_ratio(policy_logps, ref_logps)
    losses = torch.where(valid, -F.logsigmoid(beta * ratio), torch.zeros_like(ratio))
    return losses, torch.sigmoid(-beta * ratio.detach())


def normalized_log_ratio(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor
) -> torch.Tensor:
    """(1/m_i)·r_i, the per-sample term of the deviation metric m_θ of Eq. 8 (0 where m_i = 0).

    Eq. 8:  m_θ(x, y) = (1/N) Σ_i (1/m_i) log(πθ(y_i|x_i) / πref(y_i|x_i)), the mean over the N valid
    samples of a batch; it is comparable across β and answer lengths.
    """
    ratio = log_ratio(policy_logps, ref_logps)
    return torch.where(num_tokens > 0, ratio / num_tokens.clamp(min=1), torch.zeros_like(ratio))
