"""crossent.hf: the patched model's training loss and gradients equal the unpatched model's
(tiny random models, no download); eval, generate() and Trainer are unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import crossent.hf  # noqa: E402
from crossent.hf import causal_lm_loss, shift_labels  # noqa: E402


def _llama(**extra):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, **extra,
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2():  # tied lm_head / token embedding, biases in the blocks, dropout 0.1
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def _gemma2():  # final_logit_softcapping = 30
    config = transformers.Gemma2Config(
        vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        final_logit_softcapping=2.0,  # small, so that the cap bites on random logits
    )
    return transformers.Gemma2ForCausalLM(config)


def _cohere():  # logits * logit_scale
    config = transformers.CohereConfig(
        vocab_size=83, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, logit_scale=0.3,
    )
    return transformers.CohereForCausalLM(config)


def _granite():  # logits / logits_scaling
    config = transformers.GraniteConfig(
        vocab_size=79, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, logits_scaling=4.0,
    )
    return transformers.GraniteForCausalLM(config)


def _mixtral():  # MoE: router_aux_loss_coef * load-balancing loss
    config = transformers.MixtralConfig(
        vocab_size=71, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5,
    )
    return transformers.MixtralForCausalLM(config)


def _gemma3_multimodal():  # base_model takes labels; output class of its own; text_config
    text = transformers.Gemma3TextConfig(
        vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=8, patch_size=4,
    )
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4, image_token_index=88)
    return transformers.Gemma3ForConditionalGeneration(config)


def _batch(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab - 2, (3, 12), generator=gen)  # (B, T), no image token
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt that carries no loss
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -3:] = 0  # right padding ...
    labels[2, -3:] = -100  # ... with no loss either
    return input_ids, labels, attention_mask


def _loss_and_grads(model, **inputs):
    torch.manual_seed(1234)  # the same dropout masks in both passes
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    # allow_unused: a multimodal model's vision tower takes no part in a text-only batch
    return out, torch.autograd.grad(out.loss, params, allow_unused=True)


MODELS = [_llama, _gpt2, _gemma2, _cohere, _granite, _mixtral, _gemma3_multimodal]


@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__.strip("_"))
@pytest.mark.parametrize("num_items", [None, 40])
def test_patched_training_loss_and_gradients_equal_the_models_own(make, num_items):
    torch.manual_seed(0)
    model = make().float().train()
    input_ids, labels, mask = _batch(model.config.get_text_config().vocab_size, seed=1)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    if make is _gemma3_multimodal:
        extra["token_type_ids"] = torch.zeros_like(input_ids)  # text only
    inputs = dict(input_ids=input_ids, attention_mask=mask, labels=labels, **extra)
    expected, expected_grads = _loss_and_grads(model, **inputs)
    crossent.hf.patch(model)
    out, grads = _loss_and_grads(model, **inputs)
    assert type(out) is type(expected)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.loss)
    if expected.get("aux_loss") is not None:
        torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    assert [g is None for g in grads] == [g is None for g in expected_grads]
    for g, g_ref in zip(grads, expected_grads):
        if g is not None:
            torch.testing.assert_close(g, g_ref)


def test_pre_shifted_labels_and_positional_input_ids():
    torch.manual_seed(0)
    model = _llama().train()
    input_ids, labels, _ = _batch(97, seed=2)
    expected = model(input_ids, labels=labels).loss
    crossent.hf.patch(model)
    torch.testing.assert_close(model(input_ids, shift_labels=shift_labels(labels)).loss, expected)
    out = model(input_ids, labels=labels, return_dict=False)
    torch.testing.assert_close(out[0], expected)


def test_eval_logits_generate_and_unpatch_unchanged():
    torch.manual_seed(0)
    model = _llama().eval()
    input_ids, labels, mask = _batch(97, seed=3)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask, labels=labels)
        generated = model.generate(input_ids[:1], max_new_tokens=5, do_sample=False)
    assert crossent.hf.patch(model) is model
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits, expected.logits)
        torch.testing.assert_close(out.loss, expected.loss)
        assert torch.equal(model.generate(input_ids[:1], max_new_tokens=5, do_sample=False), generated)
    model.train()
    assert model(input_ids, labels=labels).logits is None
    assert model(input_ids).logits is not None  # no labels: the original forward
    crossent.hf.unpatch(model)
    assert "forward" not in model.__dict__
    assert model(input_ids, labels=labels).logits is not None
    with pytest.raises(RuntimeError, match="not patched"):
        crossent.hf.unpatch(model)


def test_a_patched_model_pickles_and_deep_copies():
    """torch.save of a whole patched model (and a spawn worker's pickle) loads back patched, as
    does a deepcopy: each copy's forward is bound to the copy itself, not to the original."""
    import copy
    import io
    import inspect

    torch.manual_seed(0)
    model = crossent.hf.patch(_llama().train())
    input_ids, labels, mask = _batch(97, seed=4)
    expected = model(input_ids, attention_mask=mask, labels=labels).loss
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert twin.forward.model is twin
        assert inspect.signature(twin.forward) == inspect.signature(type(twin).forward.__get__(twin))
        out = twin(input_ids, attention_mask=mask, labels=labels)
        assert out.logits is None  # still patched
        torch.testing.assert_close(out.loss, expected)
        with torch.no_grad():
            twin.lm_head.weight.zero_()  # the copy's own head: the original's loss is unchanged
        torch.testing.assert_close(model(input_ids, attention_mask=mask, labels=labels).loss,
                                   expected)
        crossent.hf.unpatch(twin)
        assert twin(input_ids, labels=labels).logits is not None


def test_options_and_token_accuracy():
    torch.manual_seed(0)
    model = _llama().train()
    input_ids, labels, mask = _batch(97, seed=4)
    logits = model(input_ids, attention_mask=mask).logits.detach()  # (B, T, V)
    targets = shift_labels(labels)
    counted = targets != -100
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), label_smoothing=0.1)
    crossent.hf.patch(model, label_smoothing=0.1, token_accuracy=True)
    out = model(input_ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, expected)
    right = (logits.argmax(-1) == targets)[counted].float().mean()
    torch.testing.assert_close(out.token_accuracy, right)
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[counted].mean()
    torch.testing.assert_close(out.entropy, entropy)


