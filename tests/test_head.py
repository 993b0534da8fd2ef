"""Answer log-probs from the hidden states against a naive log-softmax of the full logits, written here.

The head projects answer positions only, chunk by chunk, in the dtype stock training projects in (autocast's, else
the weight's). Also: which models take that path, what the fused loss holds from forward to backward, and fp16 loss
scaling.
"""

import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from helpers import batch_token_logps
from llamafactory_minorsft import losses
from llamafactory_minorsft.losses import IGNORE_INDEX, fused_answer_loss, projected_token_logps
from llamafactory_minorsft.train import head as head_module
from llamafactory_minorsft.train.head import head_computes, plain_head


def batch(seed: int, dtype: torch.dtype, batch: int = 3, length: int = 40, hidden: int = 8, vocab: int = 37):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, hidden, generator=gen).to(dtype).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 27:] = IGNORE_INDEX  # right padding
    labels[2] = IGNORE_INDEX  # an answer cut away entirely
    return states, head, labels


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_elements", [1, 2**25])  # 16 positions a chunk (the floor: 5 chunks), one
def test_projected_logps_equal_the_full_logits(dtype, tolerance, chunk_elements, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    states, head, labels = batch(0, dtype)
    expected, mask = batch_token_logps(states, head, labels)
    token_logps, got_mask = projected_token_logps(states, head.weight, labels)
    assert torch.equal(got_mask, mask) and token_logps.dtype == torch.float32 and not token_logps.requires_grad
    torch.testing.assert_close(token_logps.double(), expected.detach(), rtol=tolerance, atol=tolerance)


def test_no_answer_token_gives_zeros_and_no_nan():
    states, head, labels = batch(1, torch.float32)
    labels[:] = IGNORE_INDEX
    token_logps, mask = projected_token_logps(states, head.weight, labels)
    assert not mask.any() and torch.equal(token_logps, torch.zeros_like(token_logps))
    loss, tokens, _ = fused_answer_loss(states, head.weight, labels, lambda t: -t.sum() / 7.0)
    grads = torch.autograd.grad(loss, [states, head.weight])
    # zeros, not None: DeepSpeed reduces every parameter's gradient (a process may hold no answer token)
    assert loss.item() == 0 and all(
        g is not None and g.shape == x.shape and not g.any() for g, x in zip(grads, [states, head.weight])
    )


def tiny_qwen2(**extra) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=53,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        **extra,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_head_computes_inside_the_forward(tied):
    torch.manual_seed(0)
    model = tiny_qwen2(tie_word_embeddings=tied)
    ids = torch.randint(0, 53, (2, 9))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    head = plain_head(model)
    assert head is model.lm_head
    seen = []
    with head_computes(model, lambda hidden, weight: seen.append(weight) or hidden) as used:
        hidden = model(input_ids=ids).logits
    # the head's weight (a tied one as a view of it: see test_tied_embedding_adds_into_the_heads_gradient)
    assert used is head and len(seen) == 1 and hidden.shape == (2, 9, 16)
    assert seen[0].data_ptr() == head.weight.data_ptr() and seen[0].shape == head.weight.shape
    assert "forward" not in vars(head)  # the stock forward is back
    expected, _ = batch_token_logps(hidden, head, labels)
    torch.testing.assert_close(
        expected, batch_token_logps(model(input_ids=ids).logits, torch.nn.Identity(), labels)[0]
    )
    with head_computes(model, lambda hidden, weight: projected_token_logps(hidden, weight, labels)[0]):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_tied_embedding_adds_into_the_heads_gradient(autocast):
    """A trained tied head: the same gradients as autograd of the full logits, without its dense embedding gradient.

    Stock autograd makes the embedding's gradient as a dense tensor of the head's size and sums it with the head's:
    two float32 tensors of that size at once. The head-free path adds the embedding's rows into the head's gradient.
    The padding token's row gets no gradient from the embedding, as in nn.Embedding.
    """
    vocab, width, pad = 53, 16, 0
    ids = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(4))
    ids[1, 6:] = pad  # right padding, masked out of the loss
    labels = ids.masked_fill(ids == pad, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    grads, peaks = {}, {}
    for name in ("stock", "fused"):
        torch.manual_seed(0)
        model = tiny_qwen2(tie_word_embeddings=True, pad_token_id=pad).train()
        weight = model.lm_head.weight
        assert model.get_input_embeddings().weight is weight and model.get_input_embeddings().padding_idx == pad
        mode = LiveLogits(vocab, tuple(weight.shape))
        with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if name == "stock":
                loss = -batch_token_logps(model(input_ids=ids).logits, torch.nn.Identity(), labels)[0].sum() / 7
            else:
                with head_computes(model, lambda h, w: fused_answer_loss(h, w, labels, lambda t: -t.sum() / 7)[0]):
                    loss = model(input_ids=ids).logits
                assert "forward" not in vars(model.get_input_embeddings())  # the stock embedding is back
            loss.backward()
        grads[name], peaks[name] = {k: p.grad.double() for k, p in model.named_parameters()}, mode.head_peak
    tolerance = 3e-2 if autocast else 1e-5
    for key, want in grads["stock"].items():
        torch.testing.assert_close(grads["fused"][key], want, rtol=tolerance, atol=tolerance, msg=key)
    tied = "model.embed_tokens.weight"
    assert grads["fused"][tied].abs().sum() > 0
    # the padding row: the head's gradient alone (the padding token is never a target, so its head row is
    # the softmax's pull only); the embedding adds nothing there, as stock
    torch.testing.assert_close(grads["fused"][tied][pad], grads["stock"][tied][pad], rtol=tolerance, atol=tolerance)
    size = 4 * vocab * width  # one float32 tensor of the head's size
    assert peaks["stock"] >= 2 * size and peaks["fused"] <= peaks["stock"] - size, (peaks, size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_first", [True, False])
def test_tied_gradient_is_stocks_sum_bit_for_bit(dtype, head_first):
    """The embedding's backward adds into the head's gradient exactly what stock autograd's sum gives.

    Frequent tokens (each id about 40 times): each token's rows are summed first and added once, so half precision
    rounds as stock does. Either order of the two backwards gives the same sum (autograd runs the later node first).
    """
    gen = torch.Generator().manual_seed(5)
    vocab, width, pad = 11, 8, 0
    ids = torch.randint(0, 6, (4, 60), generator=gen)  # padding included
    rows, head_grad = torch.randn(4, 60, width, generator=gen), torch.randn(vocab, width, generator=gen)
    grads = {}
    for name in ("stock", "tied"):
        weight = torch.randn(vocab, width, generator=torch.Generator().manual_seed(6)).to(dtype).requires_grad_()
        tied = head_module._TiedGradient()

        def embedded():
            if name == "stock":
                return torch.nn.functional.embedding(ids, weight, pad)
            return head_module._TiedEmbedding.apply(ids, weight, pad, tied)

        def projected():
            return weight if name == "stock" else head_module._HeadSide.apply(weight, tied)

        if head_first:  # as in a model: the embedding's node comes first, so its backward runs last
            e, w = embedded(), projected()
        else:
            w, e = projected(), embedded()
        ((e * rows.to(dtype)).sum() + (w * head_grad.to(dtype)).sum()).backward()
        grads[name] = weight.grad
    assert torch.equal(grads["tied"], grads["stock"])
    assert grads["tied"][6:].equal(head_grad.to(dtype)[6:])  # rows of tokens not in the batch: the head's alone


def test_a_tied_gradient_is_never_dropped():
    """The head's gradient handed to an embedding whose backward never runs: an error, not a lost gradient."""
    weight = torch.randn(11, 8, requires_grad=True)
    tied = head_module._TiedGradient()
    head_module._TiedEmbedding.apply(torch.tensor([[1, 2]]), weight, None, tied)  # its output never reaches the loss
    with pytest.raises(RuntimeError, match="tied head's gradient was not added"):
        head_module._HeadSide.apply(weight, tied).sum().backward()


def test_the_head_pairs_with_its_own_calls_embedding():
    """An embedding called outside the model's call (its output detached) is not the one the head hands its gradient."""
    torch.manual_seed(0)
    model = tiny_qwen2(tie_word_embeddings=True).train()
    ids = torch.randint(1, 53, (2, 9))
    with head_computes(model, lambda h, w: torch.nn.functional.linear(h, w)) as used:
        embeds = model.get_input_embeddings()(ids).detach()
        model(inputs_embeds=embeds).logits.sum().backward()
    hidden = model.model(inputs_embeds=embeds).last_hidden_state  # stock: the head's gradient alone
    torch.testing.assert_close(used.weight.grad, torch.einsum("bth,btv->vh", hidden, torch.ones(2, 9, 53)))


def test_a_head_whose_forward_is_wrapped_is_not_plain():
    """Accelerate's device-map and offload hooks set the head's forward on the instance: shadowing it would skip them."""
    model = tiny_qwen2()
    model.lm_head.forward = model.lm_head.forward  # what accelerate's ``add_hook_to_module`` does, in effect
    assert plain_head(model) is None
    with pytest.raises(ValueError, match="plain output head"), head_computes(model, lambda hidden, weight: hidden):
        pass
    assert "forward" in vars(model.lm_head)  # left as it was


def test_other_heads_fall_back_to_the_full_logits():
    # Gemma 2 soft-caps its logits after the head: projecting the hidden states would skip the cap
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=53,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    assert gemma.config.final_logit_softcapping and plain_head(gemma) is None
    # a head that an adapter wraps is not a plain linear layer
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_qwen2(), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert plain_head(wrapped) is None
    unwrapped = get_peft_model(tiny_qwen2(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert plain_head(unwrapped) is unwrapped.get_base_model().lm_head


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("chunk_elements", [1, 2**25])
def test_fused_loss_equals_autograd_of_the_paper_losses(dtype, tolerance, chunk_elements, monkeypatch):
    from llamafactory_minorsft.losses import minorsft_loss, sft_dpo_loss

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    states, head, labels = batch(2, dtype)
    ref = torch.tensor([-30.0, -12.0, 0.0])
    for loss_fn in (minorsft_loss, sft_dpo_loss):

        def sample_loss(logps):
            return loss_fn(logps, ref, (labels[:, 1:] != IGNORE_INDEX).sum(-1), 0.3)[0].sum() / 2

        token_logps, mask = batch_token_logps(states, head, labels)
        expected = sample_loss(token_logps.sum(-1))
        expected_grads = torch.autograd.grad(expected, [states, head.weight])
        loss, got_tokens, got_mask = fused_answer_loss(
            states, head.weight, labels, lambda tokens: sample_loss(tokens.sum(-1))
        )
        assert torch.equal(got_mask, mask) and not got_tokens.requires_grad
        torch.testing.assert_close(got_tokens.double(), token_logps.detach(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(loss.double(), expected.double(), rtol=tolerance, atol=tolerance)
        grads = torch.autograd.grad(loss * 3.0, [states, head.weight])  # the upstream gradient scales everything
        for got, want in zip(grads, expected_grads):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), 3.0 * want.double(), rtol=tolerance, atol=tolerance)

        # the reference path makes the same float operations: equal weights give r = 0 exactly
        assert torch.equal(projected_token_logps(states, head.weight, labels)[0], got_tokens)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("chunk_elements, kept_bytes", [(1, 0), (1, 3000), (2**25, 2**28)])
@pytest.mark.parametrize("coupled", [False, True])
def test_fused_loss_of_token_logps_equals_autograd(dtype, tolerance, chunk_elements, kept_bytes, coupled, monkeypatch):
    """Token-level losses: a token mean (the stock cross-entropy), and a worst group per sample or over the batch.

    Written here from the token log-probs, not with this package's SFT-GO functions: a per-token slope that
    differs within a sample, and (``coupled``) a loss that couples the samples. Chunks are kept from forward to
    backward (all, some, none) or projected again.
    """
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(losses, "KEPT_BYTES", kept_bytes)
    states, head, labels = batch(3, dtype)
    mask = labels[:, 1:] != IGNORE_INDEX
    group = mask & (torch.arange(mask.size(1)) % 3 == 0)  # a fixed "important" group: every third position

    def group_nll(tokens, members, dim):
        return -(tokens * members).sum(dim) / members.sum(dim).clamp(min=1)

    def loss_fn(tokens):
        token_mean = -tokens.sum() / 57.0  # a Trainer's token count: any constant
        if coupled:  # the worst group over the batch
            worst = torch.maximum(group_nll(tokens, group, None), group_nll(tokens, mask & ~group, None))
        else:  # each sample's worst group, summed
            worst = torch.maximum(group_nll(tokens, group, -1), group_nll(tokens, mask & ~group, -1)).sum()
        return 0.6 * token_mean + 0.4 * worst

    token_logps, _ = batch_token_logps(states, head, labels)
    expected = loss_fn(token_logps)
    expected_grads = torch.autograd.grad(expected, [states, head.weight])
    loss, got_tokens, _ = fused_answer_loss(states, head.weight, labels, loss_fn)
    torch.testing.assert_close(got_tokens.double(), token_logps.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=tolerance, atol=tolerance)
    grads = torch.autograd.grad(loss * 2.0, [states, head.weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), 2.0 * want.double(), rtol=tolerance, atol=tolerance)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def stock_and_fused_grads(hidden, weight, labels, loss_fn, scale, half, autocast):
    """The gradients of ``scale · loss`` (hidden, weight): float64 truth, stock autograd in ``half``, fused in ``half``.

    Stock: the model's own way, a linear layer in ``half`` (by autocast, or with a ``half`` weight), the log-softmax
    in float32.
    """
    truth_inputs = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    truth = torch.autograd.grad(
        loss_fn(batch_token_logps(*truth_inputs[:1], lambda h: h @ truth_inputs[1].t(), labels)[0]) * scale,
        truth_inputs,
    )
    results = {"truth": truth}
    for name in ("stock", "fused"):
        h = hidden.detach().to(torch.float32 if autocast else half).requires_grad_()
        w = weight.detach().to(torch.float32 if autocast else half).requires_grad_()
        with torch.autocast("cpu", dtype=half, enabled=autocast):
            if name == "stock":
                logits = torch.nn.functional.linear(h, w).float()
                picked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
                loss = loss_fn(picked.squeeze(-1).masked_fill(labels[:, 1:] == IGNORE_INDEX, 0.0))
            else:
                loss = fused_answer_loss(h, w, labels, loss_fn)[0]
        results[name] = torch.autograd.grad(loss * scale, [h, w])
    return results


@pytest.mark.compat  # torch's autocast and kernels differ between the stacks (torch 2.9.1 on 0.9.4)
@pytest.mark.parametrize("scale", [1.0, 2.0**10, 2.0**16])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast_fp32_weight", "fp16_weight"])
def test_fp16_loss_scaling_is_exact(scale, autocast, monkeypatch):
    """fp16 with a loss scale (GradScaler, DeepSpeed's dynamic scale): finite, and as accurate as stock autograd.

    The upstream gradient is in dL/dlogits before its cast to fp16, as in stock autograd; without it small
    gradients flush to zero (and at 2^16 large ones overflow).
    """
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4096)  # 16 positions a chunk: several chunks
    gen = torch.Generator().manual_seed(11)
    vocab, width = 256, 64
    hidden = torch.randn(2, 96, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.2
    labels = torch.randint(0, vocab, (2, 96), generator=gen)
    labels[:, :20] = IGNORE_INDEX

    def loss_fn(tokens):  # the stock token mean
        return -tokens.sum() / (labels[:, 1:] != IGNORE_INDEX).sum()

    grads = stock_and_fused_grads(hidden, weight, labels, loss_fn, scale, torch.float16, autocast)
    for got, stock, truth in zip(grads["fused"], grads["stock"], grads["truth"]):
        assert torch.isfinite(got).all() and torch.isfinite(stock).all()
        fused_error, stock_error = relative_error(got, truth), relative_error(stock, truth)
        assert fused_error <= 1.5 * stock_error + 1e-6, (fused_error, stock_error)


@pytest.mark.compat  # torch's autocast and kernels differ between the stacks (torch 2.9.1 on 0.9.4)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast_fp32_weight", "bf16_weight"])
def test_bf16_projects_in_bf16_as_stock(autocast, monkeypatch):
    """A float32 trainable head (LoRA/freeze upcast) or a bf16 frozen one, fp32 hidden states: no dtype clash.

    The head runs in bf16 like stock autocast: the loss equals stock's to float32 rounding, the gradients are as
    close to float64 as stock's.
    """
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4096)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 80, 64, generator=gen)
    weight = torch.randn(256, 64, generator=gen) * 0.2
    labels = torch.randint(0, 256, (2, 80), generator=gen)
    labels[0, :10] = IGNORE_INDEX

    def loss_fn(tokens):
        return -(tokens.sum(-1) / (labels[:, 1:] != IGNORE_INDEX).sum(-1)).mean()

    grads = stock_and_fused_grads(hidden, weight, labels, loss_fn, 1.0, torch.bfloat16, autocast)
    for got, stock, truth in zip(grads["fused"], grads["stock"], grads["truth"]):
        assert relative_error(got, truth) <= 1.5 * relative_error(stock, truth) + 1e-6
    # the reference's projection under autocast, from a float32 head (LoRA's base, upcast) or a bf16 one (a frozen
    # copy), float32 hidden states: bf16 matmuls as stock's, and the fused policy's very log-probs (r = 0 exactly)
    for head in (weight, weight.to(torch.bfloat16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = projected_token_logps(hidden, head, labels)[0]
            stock = torch.log_softmax(torch.nn.functional.linear(hidden, head).float(), -1)
            fused = fused_answer_loss(hidden, head, labels, loss_fn)[1]
        picked = stock[:, :-1].gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected = picked.masked_fill(labels[:, 1:] == IGNORE_INDEX, 0.0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, fused)


class LiveLogits(TorchDispatchMode):
    """Live memory, op by op, of logits chunks (2-D, the vocabulary last) and of tensors of the head's shape.

    Counted by storage, so views (``detach``, ``t``) of one tensor count once; a storage counts while any tensor that
    an op returned on it is alive.
    """

    def __init__(self, vocab: int, weight_shape: tuple[int, int]):
        super().__init__()
        self.vocab, self.weight_shape = vocab, weight_shape
        self.storages = {"logits": {}, "head": {}}  # kind → data pointer → [bytes, ids of live tensors]
        self.peak = self.head_peak = 0  # elements of logits; bytes of head-sized tensors

    def held(self, kind: str) -> int:
        return sum(nbytes for nbytes, ids in self.storages[kind].values())

    def _track(self, kind: str, tensor: torch.Tensor, size: int) -> None:
        entry = self.storages[kind].setdefault(tensor.untyped_storage().data_ptr(), [size, set()])
        entry[1].add(id(tensor))
        weakref.finalize(tensor, self._release, kind, tensor.untyped_storage().data_ptr(), id(tensor))

    def _release(self, kind: str, pointer: int, key: int) -> None:
        entry = self.storages[kind].get(pointer)
        if entry is not None:
            entry[1].discard(key)
            if not entry[1]:
                del self.storages[kind][pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(tensor, torch.Tensor):
                continue
            if tuple(tensor.shape) == self.weight_shape:
                self._track("head", tensor, tensor.numel() * tensor.element_size())
            elif tensor.dim() == 2 and tensor.size(-1) == self.vocab and tensor.size(0) > 1:
                self._track("logits", tensor, tensor.numel())
        self.peak = max(self.peak, self.held("logits"))
        self.head_peak = max(self.head_peak, self.held("head"))
        return out


def test_a_second_backward_adds_the_same_gradients(monkeypatch):
    """``retain_graph``: a second backward projects every chunk again (the kept ones were used up) and adds the same."""
    vocab, width, chunk = 101, 8, 16
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk * vocab)
    monkeypatch.setattr(losses, "KEPT_BYTES", 2 * chunk * vocab * 4)  # two float32 chunks
    hidden = torch.randn(1, 4 * chunk + 1, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (1, 4 * chunk + 1))
    loss = fused_answer_loss(hidden, weight, labels, lambda t: -t.sum())[0]
    loss.backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * first[0])
    torch.testing.assert_close(weight.grad, 2 * first[1])


@pytest.mark.parametrize("rows", [1, 7, 10, 64])
def test_row_blocks_are_equal_and_cover_the_chunk(rows, monkeypatch):
    """Blocks of at most about ``ROW_ELEMENTS``, sizes within one row of each other, every row once, in order."""
    width = 7
    monkeypatch.setattr(losses, "ROW_ELEMENTS", 4 * width)
    blocks = losses._row_blocks(torch.empty(rows, width))
    sizes = [block.stop - block.start for block in blocks]
    assert [row for block in blocks for row in range(rows)[block]] == list(range(rows))
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 4, sizes
    assert len(blocks) == -(-rows // 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("block_rows", [1, 3, 100])  # one row a block, blocks of 3 (the last one 1), the whole chunk
def test_logsumexp_is_torchs_bit_for_bit(dtype, block_rows, monkeypatch):
    """The blocked log-sum-exp equals ``torch.logsumexp`` of the float32 logits exactly, rows of ±inf included."""
    vocab = 37
    monkeypatch.setattr(losses, "ROW_ELEMENTS", block_rows * vocab)
    logits = (torch.randn(10, vocab, generator=torch.Generator().manual_seed(4)) * 30).to(dtype)
    logits[1] = float("-inf")  # every token masked: -inf, not NaN
    logits[2, 5] = float("inf")
    logits[3, :4] = float("-inf")
    logits[4, 0] = float("nan")
    expected = torch.logsumexp(logits.float(), -1)
    torch.testing.assert_close(losses._logsumexp(logits), expected, rtol=0, atol=0, equal_nan=True)
    assert losses._logsumexp(logits[:0]).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logsumexp_is_torchs_at_a_real_vocabulary(dtype):
    """Every other row of a Qwen2-vocabulary chunk (not contiguous), in the shipped blocks (several rows each)."""
    logits = (torch.randn(42, 151936, generator=torch.Generator().manual_seed(6)) * 8).to(dtype)[::2]
    assert len(losses._row_blocks(logits)) > 1
    assert torch.equal(losses._logsumexp(logits), torch.logsumexp(logits.float(), -1))


class LogitsStorages(TorchDispatchMode):
    """Each storage of at least ``elements`` elements that an op returns, kept alive so that none is counted twice."""

    def __init__(self, elements: int):
        super().__init__()
        self.elements, self.storages = elements, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= self.elements:
                self.storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunks_are_projected_into_one_buffer(dtype, monkeypatch):
    """2 chunks or 6, none kept: the reference projection and the fused loss make the same chunk-sized tensors.

    On the CPU a new chunk-sized tensor per chunk costs a page fault per page, as much as the projection itself. So
    forward projects every chunk into one buffer, backward projects them again into one more, and the reference pass
    into one; the values equal those of a projection per chunk.
    """
    vocab, width, chunk = 101, 8, 16
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk * vocab)
    monkeypatch.setattr(losses, "KEPT_BYTES", 0)
    monkeypatch.setattr(losses, "ROW_ELEMENTS", 4 * vocab)
    gen = torch.Generator().manual_seed(5)
    made = {}
    for chunks in (2, 6):
        length = chunks * chunk - 4  # the last chunk shorter
        hidden = torch.randn(1, length, width, generator=gen).to(dtype)
        weight = torch.randn(vocab, width, generator=gen).to(dtype)
        labels = torch.randint(0, vocab, (1, length), generator=gen)
        for name in ("reference", "fused"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            # warnings as errors: ``torch.mm(out=)`` resizes a buffer too small for its chunk with a warning only
            with LogitsStorages(chunk * vocab) as mode, warnings.catch_warnings():
                warnings.simplefilter("error")
                if name == "reference":
                    logps = projected_token_logps(h, w, labels)[0]
                else:
                    loss, logps, _ = fused_answer_loss(h, w, labels, lambda t: -t.sum() / t.numel())
                    loss.backward()
            made[name, chunks] = len(mode.storages)
            # logits in the head's dtype, their log-softmax in float32 (float64 here)
            expected = batch_token_logps(h.detach(), lambda x: (x @ w.detach().t()).float(), labels)[0]
            torch.testing.assert_close(logps.double(), expected, atol=1e-4, rtol=0)
            if name == "fused":  # the gradients formed block by block in the buffers equal stock autograd's
                h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                stock = batch_token_logps(h2, lambda x: (x @ w2.t()).float(), labels)[0]
                (-stock.sum() / stock.numel()).backward()
                tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-2)
                torch.testing.assert_close(h.grad, h2.grad, **tolerance)
                torch.testing.assert_close(w.grad, w2.grad, **tolerance)
    assert made["reference", 2] == made["reference", 6] == 1, made
    assert made["fused", 2] == made["fused", 6] == 2, made


@pytest.mark.compat  # torch's autocast and kernels differ between the stacks (torch 2.9.1 on 0.9.4)
@pytest.mark.parametrize(
    "dtype, autocast",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["fp32", "bf16", "fp32_weight_bf16_autocast"],
)
@pytest.mark.parametrize("answer_chunks", [8, 64])
def test_fused_loss_holds_a_bounded_number_of_chunks_and_no_head_gradient(answer_chunks, dtype, autocast, monkeypatch):
    """A long answer (here up to 64 chunks) never holds more logits than ``KEPT_BYTES`` and one row block.

    The budget is in bytes of the compute dtype: two float32 chunks, four bf16 ones (a float32 weight under bf16
    autocast projects in bf16). Forward projects the chunks it does not keep before the kept ones, and the float32 work
    (log-sum-exp, softmax) runs one row block at a time, over the chunk itself in backward. Between forward and
    backward nothing of the head weight's size is held (no gradient computed in advance).
    """
    vocab, width, chunk, block = 101, 8, 16, 4
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk * vocab)
    monkeypatch.setattr(losses, "KEPT_BYTES", 2 * chunk * vocab * 4)
    monkeypatch.setattr(losses, "ROW_ELEMENTS", block * vocab)
    kept = 2 * chunk * vocab * 4 // (2 if autocast else dtype.itemsize)  # logits
    hidden = torch.randn(1, answer_chunks * chunk + 1, width, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (1, answer_chunks * chunk + 1))
    mode = LiveLogits(vocab, (vocab, width))
    with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fused_answer_loss(hidden, weight, labels, lambda t: -t.sum())[0]
        held_after_forward, kept_after_forward = dict(mode.storages["head"]), mode.held("logits")
        forward_peak, mode.peak = mode.peak, 0
        loss.backward()
    assert not held_after_forward, "a head-sized tensor is held from forward to backward"
    assert weight.grad is not None and hidden.grad is not None
    assert kept_after_forward == kept, kept_after_forward / (chunk * vocab)
    # kept; the float32 buffer of a row block; in forward, the weight's transpose in the projection (width x vocab:
    # counted as width rows), and under autocast its bf16 copy (vocab x width: counted as width rows)
    bound = kept + block * vocab
    assert forward_peak <= bound + 2 * width * vocab, forward_peak / (chunk * vocab)
    assert mode.peak <= bound + width * vocab * autocast, mode.peak / (chunk * vocab)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast_fp32_head", "bf16_head"])
def test_backward_holds_no_more_of_the_head_than_stock(autocast):
    """Tensors of the head's size (a bf16 copy of a float32 head, its gradient) alive at once: no more than stock's."""
    vocab, width = 101, 8
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, vocab, (2, 30), generator=gen)
    peaks = {}
    for name in ("stock", "fused"):
        dtype = torch.float32 if autocast else torch.bfloat16
        hidden = torch.randn(2, 30, width, generator=gen).to(dtype).requires_grad_()
        weight = torch.randn(vocab, width, generator=gen).to(dtype).requires_grad_()
        mode = LiveLogits(vocab, (vocab, width))
        with mode:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the model's forward
                if name == "stock":
                    logits = torch.nn.functional.linear(hidden, weight).float()
                    loss = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, labels[:, 1:].unsqueeze(-1)).mean()
                else:
                    loss = fused_answer_loss(hidden, weight, labels, lambda t: -t.sum() / t.numel())[0]
            loss.backward()
        peaks[name] = mode.head_peak
    assert 0 < peaks["fused"] <= peaks["stock"], peaks


