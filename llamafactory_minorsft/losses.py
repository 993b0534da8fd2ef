"""The math of arXiv 2408.10642 §3 as pure functions: tensors in, tensors out.

Notation (per sample i): y_i is the answer, m_i its number of tokens (labels that are not IGNORE_INDEX),
``log π(y_i|x_i)`` the SUM of its answer-token log-probs, and r_i = log πθ(y_i|x_i) − log πref(y_i|x_i).

A sample whose answer was cut away by ``cutoff_len`` (m_i = 0) is not "valid": it gets loss 0, zero
gradient, and is left out of every batch mean. Nothing here divides by zero.
"""

from typing import NamedTuple, Optional

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


#: logits projected at once: 256 MB in float32, 441 answer positions at Qwen2's 151,936-token vocabulary
CHUNK_ELEMENTS = 2**26
#: bytes of logits that ``fused_answer_loss`` keeps from its forward for its backward (the last chunks), in the head's
#: compute dtype: 2^27 logits in float32, 2^28 in half precision. The other chunks are projected again in backward
#: (one more head matmul for them). Bounded in bytes, whatever the answers' length, the head's size and the dtype:
#: they are alive when the head's gradient is made.
KEPT_BYTES = 2**29
#: elements of a half-precision product of the head's gradient made at once (8 MB, and 16 MB for its float32 copy on
#: the CPU), before they are added to its float32 sum: alive on top of that sum, at the peak of the head's backward
#: (blocks of ``CHUNK_ELEMENTS``, a 128 MB product and its 256 MB float32 copy at Qwen2-1.5B's head, left that peak
#: 457 MB higher in bf16 at 1 x 256 tokens)
PRODUCT_ELEMENTS = 2**22
#: logits taken to float32 at once within a chunk, through one buffer reused by every block: on the CPU a few rows
#: (4 MB, about the cache's size), elsewhere 96 MB (fewer, larger kernels). On the CPU, a chunk-sized temporary costs a
#: page fault per 4 KB page and a trip through memory per operation: the log-sum-exp of a 441-position chunk at
#: Qwen2's vocabulary took 0.18 s in float32 in 96 MB blocks, 0.065 s in 4 MB blocks (one thread).
ROW_ELEMENTS = 2**20
DEVICE_ROW_ELEMENTS = 3 * 2**23


