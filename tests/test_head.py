"""Answer log-probs from the hidden states against a naive log-softmax of the full logits, written here.

The head projects answer positions only, chunk by chunk. Also: which models take that path.
"""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from helpers import batch_token_logps
from llamafactory_minorsft import losses
from llamafactory_minorsft.losses import IGNORE_INDEX, projected_token_logps
from llamafactory_minorsft.train.head import hidden_states_as_logits, plain_head


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
@pytest.mark.parametrize("chunk_elements", [1, 2**25])  # 16 positions a chunk (the floor: 3 chunks a row), one
def test_projected_logps_equal_the_full_logits_values_and_gradients(dtype, tolerance, chunk_elements, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    states, head, labels = batch(0, dtype)
    weights = torch.linspace(-1.0, 2.0, labels.size(0) * (labels.size(1) - 1)).view(labels.size(0), -1)
    expected, mask = batch_token_logps(states, head, labels)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [states, head.weight])

    token_logps, got_mask = projected_token_logps(states, head, labels)
    assert torch.equal(got_mask, mask) and token_logps.dtype == torch.float32
    torch.testing.assert_close(token_logps.double(), expected, rtol=tolerance, atol=tolerance)
    grads = torch.autograd.grad((token_logps * weights).sum(), [states, head.weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=tolerance, atol=tolerance)


def test_no_answer_token_gives_zeros_and_no_nan():
    states, head, labels = batch(1, torch.float32)
    labels[:] = IGNORE_INDEX
    token_logps, mask = projected_token_logps(states, head, labels)
    assert not mask.any() and torch.equal(token_logps, torch.zeros_like(token_logps))


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
def test_qwen2_takes_the_hidden_state_path_exactly(tied):
    torch.manual_seed(0)
    model = tiny_qwen2(tie_word_embeddings=tied)
    ids = torch.randint(0, 53, (2, 9))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    head = plain_head(model)
    assert head is model.lm_head
    with hidden_states_as_logits(model) as used:
        hidden = model(input_ids=ids).logits
    assert used is head and model.lm_head is head and hidden.shape == (2, 9, 16)
    expected, _ = batch_token_logps(hidden, head, labels)
    torch.testing.assert_close(
        expected, batch_token_logps(model(input_ids=ids).logits, torch.nn.Identity(), labels)[0]
    )
    torch.testing.assert_close(projected_token_logps(hidden, head, labels)[0].double(), expected, rtol=1e-5, atol=1e-5)


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
    from llamafactory_minorsft.losses import fused_answer_loss, minorsft_loss, sft_dpo_loss

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
        with torch.no_grad():
            assert torch.equal(projected_token_logps(states, head, labels)[0], got_tokens)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("chunk_elements", [1, 2**25])
@pytest.mark.parametrize("rowwise", [True, False])
def test_fused_loss_of_token_logps_equals_autograd(dtype, tolerance, chunk_elements, rowwise, monkeypatch):
    """Token-level losses: a token mean (the stock cross-entropy), and a worst group per sample or over the batch.

    Written here from the token log-probs, not with this package's SFT-GO functions: a per-token slope that
    differs within a sample, and (``rowwise=False``) a loss that couples the samples.
    """
    from llamafactory_minorsft.losses import fused_answer_loss

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    states, head, labels = batch(3, dtype)
    mask = labels[:, 1:] != IGNORE_INDEX
    group = mask & (torch.arange(mask.size(1)) % 3 == 0)  # a fixed "important" group: every third position

    def group_nll(tokens, members, dim):
        return -(tokens * members).sum(dim) / members.sum(dim).clamp(min=1)

    def loss_fn(tokens):
        token_mean = -tokens.sum() / 57.0  # a Trainer's token count: any constant
        if rowwise:  # each sample's worst group, summed
            worst = torch.maximum(group_nll(tokens, group, -1), group_nll(tokens, mask & ~group, -1)).sum()
        else:  # the worst group over the batch
            worst = torch.maximum(group_nll(tokens, group, None), group_nll(tokens, mask & ~group, None))
        return 0.6 * token_mean + 0.4 * worst

    token_logps, _ = batch_token_logps(states, head, labels)
    expected = loss_fn(token_logps)
    expected_grads = torch.autograd.grad(expected, [states, head.weight])
    loss, got_tokens, _ = fused_answer_loss(states, head.weight, labels, loss_fn, rowwise=rowwise)
    torch.testing.assert_close(got_tokens.double(), token_logps.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=tolerance, atol=tolerance)
    grads = torch.autograd.grad(loss * 2.0, [states, head.weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), 2.0 * want.double(), rtol=tolerance, atol=tolerance)
