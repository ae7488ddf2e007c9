"""The layout QAT's rotation folding needs: the one place that knows model families (Llama, Qwen2, Mistral,
Gemma): which modules read and write the residual stream, each layer's attention and MLP, the norms and
their scale offsets. :func:`model_layout` refuses, naming the reason, a model it does not recognise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

# model_type -> offset of the RMSNorm scale (the norm multiplies by ``weight + offset``)
NORM_OFFSET = {"llama": 0.0, "qwen2": 0.0, "mistral": 0.0, "gemma": 1.0}


@dataclass
class AttentionLayout:
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class LayerLayout:
    index: int
    input_norm: nn.Module
    attention: AttentionLayout
    post_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @property
    def readers(self) -> list[nn.Linear]:
        """Linear layers reading the residual stream (through a norm)."""
        return [self.attention.q, self.attention.k, self.attention.v, self.gate, self.up]

    @property
    def writers(self) -> list[nn.Linear]:
        """Linear layers writing the residual stream."""
        return [self.attention.o, self.down]


@dataclass
class ModelLayout:
    family: str
    norm_offset: float
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear | None
    layers: list[LayerLayout]
    hidden_size: int
    intermediate_size: int
    head_dim: int

    @property
    def tied(self) -> bool:
        return self.lm_head is not None and self.lm_head.weight is self.embed.weight


def _unsupported(model: nn.Module, why: str) -> ValueError:
    family = getattr(getattr(model, "config", None), "model_type", None)
    return ValueError(
        f"fastft QAT rotations / KV quantization: {type(model).__name__} (model_type={family!r}) {why}. "
        f"Supported families: {sorted(NORM_OFFSET)} (decoder-only, RMSNorm, q/k/v/o and gate/up/down projections). "
        "Use QATConfig(rotations=(), kv_bits=None) to fake-quantize the linear layers of another model."
    )


def _child(model: nn.Module, parent: nn.Module, name: str, kind: type, where: str) -> Any:
    module = getattr(parent, name, None)
    if not isinstance(module, kind) or (kind is nn.Linear and not module.weight.is_floating_point()):
        raise _unsupported(model, f"has no float {kind.__name__} at {where}.{name} (found {type(module).__name__})")
    return module


def _check_norm(model: nn.Module, norm: Any, size: int, where: str) -> nn.Module:
    weight = getattr(norm, "weight", None)
    if (
        not isinstance(norm, nn.Module)
        or "RMSNorm" not in type(norm).__name__
        or not isinstance(weight, Tensor)
        or tuple(weight.shape) != (size,)
        or getattr(norm, "bias", None) is not None
    ):
        raise _unsupported(model, f"has no RMSNorm of size {size} at {where} (found {type(norm).__name__})")
    return norm


def model_layout(model: nn.Module) -> ModelLayout:
    """The modules rotation folding touches, or a ``ValueError`` saying why this model is not supported."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in NORM_OFFSET:
        raise _unsupported(model, "is not a supported family")
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "layers"):
        raise _unsupported(model, "has no decoder stack (model.model.layers)")
    hidden = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if not isinstance(embed, nn.Embedding) or embed.weight.shape[1] != hidden:
        raise _unsupported(model, "has no nn.Embedding of the hidden size")
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is not None and not isinstance(lm_head, nn.Linear):
        raise _unsupported(model, f"has an output layer of type {type(lm_head).__name__}")
    layers = []
    for i, block in enumerate(base.layers):
        where = f"layers.{i}"
        attn = getattr(block, "self_attn", None)
        mlp = getattr(block, "mlp", None)
        if attn is None or mlp is None:
            raise _unsupported(model, f"has no self_attn / mlp in {where}")
        q, k, v, o = (_child(model, attn, n, nn.Linear, f"{where}.self_attn") for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (_child(model, mlp, n, nn.Linear, f"{where}.mlp") for n in ("gate_proj", "up_proj", "down_proj"))
        shapes = {
            "q_proj": (q.out_features, q.in_features, heads * head_dim, hidden),
            "k_proj": (k.out_features, k.in_features, kv_heads * head_dim, hidden),
            "v_proj": (v.out_features, v.in_features, kv_heads * head_dim, hidden),
            "o_proj": (o.out_features, o.in_features, hidden, heads * head_dim),
            "gate_proj": (gate.out_features, gate.in_features, gate.out_features, hidden),
            "up_proj": (up.out_features, up.in_features, gate.out_features, hidden),
            "down_proj": (down.out_features, down.in_features, hidden, gate.out_features),
        }
        for name, (out_f, in_f, want_out, want_in) in shapes.items():
            if (out_f, in_f) != (want_out, want_in):
                raise _unsupported(model, f"has {where}.{name} of shape {out_f}x{in_f}, expected {want_out}x{want_in}")
        layers.append(
            LayerLayout(
                index=i,
                input_norm=_check_norm(model, getattr(block, "input_layernorm", None), hidden, f"{where}.input_layernorm"),
                attention=AttentionLayout(attn, q, k, v, o, heads, kv_heads, head_dim),
                post_norm=_check_norm(
                    model, getattr(block, "post_attention_layernorm", None), hidden, f"{where}.post_attention_layernorm"
                ),
                gate=gate,
                up=up,
                down=down,
            )
        )
    if not layers:
        raise _unsupported(model, "has no decoder layers")
    return ModelLayout(
        family=family,
        norm_offset=NORM_OFFSET[family],
        embed=embed,
        final_norm=_check_norm(model, getattr(base, "norm", None), hidden, "model.norm"),
        lm_head=lm_head,
        layers=layers,
        hidden_size=hidden,
        intermediate_size=layers[0].gate.out_features,
        head_dim=head_dim,
    )