class MatmulShapes(TorchDispatchMode):
    """The shapes of every half-precision matmul's output."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and out.dtype != torch.float32:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast_fp32_head", "bf16_head"])
def test_half_precision_head_gradient_is_made_in_bounded_blocks(autocast, monkeypatch):
    """Several chunks in bf16: the head gradient's products are made in blocks of ``PRODUCT_ELEMENTS``.

    Each chunk's product is made a block of the vocabulary at a time into the float32 sum, never at the head's size,
    and the gradients equal those of whole products.
    """
    vocab, width, chunk = 101, 8, 16
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk * vocab)
    gen = torch.Generator().manual_seed(7)
    dtype = torch.float32 if autocast else torch.bfloat16
    hidden = torch.randn(1, 4 * chunk + 1, width, generator=gen).to(dtype)
    weight = torch.randn(vocab, width, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, (1, 4 * chunk + 1), generator=gen)
    grads = {}
    for rows in (vocab, 12):  # whole products; blocks of 12 rows (the last one 5)
        monkeypatch.setattr(losses, "PRODUCT_ELEMENTS", rows * width)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        mode = MatmulShapes()
        with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fused_answer_loss(h, w, labels, lambda t: -t.sum() / t.numel())[0]
            grads[rows] = torch.autograd.grad(loss, [h, w])
        products = [shape for shape in mode.shapes if shape[1] == width and shape[0] != chunk]  # not grad_hidden
        assert products and max(numel for numel in (a * b for a, b in products)) <= rows * width, products
    for small, whole in zip(grads[12], grads[vocab]):
        assert torch.equal(small, whole)


def test_head_gradient_blocks_allocate_nothing_per_block(monkeypatch):
    """The blocks' half-precision products and their float32 copies go through two buffers, kept from chunk to chunk.

    2 blocks or 8, 1 chunk or 3: the same allocations. A product per block, the float32 copy that a mixed-dtype
    addition makes on the CPU, or buffers made anew per chunk would not.
    """
    vocab, width = 96, 8
    gen = torch.Generator().manual_seed(2)
    grad_logits = torch.randn(16, vocab, generator=gen).to(torch.bfloat16)
    rows = torch.randn(16, width, generator=gen).to(torch.bfloat16)
    allocations, sums = {}, {}
    for blocks, chunks in ((2, 1), (8, 1), (8, 3)):  # a chunk of 2 blocks, of 8; 3 chunks of 8 blocks
        monkeypatch.setattr(losses, "PRODUCT_ELEMENTS", vocab // blocks * width)
        total, buffers = torch.zeros(vocab, width), []
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu, profile_memory=True, acc_events=True) as profile:
            for _ in range(chunks):
                losses._accumulate(total, grad_logits, rows, torch.float32, 3, buffers)
        # tensors made by an op (the addition's float32 copy) and memory freed within (a matmul's own output, made
        # without an op)
        allocations[blocks, chunks] = sum(
            event.name in ("aten::empty", "aten::empty_strided", "[memory]") for event in profile.events()
        )
        sums[blocks, chunks] = total
    assert allocations[2, 1] == allocations[8, 1] == allocations[8, 3] > 0, allocations
    assert torch.equal(sums[2, 1], sums[8, 1]) and torch.equal(sums[8, 3], 3 * sums[8, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_create_graph_is_refused(dtype, monkeypatch):
    """``create_graph=True`` raises, and the graph stays usable.

    The kept logits and the slopes are constants in backward, so a second derivative (a gradient penalty, say) would
    silently lack its second-order term.
    """
    vocab, width, chunk = 101, 8, 16
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk * vocab)
    monkeypatch.setattr(losses, "PRODUCT_ELEMENTS", 12 * width)  # several blocks in bf16
    hidden = torch.randn(1, 4 * chunk + 1, width).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, 4 * chunk + 1))
    loss = fused_answer_loss(hidden, weight, labels, lambda t: -t.sum())[0]
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, [hidden, weight], create_graph=True)
    assert all(grad is not None for grad in torch.autograd.grad(loss, [hidden, weight]))  # the graph is still there
