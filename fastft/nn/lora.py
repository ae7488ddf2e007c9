"""``LoRALinear``: a drop-in for ``nn.Linear`` / bitsandbytes ``Linear4bit`` with a low-rank update.

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,      A: r×in (``lora_A``), B: out×r (``lora_B``)

with ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rslora). The frozen base layer is kept, untouched, as
the child ``base_layer`` (so ``unpatch`` can put it back); only ``lora_A`` and ``lora_B`` train (``lora_A``
stays frozen with ``train_a=False``). The adapter parameters take the base weight's dtype, except that
half-precision and 4-bit bases get float32 adapters (PEFT's rule, so optimizers step in full precision);
the op computes in the input's dtype (or the autocast dtype, or a 4-bit layer's ``compute_dtype``).

The parameter shapes and meaning are PEFT's (``lora_A.weight`` is r×in, ``lora_B.weight`` out×r), so
``fastft.export_peft`` writes them unchanged.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..bnb import four_bit_weight, is_linear4bit, requantize_like
from ..config import LoRAConfig
from ..distributed import copy_full_, full_tensor, is_sharded
from ..ops.lora import lora_linear
from .layer import FastFTLayer, LinearOperands, WrapsLinear
from .lora_inits import LoRAInit
from ..targets import is_conv1d, linear_features


def check_linear(layer: nn.Module, what: str = "LoRA") -> None:
    """Raise a clear error unless ``layer`` is an ``nn.Linear`` with a float weight or a ``Linear4bit``."""
    if is_linear4bit(layer):
        return
    if (isinstance(layer, nn.Linear) or is_conv1d(layer)) and layer.weight.is_floating_point():
        return
    detail = ""
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        detail = f" (its weight is {layer.weight.dtype}: only float weights and bitsandbytes 4-bit are supported)"
    raise TypeError(
        f"fastft {what} patches nn.Linear and bitsandbytes Linear4bit layers (and transformers' Conv1D); "
        f"got {type(layer).__name__}{detail}."
    )


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """float32 for half-precision and 4-bit bases, else the base weight's dtype (PEFT's rule)."""
    if is_linear4bit(base_layer) or base_layer.weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_layer.weight.dtype


class LoRALinear(LoRAInit, LinearOperands, WrapsLinear, FastFTLayer):
    """LoRA over a frozen linear layer; see the module docstring for the math, and
    :class:`fastft.nn.lora_inits.LoRAInit` for the init schemes (``config.init``).

    Args:
        base_layer: the ``nn.Linear`` or quantized bitsandbytes ``Linear4bit`` to adapt (kept as a child).
        config: a :class:`fastft.LoRAConfig` (r, alpha, dropout, rslora, train_a, init are used here).
    """

    op = "lora_linear"
    supports_dora = False  # fastft.nn.DoRALinear, the subclass that does, sets it
    _dora_class: "type | None" = None  # that subclass; it registers itself (__init_subclass__)

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, defer_attach: bool = False):
        super().__init__()
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"LoRALinear needs a fastft.LoRAConfig, got {type(config).__name__}")
        if config.dora and not self.supports_dora:
            raise TypeError(
                f"{type(self).__name__} does not do DoRA; build DoRA layers with LoRALinear.from_linear(layer, config) "
                "or fastft.nn.DoRALinear(layer, config)."
            )
        check_linear(base_layer)
        self.is_4bit = is_linear4bit(base_layer)
        if self.is_4bit:
            four_bit_weight(base_layer)  # raises now if the layer holds no quantization state
        if config.holds_residual and self.is_4bit:
            raise ValueError(
                f"init={config.init!r} needs a float base weight (the base becomes the residual W - s·BA); "
                "patch the unquantized model, then quantize the residual, or use init='default'."
            )
        if config.holds_residual and min(base_layer.weight.shape) < config.r:
            raise ValueError(
                f"init={config.init!r} needs r <= min(out, in) = {min(base_layer.weight.shape)}, got r={config.r}"
            )
        self.corda_mode = config.corda_mode
        self.corda_covariance: "Tensor | None" = None  # set by the planner from the calibration run (CorDA)
        self.base_layer = base_layer
        # a Conv1D (GPT-2 family) stores its weight in×out: PEFT's fan_in_fan_out; the op sees the out×in view
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.r = config.r
        self.alpha = config.alpha
        self.rslora = config.rslora
        self.scale = config.scale
        self.dropout_p = config.dropout
        self.train_a = config.train_a
        self.init = config.init
        device = base_layer.weight.device
        dtype = adapter_dtype(base_layer)
        self.lora_A = nn.Parameter(
            torch.empty(self.r, self.in_features, device=device, dtype=dtype), requires_grad=self.train_a
        )
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=dtype))
        self.attached = False
        if not defer_attach:
            self.attach()

    @classmethod
    def from_linear(cls, layer: nn.Module, config: LoRAConfig, defer_attach: bool = False) -> "LoRALinear":
        """Wrap ``layer`` (an ``nn.Linear`` or a bitsandbytes ``Linear4bit``); a :class:`fastft.nn.DoRALinear`
        when ``config.dora``."""
        if getattr(config, "dora", False) and not cls.supports_dora:
            cls = LoRALinear._dora_class
        return cls(layer, config, defer_attach=defer_attach)

    def __init_subclass__(cls, **kwargs):
        # the DoRA subclass (fastft.nn.dora, imported with fastft.nn) registers itself here, so that
        # from_linear can build it without this module importing its own subclass
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("supports_dora") and LoRALinear._dora_class is None:
            LoRALinear._dora_class = cls

    @property
    def kind(self) -> str:
        return "qlora" if self.is_4bit else "lora"

    # What model code reads of the layer it replaced (``self.wo.weight.dtype``, ``self.proj.bias``): the wrapped
    # layer's own parameters, read-only (no setter: assigning raises), as PEFT's wrappers expose them.
    def report_detail(self) -> str:
        parts = [f"r={self.r}", f"s={self.scale:g}"]
        if self.dropout_p:
            parts.append(f"dropout={self.dropout_p:g}")
        if not self.train_a:
            parts.append("A frozen")
        if self.init != "default":
            parts.append(f"init={self.init}")
        return " ".join(parts)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        self._refuse_uninitialized()
        base = self.base_layer  # read once: each nn.Module attribute read is a Python __getattr__ (host time)
        if getattr(type(base), "forward_with_update", None) is not None:  # a hosting base (QAT): see rebase()
            return base.forward_with_update(x, self.lora_A, self.lora_B, self.scale)
        x, weight, bias, input_dtype = self._linear_operands(x)
        dtype = x.dtype
        lora_A, lora_B = self.lora_A, self.lora_B
        if lora_A.dtype != dtype:
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        elif lora_B.dtype != dtype:
            lora_B = lora_B.to(dtype)
        mask = None
        if self.training and self.dropout_p > 0.0:
            mask = torch.empty(x.shape, device=x.device).bernoulli_(1.0 - self.dropout_p).bool()
        y = self._run_op(x, weight, bias, lora_A, lora_B, mask)
        return y.to(input_dtype) if self.is_4bit else y

    def _run_op(self, x: Tensor, weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, mask: Tensor | None) -> Tensor:
        """The op on prepared operands (all in the compute dtype); subclasses (DoRA) swap it."""
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scale, self.dropout_p, mask)

    def rebase(self, base: nn.Module) -> None:
        """Wrap ``base``, a module another config put over this adapter's layer (QAT's ``QuantLinear``), which
        then computes the forward given the update (``base.forward_with_update(x, A, B, s)``) and validates
        the combination (``base.host_update(self)``); merging still adds ``s·BA`` to ``base.weight``."""
        base.host_update(self)
        self.base_layer = base

    # ------------------------------------------------------------- adapters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this module adds (trainable or not)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """What ``fastft.save`` stores for this module."""
        state = {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}
        if self.holds_residual:
            state.update(pissa_A0=self.pissa_A0, pissa_B0=self.pissa_B0)
        return state

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`adapter_state_dict` output, checking names and shapes."""
        expected = set(self.adapter_state_dict())
        if set(state) != expected:
            raise ValueError(f"adapter state has keys {sorted(state)}, expected {sorted(expected)}")
        if self.holds_residual and is_sharded(self.base_layer.weight):
            raise ValueError(
                f"loading a {self.init} adapter rewrites the base weight (the residual), which is sharded by FSDP here; "
                "fastft.load it onto the model before sharding it."
            )
        with torch.no_grad():
            for name in ("lora_A", "lora_B"):
                param = getattr(self, name)
                if state[name].shape != param.shape:
                    raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} != {tuple(param.shape)}")
                copy_full_(param, state[name])
            if self.holds_residual:
                # re-derive the residual from the saved initial factors, whatever this SVD produced
                weight = self._weight()
                original = weight.to(self.lora_A.dtype) + self.scale * self.pissa_B0 @ self.pissa_A0
                A0, B0 = state["pissa_A0"].to(original), state["pissa_B0"].to(original)
                weight.copy_((original - self.scale * B0 @ A0).to(weight.dtype))
                self.pissa_A0.copy_(A0)
                self.pissa_B0.copy_(B0)

    def delta_weight(self) -> Tensor:
        """``s · B A`` (out×in, in the adapter dtype): what merging adds to the base weight."""
        return self.scale * (self.lora_B.detach() @ self.lora_A.detach())

    def peft_factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B, extra) of an equivalent PEFT LoRA on the *original* base weight.

        For PiSSA the base holds the residual, so the equivalent update is ``s·(BA - B0A0)``: a rank-2r
        LoRA with A' = [A; A0], B' = [B, -B0]. ``extra`` is the rank multiplier (1 or 2).
        """
        A, B = full_tensor(self.lora_A.detach()), full_tensor(self.lora_B.detach())
        if not self.holds_residual:
            return A, B, 1
        return torch.cat([A, self.pissa_A0], 0), torch.cat([B, -self.pissa_B0], 1), 2

    def unpatched(self, merge: bool) -> nn.Module:
        """The plain layer to put back: with the update folded in (``merge``) or dropped.

        Dropping a PiSSA update restores the original weight (the residual plus the initial factors).
        Merging into a 4-bit base dequantizes, adds and re-quantizes (with a warning: that rounds).
        """
        base = self.base_layer
        if not self.attached:
            return base
        if merge:
            self._refuse_uninitialized()
            delta = self.delta_weight()
        elif self.holds_residual:
            delta = self.initial_delta()
        else:
            return base
        if self.is_4bit:
            warnings.warn(
                "fastft.unpatch(merge=True) on a 4-bit base: the weight is dequantized, merged and re-quantized, "
                "which rounds the merged weight to 4 bits again.",
                stacklevel=3,
            )
            merged = four_bit_weight(base).dequantize(torch.float32) + delta.to(base.weight.device, torch.float32)
            return requantize_like(base, merged)
        with torch.no_grad():
            weight = self._weight()
            weight.copy_((weight.to(delta.dtype) + delta.to(weight.device)).to(weight.dtype))
        return base

    # ------------------------------------------------------------ Chain of LoRA
    def merge_and_restart(self) -> None:
        """Chain of LoRA (COLA): fold the update into the base weight, then start a fresh adapter initialised as
        at patch time (``init``'s rule; B zero, or PiSSA's factors of the merged weight), written in place into
        the same Parameter objects. The layer computes the same function before and after (up to the rounding
        of the merge). A 4-bit base is refused: merging would re-quantize it, changing the function every time.
        """
        if self.is_4bit:
            raise ValueError(
                "Chain of LoRA merges the adapter into the base weight every N steps; this layer's base is a 4-bit "
                "Linear4bit, which would be dequantized, merged and re-quantized each time (rounding the weight to "
                "4 bits again, so the function changes at every merge). Run COLA on a float base, or train QLoRA "
                "without COLA."
            )
        if not self.attached:
            raise ValueError(f"{type(self).__name__}.merge_and_restart: the adapter was never attached (initialised).")
        if self.init in ("corda", "loldu"):
            raise ValueError(f"Chain of LoRA restarts the adapter with init's rule; init={self.init!r} is not restarted "
                             "(CorDA's calibration covariance is gone after patching; LoLDU keeps its factors frozen). "
                             "Use init='default' or 'pissa' with COLA.")
        with torch.no_grad():
            self._fold_update_into_base()
            self.lora_B.zero_()
            self.attached = False
            self._prepared = False  # PiSSA: a fresh SVD, of the merged weight
            self.attach()

    def _fold_update_into_base(self) -> None:
        """``W ← W + s·BA`` in place (the base's own dtype); for a QAT host, into the weight it quantizes."""
        weight = self._weight()
        delta = self.delta_weight()
        weight.copy_((weight.to(delta.dtype) + delta.to(weight.device)).to(weight.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scale={self.scale:g}, dropout={self.dropout_p}, train_a={self.train_a}, init={self.init!r}"
        )
