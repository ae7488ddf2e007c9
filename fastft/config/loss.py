"""``LossConfig``: the fused linear cross-entropy loss and its token weightings."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .checks import MethodConfig, check_number, register_config, with_known_names


@register_config
@with_known_names
@dataclass
class LossConfig(MethodConfig):
    """Fused linear cross-entropy on a ``*ForCausalLM``: the loss without the tokens × vocabulary logits.

    After ``fastft.patch(model, LossConfig(...))`` the model's forward, when given ``labels``, computes the
    loss with :func:`fastft.ops.linear_cross_entropy` straight from the last hidden states and lm_head's
    weight (labels shifted exactly as transformers does; ``shift_labels`` and ``num_items_in_batch``
    honoured). Logits are returned only when asked: ``return_logits=True`` in the call, or by default
    when the model is in eval mode (``model.eval()``); in train mode ``outputs.logits`` is None.

    Args:
        kind: ``"ce"`` (cross-entropy), ``"dft"`` (each token weighted by sg(p_t)) or ``"talr"``
            (weighted by max(sg(p_t)^(1/τ), talr_min_weight), τ the median over the batch's rows of their
            mean NLL, computed per forward call: under gradient accumulation, per micro-batch; so only
            "ce" and "dft" accumulate to exactly the whole batch's gradient).
        chunk_size: tokens per chunk of the PyTorch reference (None: automatic); the Triton kernel ignores it.
        ignore_index: label value that marks positions without a target (transformers' -100; Trainer
            counts ``num_items_in_batch`` with -100 whatever this is).
        label_smoothing: ε in [0, 1], as in ``torch.nn.functional.cross_entropy``.
        z_loss: λ ≥ 0 of the auxiliary ``λ · logsumexp(z)²`` per token (PaLM's z-loss; 1e-4 is common).
        logit_softcap: c > 0 for ``z ← c·tanh(z/c)``. None: the model's own ``final_logit_softcapping``
            if its config has one (Gemma 2), else no cap. A value different from the model's own is refused.
        talr_min_weight: w_min in [0, 1] of TALR.
    """

    method: ClassVar[str] = "loss"
    KINDS: ClassVar[tuple[str, ...]] = ("ce", "dft", "talr")

    kind: str = "ce"
    chunk_size: int | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    talr_min_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"LossConfig.kind={self.kind!r}: choose one of {list(self.KINDS)}.")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"LossConfig.chunk_size={self.chunk_size!r}: use None (automatic) or a positive integer.")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"LossConfig.ignore_index={self.ignore_index!r}: must be an integer (transformers uses -100).")
        for name, low, high in (("label_smoothing", 0.0, 1.0), ("talr_min_weight", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"LossConfig.{name}={value!r}: must be a number in [{low}, {high}].")
            setattr(self, name, float(value))
        check_number("LossConfig.z_loss", self.z_loss, low=0.0, hint="e.g. 1e-4; 0 for none.")
        self.z_loss = float(self.z_loss)
        if self.logit_softcap is not None:
            if (isinstance(self.logit_softcap, bool) or not isinstance(self.logit_softcap, (int, float))
                    or not self.logit_softcap > 0 or math.isinf(self.logit_softcap)):
                raise ValueError(
                    f"LossConfig.logit_softcap={self.logit_softcap!r}: use None (the model's own, if any) or a "
                    "positive number (Gemma 2 uses 30.0)."
                )
            self.logit_softcap = float(self.logit_softcap)