def _row_blocks(logits: torch.Tensor) -> list[slice]:
    """``logits``' rows in blocks of about ``ROW_ELEMENTS`` elements on the CPU (one row more at most), sizes ± one row."""
    limit = ROW_ELEMENTS if logits.device.type == "cpu" else DEVICE_ROW_ELEMENTS
    blocks = max(1, -(-logits.numel() // limit))
    bounds = [logits.size(0) * index // blocks for index in range(blocks + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]


def _float32_buffer(logits: torch.Tensor, blocks: list[slice]) -> torch.Tensor:
    """One float32 buffer for the largest of ``blocks`` of ``logits``' rows."""
    rows = max((block.stop - block.start for block in blocks), default=0)
    return torch.empty(rows, logits.size(-1), dtype=torch.float32, device=logits.device)


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits.float(), -1)`` of 2-D ``logits``, one row block at a time through one float32 buffer.

    ATen's own steps (max, infinite maxes taken as 0, exp, sum, log, add), so on the CPU the same bits wherever a block
    holds two rows or more (one row of a large vocabulary may be summed by several threads in another order).
    """
    assert logits.dim() == 2, logits.shape
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    if logits.size(0) == 0:
        return out
    blocks = _row_blocks(logits)
    buffer = _float32_buffer(logits, blocks)
    for rows in blocks:
        block = buffer[: rows.stop - rows.start].copy_(logits[rows])
        maxes = block.amax(-1, keepdim=True)
        maxes.masked_fill_(maxes.abs() == float("inf"), 0)  # as torch.logsumexp does for rows with an infinite max
        torch.sum(block.sub_(maxes).exp_(), -1, out=out[rows])
        out[rows].log_().add_(maxes.squeeze(-1))
    return out


def _logits_buffer(bounds: list[tuple[int, int]], weight: torch.Tensor) -> torch.Tensor:
    """One buffer for the logits of the largest chunk of ``bounds``, reused by each chunk that is not kept.

    A new chunk-sized tensor per chunk costs the CPU a page fault per 4 KB page: the projection of a 441-position
    chunk at Qwen2's vocabulary took 0.21 s in bf16 into a new tensor, 0.09 s into a reused one (one thread).
    """
    positions = max((stop - start for start, stop in bounds), default=0)
    return torch.empty(positions, weight.size(0), dtype=weight.dtype, device=weight.device)


def head_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype stock training projects through the head in: autocast's where it is on, else the weight's own."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _Chunks(NamedTuple):
    """The answer positions of a batch, flat in row-major order, and the bounds of each chunk of them."""

    rows: torch.Tensor
    cols: torch.Tensor
    bounds: list[tuple[int, int]]


def _answer_chunks(mask: torch.Tensor, vocab_size: int) -> _Chunks:
    """Chunks of at most ``CHUNK_ELEMENTS`` logits (16 positions at least) over the answer positions ``mask``.

    The same mask gives the same chunks, so the reference and the fused policy make the same float operations
    (identical log-probs for identical weights).
    """
    rows, cols = mask.nonzero(as_tuple=True)
    size = max(16, CHUNK_ELEMENTS // vocab_size)
    return _Chunks(rows, cols, [(start, min(start + size, rows.numel())) for start in range(0, rows.numel(), size)])


def _project(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, out: Optional[torch.Tensor] = None):
    """(logits in the head's compute dtype, their float32 log-sum-exp, the log-prob of each target) of some rows.

    ``weight`` is already in the compute dtype; the log-softmax is taken in float32, as the models' own loss does. The
    logits go into ``out`` (the first rows of a reused buffer) where it is given.
    """
    rows = hidden.to(weight.dtype)
    logits = torch.mm(rows, weight.t(), out=None if out is None else out[: rows.size(0)])
    logsumexp = _logsumexp(logits)
    return logits, logsumexp, logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - logsumexp


def projected_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``answer_token_logps`` from the final hidden states and the head's ``weight``, without the full logits.

    Only the answer positions are projected, one chunk at a time, in ``head_compute_dtype``. No gradient: meant for
    reference passes, run by the head itself inside the model's forward (``train/head.py``). Returns
    ``(token_logps, mask)``, both (batch, length − 1), float32 log-probs, 0 off the answers.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    dtype = head_compute_dtype(weight)  # before autocast is turned off below
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        weight = weight.to(dtype)
        rows, cols, bounds = _answer_chunks(mask, weight.size(0))
        buffer = _logits_buffer(bounds, weight)
        for start, stop in bounds:
            r, c = rows[start:stop], cols[start:stop]
            token_logps[r, c] = _project(hidden[r, c], weight, targets[r, c], buffer)[2]

    return token_logps, mask


class _FusedAnswerLoss(torch.autograd.Function):
    """A loss of the answer-token log-probs, straight from the hidden states and the head's weight.

    Forward projects the answer positions chunk by chunk, in the head's compute dtype, and keeps only each
    position's float32 log-sum-exp and the loss's slope dL/d log π(y_t|x, y_<t) (autograd of ``loss_fn``), plus the
    logits of the last chunks (see ``KEPT_BYTES``), which it projects after the others so that no other chunk is
    alive next to them. Backward projects the other chunks again and forms dL/dlogits = g·slope·(onehot − softmax)
    in float32 (one row block at a time, over the chunk), with the upstream gradient g (a loss scale) already in,
    before it is cast to the compute dtype: the two gradient matmuls then run as stock autograd runs them. No
    head-sized gradient is held from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, loss_fn):
        dtype = head_compute_dtype(weight)
        token_logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            head = weight.to(dtype)  # a copy only where autocast projects a float32 head in half precision
            chunks = _answer_chunks(mask, weight.size(0))
            logsumexp = torch.empty(chunks.rows.shape, dtype=torch.float32, device=hidden.device)
            keep = _kept_chunks(chunks.bounds, weight.size(0), head.element_size())
            others = [bounds for index, bounds in enumerate(chunks.bounds) if index not in keep]
            buffer, kept = _logits_buffer(others, head), {}
            # the chunks not kept first, through one buffer, freed before the kept ones are projected
            for index in sorted(range(len(chunks.bounds)), key=lambda index: index in keep):
                start, stop = chunks.bounds[index]
                r, c = chunks.rows[start:stop], chunks.cols[start:stop]
                if index in keep:
                    buffer = None
                logits, logsumexp[start:stop], token_logps[r, c] = _project(hidden[r, c], head, targets[r, c], buffer)
                if index in keep:
                    kept[index] = logits
                del logits
            del buffer

        slopes = _slopes(loss_fn, token_logps)[chunks.rows, chunks.cols]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunks, ctx.logsumexp, ctx.slopes, ctx.kept, ctx.dtype = chunks, logsumexp, slopes, kept, dtype
        ctx.mark_non_differentiable(token_logps)
        return loss_fn(token_logps), token_logps

    @staticmethod
    def backward(ctx, grad_loss, _):
        if torch.is_grad_enabled():  # autograd enables it here for create_graph=True only
            raise RuntimeError(
                "fused_answer_loss has no second derivative (create_graph=True): its backward takes the kept logits "
                "and the slopes dL/d log π as constants."
            )
        hidden, weight, targets = ctx.saved_tensors
        chunks, dtype = ctx.chunks, ctx.dtype
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight, buffers, projected = None, [], None
        with torch.autocast(hidden.device.type, enabled=False):
            head = weight.to(dtype)
            for index in reversed(range(len(chunks.bounds))):  # the last chunk first: its logits may be kept
                start, stop = chunks.bounds[index]
                r, c = chunks.rows[start:stop], chunks.cols[start:stop]
                rows = hidden[r, c].to(dtype)
                logits = ctx.kept.pop(index, None)
                if logits is None:  # projected again, into one buffer made once the kept ones are freed
                    if projected is None:
                        others = [chunks.bounds[other] for other in range(index + 1)]
                        projected = _logits_buffer(others, head)
                    logits = torch.mm(rows, head.t(), out=projected[: rows.size(0)])

                slope = (ctx.slopes[start:stop] * grad_loss.float()).unsqueeze(-1)
                grad_logits = _grad_logits(logits, ctx.logsumexp[start:stop], targets[r, c], slope)
                logits = None  # ``grad_logits`` is the same tensor
                if grad_hidden is not None:
                    grad_hidden[r, c] = (grad_logits @ head).to(hidden.dtype)
                if index == 0:
                    head = None  # a half-precision copy of a float32 head: freed before its gradient is cast back
                if ctx.needs_input_grad[1]:
                    grad_weight = _accumulate(
                        grad_weight, grad_logits, rows, weight.dtype, len(chunks.bounds), buffers
                    )
                grad_logits = rows = None  # freed before the next chunk is projected

        buffers.clear()  # before a half-precision weight's gradient is cast back
        projected = None
        ctx.kept = {}  # a second backward (retain_graph) projects every chunk again
        if ctx.needs_input_grad[1]:  # zeros, not None, without answer tokens: DeepSpeed reduces every gradient
            grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _kept_chunks(bounds: list[tuple[int, int]], vocab_size: int, element_size: int) -> set[int]:
    """The chunks whose logits forward keeps for backward: the last ones, up to ``KEPT_BYTES`` of logits."""
    kept, budget = set(), KEPT_BYTES // element_size
    for index in reversed(range(len(bounds))):  # backward takes the chunks last to first
        size = (bounds[index][1] - bounds[index][0]) * vocab_size
        if size <= budget:
            kept.add(index)
            budget -= size
    return kept


def _grad_logits(
    logits: torch.Tensor, logsumexp: torch.Tensor, targets: torch.Tensor, slope: torch.Tensor
) -> torch.Tensor:
    """dL/dlogits = slope·(onehot − softmax), formed in float32 and written over ``logits`` (which it returns).

    Row block by row block: float32 logits in place, half-precision ones through one float32 buffer.
    """
    blocks = _row_blocks(logits)
    buffer = _float32_buffer(logits, blocks) if logits.dtype != torch.float32 else None
    for rows in blocks:
        shift = logsumexp[rows].unsqueeze(-1)
        if buffer is None:
            grad = logits[rows].sub_(shift)
        else:  # float32 in the subtraction itself: one pass over the half-precision block, not a copy and then this
            grad = torch.sub(logits[rows], shift, out=buffer[: rows.stop - rows.start])
        grad.exp_().mul_(-slope[rows])
        grad.scatter_add_(-1, targets[rows].unsqueeze(-1), slope[rows])
        if buffer is not None:
            logits[rows] = grad
    return logits


def _accumulate(
    total: Optional[torch.Tensor],
    grad_logits: torch.Tensor,
    rows: torch.Tensor,
    dtype: torch.dtype,
    chunks: int,
    buffers: list,
) -> torch.Tensor:
    """``total`` + grad_logitsᵀ·rows: the head weight's gradient (in ``dtype``, the weight's), one chunk more.

    Each chunk's matmul runs in the compute dtype, as stock autograd's single one. In half precision the products
    add up in float32, as that single matmul accumulates (in half precision they would round once per chunk), one
    block of the vocabulary at a time: no head-sized half-precision product next to the float32 sum. A single chunk
    of a half-precision weight is stock's matmul itself. ``buffers`` (empty at the first chunk) keeps the blocks'
    buffers from one chunk to the next.
    """
    if rows.dtype == torch.float32:
        return grad_logits.t() @ rows if total is None else total.addmm_(grad_logits.t(), rows)
    if total is None and chunks == 1 and dtype == rows.dtype:
        return grad_logits.t() @ rows
    if total is None:
        total = torch.zeros(grad_logits.size(1), rows.size(1), dtype=torch.float32, device=rows.device)
    block = max(1, min(total.size(0), PRODUCT_ELEMENTS // rows.size(1)))
    # two buffers for all blocks of all chunks, the product and its float32 copy (which the mixed-dtype addition would
    # otherwise make anew on the CPU): new ones per block would come from the heap, below glibc's mmap threshold, and
    # fragment it. A single block (a small head) is added as it is, and so is every block on a GPU, whose addition
    # casts in its kernel.
    if not buffers:
        product = torch.empty(block, rows.size(1), dtype=rows.dtype, device=rows.device)
        widen = block < total.size(0) and rows.device.type == "cpu"
        buffers += [product, torch.empty_like(product, dtype=torch.float32) if widen else None]
    product, widened = buffers
    for start in range(0, total.size(0), block):
        part = grad_logits[:, start : start + block].t()
        size = part.size(0)
        made = torch.mm(part, rows, out=product[:size])
        total[start : start + size] += made if widened is None else widened[:size].copy_(made)
    return total


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
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loss of the answer-token log-probs straight from the final hidden states and the head's ``weight`` (no bias).

    ``loss_fn`` maps the token log-probs (batch, length − 1), 0 off the answers, to a scalar; any such function
    (per sample, per token, or coupling the samples). Same values and gradients as ``loss_fn`` of
    ``projected_token_logps``, with the head in ``head_compute_dtype`` and a bounded number of logits kept from forward
    to backward (``KEPT_BYTES``). Returns ``(loss, token_logps, mask)``; the token log-probs carry no gradient.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    loss, token_logps = _FusedAnswerLoss.apply(hidden[:, :-1], weight, targets.clamp(min=0), mask, loss_fn)
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