def test_causal_lm_loss_matches_in_eval_and_through_a_wrapper():
    torch.manual_seed(0)
    model = _gpt2().eval()
    input_ids, labels, mask = _batch(101, seed=5)
    expected = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    ours = causal_lm_loss(model, input_ids, labels, attention_mask=mask)
    torch.testing.assert_close(ours, expected)
    assert "forward" not in model.__dict__  # the one-call patch is gone again

    class Wrapper(nn.Module):  # the shape of DDP / DeepSpeed: .module, forward delegates
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    pad = labels.masked_fill(labels == -100, 0)  # another ignore_index
    ours = causal_lm_loss(Wrapper(model), input_ids, pad, attention_mask=mask, ignore_index=0)
    torch.testing.assert_close(ours, model(input_ids, attention_mask=mask, labels=pad.masked_fill(
        pad == 0, -100)).loss)


def test_refuses_heads_it_cannot_reproduce():
    model = _llama()
    model.lm_head = nn.Sequential(model.lm_head)
    with pytest.raises(NotImplementedError, match="not a plain torch.nn.Linear"):
        crossent.hf.patch(model)
    with pytest.raises(TypeError, match="not a transformers model"):
        crossent.hf.patch(nn.Linear(2, 2))


def test_peft_lora_patches_the_base_model_and_refuses_an_adapted_head():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_llama(), lora).train()
    input_ids, labels, mask = _batch(97, seed=6)
    expected, expected_grads = _loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert crossent.hf.patch(model) is model
    out, grads = _loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.loss)
    for g, g_ref in zip(grads, expected_grads):
        torch.testing.assert_close(g, g_ref)
    head_lora = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(NotImplementedError, match="PEFT adapter"):
        crossent.hf.patch(peft.get_peft_model(_llama(), head_lora))


def _train(model, steps_dir, patched: bool):
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __init__(self):
            gen = torch.Generator().manual_seed(7)
            self.ids = torch.randint(0, 97, (16, 10), generator=gen)
            self.lengths = torch.randint(4, 11, (16,), generator=gen)  # unequal token counts

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            labels = self.ids[i].clone()
            labels[self.lengths[i]:] = -100
            return {"input_ids": self.ids[i], "labels": labels}

    if patched:
        crossent.hf.patch(model)
    args = transformers.TrainingArguments(
        output_dir=str(steps_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_with_gradient_accumulation_logs_the_same_losses(tmp_path):
    pytest.importorskip("accelerate")
    losses = {}
    for patched in (False, True):
        torch.manual_seed(0)
        losses[patched] = _train(_llama(), tmp_path / str(patched), patched)
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False])
