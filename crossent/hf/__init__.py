"""Hugging Face ``transformers`` causal LMs trained with crossent's linear cross-entropy.

``model(input_ids, labels=labels).loss`` materialises ``(B, T, V)`` logits, upcasts them to
float32 and keeps them for backward: for a 128K vocabulary that is the largest tensor of the
step. :func:`patch` makes the model compute the same loss from the final hidden states and the
``lm_head`` weight with :func:`crossent.linear_cross_entropy`, which never holds all logits:

    model = crossent.hf.patch(model)      # then train as usual: Trainer, TRL, a plain loop
    loss = crossent.hf.causal_lm_loss(model, input_ids, labels)   # or one call, any mode

transformers is not a dependency of crossent: the model is used through its public surface
(``base_model``, ``get_output_embeddings``, ``config``), one generic forward for every family.
"""
from ._patch import causal_lm_loss, patch, shift_labels, unpatch

__all__ = ["causal_lm_loss", "patch", "shift_labels", "unpatch"]
