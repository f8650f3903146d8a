"""Hugging Face ``transformers`` causal LMs trained with crossent's linear cross-entropy.

``model(input_ids, labels=labels).loss`` materialises ``(B, T, V)`` logits, upcasts them to
float32 and keeps them for backward: for a 128K vocabulary that is the largest tensor of the
step. :func:`causal_lm_loss` computes the same loss from the final hidden states and the
``lm_head`` weight with :func:`crossent.linear_cross_entropy`, which never holds all logits.

    loss = causal_lm_loss(model, input_ids, labels)   # instead of model(..., labels=labels).loss
    loss.backward()

transformers is not a dependency of crossent: the model is only used through its public
methods (``base_model``, ``get_output_embeddings``, ``config``).
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["causal_lm_loss", "shift_labels"]

# Config fields of models that transform logits before the loss in ways crossent does not
# reproduce here (Cohere's logit_scale, Granite's logits_scaling): refuse rather than differ.
_UNSUPPORTED_LOGIT_SCALES = ("logit_scale", "logits_scaling")


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token targets: ``labels[:, 1:]`` padded with ``ignore_index``, shape ``(B, T)``.

    Padding the labels instead of slicing the hidden states keeps ``(B, T, H)`` a view
    (transformers' own ``ForCausalLMLoss`` does the same).
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: Tensor | int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    impl: str = "auto",
    chunk_size: int | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Next-token cross-entropy of a transformers ``*ForCausalLM`` without materialising logits.

    Equals ``model(input_ids, attention_mask=..., labels=labels).loss``: targets are ``labels``
    shifted by one, ``ignore_index`` (-100, as transformers) positions are skipped, the mean is
    over counted tokens, or the sum divided by ``num_items_in_batch`` when given (gradient
    accumulation, as transformers' Trainer). ``final_logit_softcapping`` (Gemma 2) is applied.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...).
        input_ids: ``(B, T)`` token ids.
        labels: ``(B, T)`` token ids (usually ``input_ids``) with ``ignore_index`` where no loss.
        attention_mask, **model_kwargs: passed to the base model.
        label_smoothing, z_loss, impl, chunk_size: as :func:`crossent.linear_cross_entropy`.

    Shape: ``input_ids``, ``labels``, ``attention_mask`` ``(B, T)``; the loss is a scalar in the
    model's dtype (accumulated in float32 inside crossent).

    Examples:
        >>> import torch, transformers  # doctest: +SKIP
        >>> config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # doctest: +SKIP
        >>> model = transformers.LlamaForCausalLM(config)  # doctest: +SKIP
        >>> ids = torch.randint(0, 97, (2, 12))  # doctest: +SKIP
        >>> torch.allclose(causal_lm_loss(model, ids, ids), model(ids, labels=ids).loss)  # doctest: +SKIP
        True
    """
    from .linear import linear_cross_entropy  # written alongside; imported on use

    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_LOGIT_SCALES:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} scales its logits by config.{name}; causal_lm_loss does "
                f"not reproduce that: use model(..., labels=labels).loss"
            )
    head = model.get_output_embeddings()  # nn.Linear(H, V), weight (V, H), maybe tied
    outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = outputs[0]  # (B, T, H) final hidden states, after the last norm
    targets = shift_labels(labels.to(hidden.device), ignore_index)  # (B, T)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),  # (B*T, H)
        head.weight,
        targets.reshape(-1),  # (B*T,)
        linear_bias=getattr(head, "bias", None),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=getattr(config, "final_logit_softcapping", None),
        impl=impl,
        chunk_size=chunk_size,
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss
