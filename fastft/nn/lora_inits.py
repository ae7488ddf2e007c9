"""How ``LoRALinear`` initialises its factors (``LoRAConfig.init``): ``default`` (Kaiming-uniform A, B zero),
``gaussian`` (A ~ N(0, 1/r)), and the residual inits ``pissa`` / ``corda`` / ``loldu``, which take a rank-r piece
``s · B0 A0`` of the base weight as the initial factors and leave the residual ``W - s · B0 A0`` as the frozen base
(so the model is unchanged at init). The factor computations are pure math in :mod:`fastft.math.lora_inits`; this
mixin holds the module side: when the factors are computed (:meth:`prepare`, before any weight changes), when the
base becomes the residual (:meth:`attach`), re-initialisation after a meta-device build (:meth:`reset_parameters`).
``LoRALinear`` (and through it DoRA, LoLDU and the experts' LoRA) inherits it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import LoRAConfig
from ..math.lora_inits import corda_factors, pissa_factors


class LoRAInit:
    """The init schemes of :class:`fastft.nn.LoRALinear` (a mixin: it uses the module's ``lora_A``, ``lora_B``,
    ``init``, ``r``, ``scale``, ``in_features``/``out_features``, ``corda_*`` and ``_weight()``)."""

    needs_init = False  # True while an adapter created on the meta device waits for reset_parameters()

    def _refuse_uninitialized(self) -> None:
        if self.needs_init:
            raise RuntimeError(
                f"{type(self).__name__}: this adapter was created on the meta device and is not initialised yet. "
                "Materialize the model first: model.to_empty(device=...) initialises the adapters (LoRA's rule, under "
                "the current torch seed); then load the base weights."
            )

    def prepare(self) -> None:
        """Everything of the initialisation that can fail, done before any base weight is touched: for PiSSA
        the SVD (checked finite) straight into this module's own A, B and initial-factor buffers.

        ``fastft.patch`` prepares every module of every config before it attaches any, so an SVD that fails on
        the fifth layer leaves the first four as they were. Raises ``ValueError`` for a base weight holding
        NaN/inf and lets ``torch.linalg.LinAlgError`` (an SVD that does not converge) through.
        """
        if self.attached or not self.holds_residual or getattr(self, "_prepared", False):
            return
        if self._weight().is_meta:
            raise ValueError(
                f"init={self.init!r} factorizes the base weight, which is on the meta device (not materialized); "
                "patch the model after loading its weights, or use init='default' / 'gaussian'."
            )
        weight = self._weight().detach().to(self.lora_A.dtype)
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"init={self.init!r}: the base weight ({self.out_features}x{self.in_features}) holds NaN or inf, so it "
                "has no factorization; the checkpoint is corrupted. Load a finite one or use init='default'."
            )
        factors = self._initial_factors(weight)
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            raise ValueError(f"init={self.init!r}: the factorization of the base weight gave NaN or inf factors; "
                             "use init='default'.")
        A, B = factors[0], factors[1]
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
        # the initial factors are kept (not trained, not in the state dict) to undo or export the residual
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)
        self._prepared = True

    @property
    def holds_residual(self) -> bool:
        """True when the base weight holds the residual ``W - s·(initial update)`` (PiSSA, CorDA, LoLDU)."""
        return self.init in LoRAConfig.RESIDUAL_INITS

    def _initial_factors(self, weight: Tensor) -> tuple[Tensor, ...]:
        """(A, B, ...) of a residual init from the base weight (out×in, adapter dtype): PiSSA's top-r SVD or
        CorDA's covariance-aware SVD (:func:`fastft.math.lora_inits.corda_factors`)."""
        if self.init == "corda":
            if self.corda_covariance is None:  # fastft.load: the saved factors replace these at once
                covariance = torch.eye(self.in_features, device=weight.device, dtype=weight.dtype)
            else:
                covariance = self.corda_covariance
            A, B = corda_factors(weight, covariance.to(weight.device), self.r, self.corda_mode, self.scale)
            self.corda_covariance = None  # in×in per layer: dropped once used
            return A.to(weight.dtype), B.to(weight.dtype)
        return pissa_factors(weight, self.r, self.scale)

    def attach(self) -> None:
        """Initialise A and B; for PiSSA also turn the base weight into the residual.

        ``fastft.patch`` builds every module with ``defer_attach=True``, prepares them all (:meth:`prepare`),
        and attaches them only once all targets are validated, so an invalid config never modifies a weight.
        On the meta device (a model built under ``init_empty_weights`` / ``torch.device("meta")``) nothing can
        be initialised: the module waits for :meth:`reset_parameters`, which materializing the model calls.
        """
        if self.attached:
            return
        if self.lora_A.is_meta:
            if self.holds_residual:
                self.prepare()  # raises: PiSSA / CorDA / LoLDU need the real weight
            self.needs_init = True
            self.attached = True
            return
        self.prepare()
        with torch.no_grad():
            if self.init == "default":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                weight = self._weight()
                weight.copy_((weight.to(self.lora_A.dtype) - self.initial_delta()).to(weight.dtype))
        self.attached = True

    def initial_delta(self) -> Tensor:
        """``s · B0 A0``: the update a residual init took out of the base weight (out×in, adapter dtype)."""
        if getattr(self, "pissa_A0", None) is None:
            return self.scale * self.lora_B.detach() @ self.lora_A.detach()
        return self.scale * self.pissa_B0 @ self.pissa_A0

    def _apply(self, fn, recurse=True):
        # materializing a meta model (``model.to_empty(device=...)``, FSDP2's flow) runs _apply on every module:
        # an adapter created on meta gets its real initialisation right there
        module = super()._apply(fn, recurse)
        if self.needs_init and not self.lora_A.is_meta:
            self.reset_parameters()
        return module

    def reset_parameters(self) -> None:
        """(Re-)initialise the adapter as at patch time (A by ``init``'s rule, B zero), leaving the base layer
        alone. This is the hook of the materialize-from-meta flows: ``model.to_empty(device=...)`` then each
        module's ``reset_parameters()`` (as FSDP2's ``init_weights`` flow and ``model.apply`` loops call it).
        PiSSA cannot be re-initialised this way (its base holds the residual) and raises."""
        if self.holds_residual:
            raise ValueError(
                f"reset_parameters: a {self.init} adapter's base weight holds the residual W - s·BA; it cannot be "
                "re-initialised in place. Unpatch (merge=False) and patch again."
            )
        if self.lora_A.is_meta:
            raise ValueError(
                "reset_parameters: the adapter is still on the meta device; materialize the model first "
                "(model.to_empty(device=...)), then call reset_parameters()."
            )
        with torch.no_grad():
            self.lora_B.zero_()
            if self.init == "default":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
        self.needs_init = False
        self.attached = True
