"""fastft inside other training stacks: transformers ``Trainer`` callbacks, TRL, Chain of LoRA.

    from fastft.integrations import FastFTCallback, reselect_trainable
    trainer = transformers.Trainer(..., callbacks=[FastFTCallback(cola_every=100)])

- :class:`FastFTCallback` (:mod:`.callback`): prints the patch report once, runs Chain of LoRA and
  re-selection schedules.
- :func:`merge_and_restart` (:mod:`.cola`): one Chain-of-LoRA link boundary, for hand-written loops.
- :class:`FastFTSFTTrainer` (:mod:`.trl`, imported on first use; needs ``trl``): TRL's ``SFTTrainer`` whose
  loss is the model's own when the model carries a fastft fused loss or a fastft ``lm_head`` adapter.
"""
from .callback import FastFTCallback, reselect_trainable
from .cola import merge_and_restart

__all__ = ["FastFTCallback", "FastFTSFTTrainer", "merge_and_restart", "reselect_trainable"]


def __getattr__(name: str):
    if name == "FastFTSFTTrainer":
        from .trl import FastFTSFTTrainer

        return FastFTSFTTrainer
    raise AttributeError(f"module 'fastft.integrations' has no attribute {name!r}")
