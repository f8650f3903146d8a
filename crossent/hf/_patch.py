"""``patch(model)``: one generic training forward for any transformers ``*ForCausalLM``."""
from __future__ import annotations

import contextlib
import inspect
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from ._head import IGNORE_INDEX, HeadOptions, check_head, head_loss, unwrap

_STATE = "_crossent_hf"  # attribute of a patched model holding its _State


@dataclass
class _State:
    original: Callable[..., Any]  # the forward in place before patching (bound)
    signature: inspect.Signature  # original's, read once: forward binds every call to it
    own_forward: Any  # an instance-level forward that patching replaced, or None
    options: HeadOptions
    always: bool = False  # causal_lm_loss: the crossent path in eval mode too


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token targets: ``labels[:, 1:]`` padded with ``ignore_index``, shape ``(B, T)``.

    Padding the labels instead of slicing the hidden states keeps ``(B, T, H)`` a view
    (transformers' own ``ForCausalLMLoss`` does the same).
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _output_class(forward: Callable[..., Any]) -> type:
    """The ``ModelOutput`` class the model's forward is annotated to return."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput

    annotation = inspect.signature(forward).return_annotation
    for candidate in (annotation, *typing.get_args(annotation)):  # "tuple | XOutput" too
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            return candidate
    return CausalLMOutputWithPast


def _router_aux_loss(model: nn.Module, outputs: Any, attention_mask: Tensor | None) -> Tensor:
    """The MoE load-balancing loss exactly as the model's own forward adds it: the function its
    modeling module defines, with the model's expert counts."""
    module = sys.modules[type(model).__module__]
    fn = getattr(module, "load_balancing_loss_func", None)
    names = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")
    if fn is None or not all(hasattr(model, n) for n in names):
        raise NotImplementedError(
            f"{type(model).__name__} returns router logits but crossent.hf does not know how it "
            f"turns them into an auxiliary loss: pass output_router_logits=False, or unpatch"
        )
    return fn(outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _State = self.__dict__[_STATE]
    call = state.original
    bound = state.signature.bind_partial(*args, **kwargs).arguments
    for name, p in state.signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    labels = bound.pop("labels", None)
    targets = bound.pop("shift_labels", None)
    keep = bound.pop("logits_to_keep", bound.pop("num_logits_to_keep", 0))  # older name
    use_crossent = (self.training or state.always) and (labels is not None or targets is not None)
    if not use_crossent or not (isinstance(keep, int) and keep == 0):
        # eval, generate(), no labels, or logits asked for (logits_to_keep): untouched
        return call(*args, **kwargs)
    num_items = bound.pop("num_items_in_batch", None)
    return_dict = bound.pop("return_dict", None)
    if targets is None:
        targets = shift_labels(labels)
    config = self.config
    routed = "output_router_logits" in state.signature.parameters
    if routed and bound.get("output_router_logits") is None:
        bound["output_router_logits"] = bool(getattr(config, "output_router_logits", False))
    if "labels" in inspect.signature(self.base_model.forward).parameters:
        bound["labels"] = labels  # multimodal bases (Gemma 3) shape the attention mask by it
    outputs = self.base_model(**bound)
    hidden = outputs[0]  # (B, T, H), after the final norm
    reduction = "mean" if num_items is None else "sum"
    loss, stats = head_loss(self, hidden, targets, state.options, reduction)
    if num_items is not None:
        if isinstance(num_items, Tensor):
            num_items = num_items.to(loss.device)
        loss = loss / num_items  # transformers' gradient-accumulation normalisation
    fields: dict[str, Any] = {}
    if routed and bound["output_router_logits"]:
        aux = _router_aux_loss(self, outputs, bound.get("attention_mask"))
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
        fields["aux_loss"] = aux
    cls = _output_class(call)
    for name in cls.__dataclass_fields__:
        if name not in ("loss", "logits", "aux_loss") and name in outputs:
            fields[name] = outputs[name]
    out = cls(loss=loss, logits=None, **fields)
    if stats is not None:
        # Item assignment also sets the attribute (ModelOutput keeps the two in step).
        out["token_accuracy"] = stats.accuracy
        out["entropy"] = stats.mean_entropy
    return out if return_dict is not False else out.to_tuple()


class _PatchedForward:
    """A patched model's ``forward``: :func:`_forward` bound to the model, reporting the original
    forward's signature (Trainer reads it to keep dataset columns and to decide whether to pass
    ``num_items_in_batch``) and docstring. An object of a module-level class, not a closure or a
    bound method of a function copy: pickle (``torch.save`` of a whole model, a spawn worker)
    finds it by name, and ``copy.deepcopy(model)`` binds the copy's to the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__doc__ = model.__dict__[_STATE].original.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _forward(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return self.model.__dict__[_STATE].signature


def patch(
    model: nn.Module,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    impl: str = "auto",
    chunk_size: int | None = None,
    token_accuracy: bool = False,
) -> nn.Module:
    r"""Train a transformers causal LM with crossent's linear cross-entropy, in place.

    In train mode with ``labels`` (or pre-shifted ``shift_labels``), the patched forward runs
    the base model, then computes the next-token loss from the final hidden states inside the
    ``lm_head`` call (see ``crossent.hf._head``), so the ``(B, T, V)`` logits never exist. It
    returns the model's usual output class with ``logits=None``. ``num_items_in_batch`` (passed
    by ``transformers.Trainer`` under gradient accumulation) turns the mean into
    ``sum / num_items_in_batch``, as transformers' loss does. ``final_logit_softcapping``,
    Cohere's ``logit_scale`` and Granite's ``logits_scaling`` are applied; an MoE model with
    ``output_router_logits`` gets ``router_aux_loss_coef * aux_loss`` added, as its own forward
    does. In eval mode or without labels the original forward runs (logits, ``generate()``).

    Args:
        model: a ``*ForCausalLM`` (or a multimodal ``*ForConditionalGeneration``), possibly
            wrapped by PEFT (the base model is patched; a LoRA adapter on ``lm_head`` raises).
        label_smoothing, z_loss, impl, chunk_size: as :func:`crossent.linear_cross_entropy`.
        token_accuracy: also put ``token_accuracy`` (share of counted tokens whose argmax is the
            label) and ``entropy`` (mean predictive entropy) on the output, from the same pass.

    Returns:
        ``model`` itself. :func:`unpatch` restores the original forward.

    Shape: ``labels``/``shift_labels`` ``(B, T)`` with -100 where no loss; ``loss`` a scalar.

    Examples:
        >>> import transformers, crossent.hf  # doctest: +SKIP
        >>> model = crossent.hf.patch(transformers.AutoModelForCausalLM.from_pretrained(name))  # doctest: +SKIP
        >>> transformers.Trainer(model=model, args=args, train_dataset=data).train()  # doctest: +SKIP
    """
    options = HeadOptions(float(label_smoothing), float(z_loss), impl, chunk_size, token_accuracy)
    _install(unwrap(model), options)
    return model


def _install(target: nn.Module, options: HeadOptions, always: bool = False) -> None:
    check_head(target)
    state = target.__dict__.get(_STATE)
    if state is None:
        own = target.__dict__.get("forward")  # e.g. accelerate's autocast wrapper
        state = _State(target.forward, inspect.signature(target.forward), own, options, always)
        target.__dict__[_STATE] = state
        target.forward = _PatchedForward(target)
    else:
        state.options, state.always = options, always


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the model's forward is the one it had before.

    Args:
        model: a model (or PEFT wrapper) that :func:`patch` patched; anything else raises.

    Returns:
        ``model`` itself.

    Examples:
        >>> model = crossent.hf.unpatch(crossent.hf.patch(model))  # doctest: +SKIP
    """
    target = unwrap(model)
    state = target.__dict__.pop(_STATE, None)
    if state is None:
        raise RuntimeError(f"{type(target).__name__} is not patched by crossent.hf.patch")
    if state.own_forward is None:
        del target.forward
    else:
        target.forward = state.own_forward
    return model


@contextlib.contextmanager
def _patched_for_call(target: nn.Module, options: HeadOptions) -> Iterator[None]:
    """The crossent forward for one call, in any mode; the previous state comes back after."""
    state = target.__dict__.get(_STATE)
    previous = None if state is None else (state.options, state.always)
    _install(target, options, always=True)
    try:
        yield
    finally:
        if previous is None:
            unpatch(target)
        else:
            state.options, state.always = previous


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Tensor | int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    impl: str = "auto",
    chunk_size: int | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Next-token cross-entropy of a transformers causal LM without materialising logits.

    Equals ``model(input_ids, attention_mask=..., labels=labels).loss`` in any mode: the call
    goes through ``model`` itself (a DDP, FSDP, DeepSpeed or PEFT wrapper included, so their
    hooks run) with the patched forward of :func:`patch` in place for that one call.

    Args:
        model: a transformers causal LM, or a wrapper of one.
        input_ids: ``(B, T)`` token ids.
        labels: ``(B, T)`` token ids (usually ``input_ids``) with ``ignore_index`` where no loss.
        ignore_index: the label value that carries no loss (-100, as transformers).
        num_items_in_batch: when given, the loss is the sum over tokens divided by it.
        attention_mask, **model_kwargs: passed to the model.
        label_smoothing, z_loss, impl, chunk_size: as :func:`crossent.linear_cross_entropy`.

    Shape: ``input_ids``, ``labels``, ``attention_mask`` ``(B, T)``; the loss is a scalar.

    Examples:
        >>> import torch, transformers, crossent.hf  # doctest: +SKIP
        >>> loss = crossent.hf.causal_lm_loss(model, ids, ids)  # doctest: +SKIP
        >>> loss.backward()  # doctest: +SKIP
    """
    targets = shift_labels(labels, ignore_index)
    if ignore_index != IGNORE_INDEX:
        targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
    options = HeadOptions(float(label_smoothing), float(z_loss), impl, chunk_size)
    if num_items_in_batch is not None:
        model_kwargs["num_items_in_batch"] = num_items_in_batch
    with _patched_for_call(unwrap(model), options):
        out = model(input_ids=input_ids, attention_mask=attention_mask, shift_labels=targets,
                    **model_kwargs)
    return out.loss if not isinstance(out, tuple) else out[0]
