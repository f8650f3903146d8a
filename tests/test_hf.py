"""crossent.hf.causal_lm_loss equals a transformers model's own loss (tiny random models, no download)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("crossent.linear", reason="crossent.linear_cross_entropy not available")

from crossent.hf import causal_lm_loss, shift_labels  # noqa: E402


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2():  # tied lm_head / token embedding, biases in the blocks
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def _batch(vocab: int, generator: torch.Generator):
    input_ids = torch.randint(0, vocab, (3, 12), generator=generator)  # (B, T)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt that carries no loss
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -3:] = 0  # right padding ...
    labels[2, -3:] = -100  # ... with no loss either
    return input_ids, labels, attention_mask


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2-tied"])
@pytest.mark.parametrize("num_items", [None, 40])
def test_matches_the_models_own_loss_and_gradients(make, num_items):
    torch.manual_seed(0)
    model = make().float().eval()  # eval: no dropout, so both passes see the same network
    input_ids, labels, mask = _batch(model.config.vocab_size, torch.Generator().manual_seed(1))
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    expected = model(input_ids=input_ids, attention_mask=mask, labels=labels, **extra).loss
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=mask, **extra)
    torch.testing.assert_close(ours, expected)
    for g, g_ref in zip(_grads(model, ours), _grads(model, expected)):
        torch.testing.assert_close(g, g_ref)


def test_shift_labels_pads_with_ignore_index():
    labels = torch.tensor([[5, 6, 7], [8, -100, 9]])
    assert shift_labels(labels).tolist() == [[6, 7, -100], [-100, 9, -100]]
