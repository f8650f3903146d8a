"""The loss of a causal LM's head, computed inside the head's own module call.

Distributed wrappers act around a module's ``__call__``: FSDP (1 and 2) and DeepSpeed ZeRO-3
gather a sharded weight in a pre-forward hook and reduce its gradient from hooks set on the
call's outputs. Reading ``lm_head.weight`` outside that call sees a shard (or an empty
placeholder) and skips the reduction. So the loss is made by *forward redirection*: for one
call, ``lm_head.forward`` is replaced by a function computing the linear cross-entropy from the
hidden states, and ``lm_head(hidden)`` runs it with every hook in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

IGNORE_INDEX = -100  # transformers' label for "no loss here"


@dataclass(frozen=True)
class HeadOptions:
    """What :func:`crossent.hf.patch` was asked for; the model's config supplies the rest."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    impl: str = "auto"
    chunk_size: int | None = None
    token_accuracy: bool = False


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT, DDP, FSDP1 and DeepSpeed wrappers.

    PEFT wrappers forward attribute lookups to the model they wrap, so they are recognised by
    ``get_base_model`` before ``get_output_embeddings`` is asked for.
    """
    seen = model
    while True:
        if hasattr(type(model), "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "get_output_embeddings"):
            return model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, FSDP1, DeepSpeed
            model = model.module
        else:
            raise TypeError(
                f"{type(seen).__name__} is not a transformers model (no get_output_embeddings) "
                f"nor a PEFT/DDP/FSDP/DeepSpeed wrapper of one: pass a *ForCausalLM model"
            )


def _inner(head: nn.Module) -> nn.Module:
    """The Linear itself: FSDP1 wraps a sharded submodule in a module that forwards to it."""
    return getattr(head, "_fsdp_wrapped_module", head)


def check_head(model: nn.Module) -> nn.Module:
    """``model``'s output projection, refused unless its forward is exactly ``nn.Linear``'s.

    The loss is computed from ``weight`` and ``bias``: anything a subclass or adapter adds in
    its forward (a LoRA update, dequantisation) would be silently skipped.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise NotImplementedError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None): "
            f"crossent.hf supports causal LMs with a linear lm_head"
        )
    inner = _inner(head)
    if hasattr(inner, "base_layer") or hasattr(inner, "lora_A"):
        raise NotImplementedError(
            f"lm_head carries a PEFT adapter ({type(inner).__name__}); crossent computes the loss "
            f"from lm_head.weight and would skip the adapter: leave lm_head out of the adapter's "
            f"target_modules (or merge the adapter first)"
        )
    if not isinstance(inner, nn.Linear) or type(inner).forward is not nn.Linear.forward:
        raise NotImplementedError(
            f"lm_head is a {type(inner).__name__}, not a plain torch.nn.Linear; crossent computes "
            f"input @ weight.T + bias and would skip what its forward adds: use the unpatched model"
        )
    return head


def config_value(config: Any, name: str) -> Any:
    """``config.<name>``, else the text config's (multimodal wrappers keep the LM's there)."""
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def logit_scale(config: Any) -> float | None:
    """Factor on the logits: Cohere multiplies by ``logit_scale``, Granite divides by
    ``logits_scaling``; ``None`` when neither scales."""
    scale = config_value(config, "logit_scale")
    scaling = config_value(config, "logits_scaling")
    factor = 1.0
    if scale is not None:
        factor *= float(scale)
    if scaling is not None:
        factor /= float(scaling)
    return None if factor == 1.0 else factor


def head_loss(
    model: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    options: HeadOptions,
    reduction: str,
) -> tuple[Tensor, Any]:
    """``(loss, stats or None)`` of ``hidden (B, T, H)`` against ``targets (B, T)`` (already
    shifted), computed by calling ``lm_head`` with its forward redirected."""
    from .. import linear_cross_entropy
    from ..stats import linear_cross_entropy_with_stats

    head = check_head(model)
    inner = _inner(head)
    config = model.config
    kwargs = dict(
        reduction=reduction, ignore_index=IGNORE_INDEX, label_smoothing=options.label_smoothing,
        z_loss=options.z_loss, softcap=config_value(config, "final_logit_softcapping"),
        logit_scale=logit_scale(config), impl=options.impl, chunk_size=options.chunk_size,
    )
    flat_targets = targets.reshape(-1).to(hidden.device)  # (B*T,)

    def redirected(h: Tensor):
        # Runs inside lm_head's __call__: the weight is the gathered one here.
        h = h.reshape(-1, h.shape[-1])  # (B*T, H), a view
        if options.token_accuracy:
            return linear_cross_entropy_with_stats(
                h, inner.weight, flat_targets, linear_bias=inner.bias, **kwargs)
        return linear_cross_entropy(h, inner.weight, flat_targets, linear_bias=inner.bias, **kwargs)

    had_own = "forward" in inner.__dict__
    previous = inner.__dict__.get("forward")
    inner.forward = redirected
    try:
        out = head(hidden)
    finally:
        if had_own:
            inner.forward = previous
        else:
            del inner.forward
    return out if options.token_accuracy else (out, None)
