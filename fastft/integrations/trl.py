"""TRL: ``FastFTSFTTrainer``, an ``SFTTrainer`` that trains with the model's own loss where fastft provides one.

``trl.SFTTrainer`` (TRL >= 1.0) computes its training loss with its own fused LM head: it replaces the
model instance's forward and, with ``fused_lm_head=True``, reads ``lm_head.weight`` directly. On a model
patched by fastft that is fine for adapters inside the decoder (LoRA, QLoRA, DoRA, QAT, S²FT: SFTTrainer
works unchanged), but it would bypass:

* a fastft fused loss (``LossConfig``: DFT, TALR, z-loss, label smoothing, fastft's kernels) — fastft refuses
  that call with a clear error rather than train with another loss;
* a fastft adapter on ``lm_head`` (``LoRAConfig(targets=[..., "lm_head"])``), which has no ``.weight``.

``FastFTSFTTrainer`` takes SFTTrainer's arguments unchanged. When the model has either of the two, its
``compute_loss`` is ``transformers.Trainer``'s: the model is called with the labels (and
``num_items_in_batch``), so the loss is fastft's fused one (or the model's own through the lm_head adapter);
SFTTrainer's data handling, packing, collator and logging stay. Its ``entropy`` and ``mean_token_accuracy``
metrics are then not logged (they come from TRL's fused head). Otherwise it is exactly ``SFTTrainer``.
"""
from __future__ import annotations

try:
    import trl
except ImportError as err:
    raise ImportError("fastft.integrations.FastFTSFTTrainer needs TRL: pip install trl (or, from a fastft checkout, pip install -e '.[test]').") from err

import transformers
from torch import nn

from ..nn import FASTFT_MODULES
from ..plans.loss import SETTINGS_ATTR


def uses_model_loss(model: nn.Module) -> bool:
    """True when TRL's fused LM head would bypass fastft: a fastft fused loss, or a fastft module as lm_head."""
    if SETTINGS_ATTR in model.__dict__:
        return True
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, FASTFT_MODULES)


class FastFTSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the model's own when fastft supplies it (see the module docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not uses_model_loss(self.accelerator.unwrap_model(self.model)):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = {**inputs, "use_cache": False}
        return transformers.Trainer.compute_loss(
            self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
