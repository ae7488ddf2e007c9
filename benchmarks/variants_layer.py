"""The LoRA variants and other PEFT methods of issue #18 on one layer, forward + backward, beside fastft LoRA and PEFT.

    python -m benchmarks --only variants --quick   # every method of this module (tag "variants")
    python -m benchmarks --only qgoft,dsee         # some of them
    python -m benchmarks.variants_layer --quick    # the same, this module alone

One case per method ("loldu", "corda", "selective_lora", "lofit", "dsee", "qgoft"), each on one frozen linear
layer (in = out = hidden, no bias, as in Llama) with an input x that requires grad and a fixed upstream gradient
g; one step is ``y = layer(x); y.backward(g)``. Every case carries the same two reference points, each on its
own copy of the same W: ``fastft-lora`` (fastft's LoRA, r = 16, alpha = 32, B non-zero) and ``peft-lora`` (PEFT's
LoRA at the same r and alpha). Beside them, the method in fastft (each backend that runs here, at r = 16 where
it has a rank) and, where PEFT has the method, PEFT's; where it does not, a "skipped" row says so. The methods
compute different things, so no output agreement is recorded here (each method's tests check its op against
its float64 reference); the ``trainable_params`` rows give each provider's parameter budget.

* loldu: ``LoRAConfig(init="loldu", r=16)``: the LDU factors of W, only the r diagonal entries train.
* corda: ``LoRAConfig(init="corda", r=16)`` calibrated on a few random batches; PEFT's CorDA
  (``preprocess_corda``) likewise. Both train a plain LoRA afterwards (the init differs, the step does not).
* selective_lora: ``SelectiveLoRAConfig(r=16)`` with its gate open (``fastft``) and closed (``fastft-closed``:
  the block computes nothing of its low-rank path; the base layer alone).
* lofit: ``LoFiTLinear`` on an o_proj-shaped layer of hidden/64 heads of 64, a quarter of them selected (at
  least one); the offsets are a bias of o_proj, so its step is about the frozen layer's.
* dsee: ``DSEEConfig(r=16, sparse=64)``: LoRA plus 64 trained entries of W (residual support).
* qgoft: ``QGOFTConfig()`` (log2 hidden stages, scale and relative angle trained); peers PEFT's OFT (block size
  32) and BOFT (block size 32, 2 butterfly factors asked; PEFT sets 1 without its CUDA extension), which are
  *different* orthogonal methods: the nearest PEFT has.

Every method also has the ``torch.compile`` peer (full sweep): its formula in plain PyTorch (``REFERENCES``, on
the fastft layer's own tensors, differentiated by autograd), compiled by inductor.

What is measured and how: ``benchmarks.harness``. This module only declares the cases.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch
from torch import nn

import fastft

from .lora_layer import OneLinear

METHODS = ("loldu", "corda", "selective_lora", "lofit", "dsee", "qgoft")
RANK, ALPHA = 16, 32
HEAD_DIM = 64
DSEE_SPARSE = 64
OFT_BLOCK = 32
CORDA_BATCHES = 4

SUITE_SWEEPS = {
    # (device type, sweep): (base point, {variable: values}); the first point is the --full one
    ("cpu", "quick"): (dict(hidden=128, tokens=128, dtype="float32"), dict(tokens=[128])),
    ("cpu", "full"): (dict(hidden=512, tokens=512, dtype="float32"), dict(tokens=[512, 2048], hidden=[512, 1024])),
    ("cuda", "quick"): (dict(hidden=4096, tokens=4096, dtype="bfloat16"), dict(tokens=[4096])),
    ("cuda", "full"): (dict(hidden=4096, tokens=4096, dtype="bfloat16"), dict(tokens=[4096, 16384], hidden=[2048, 4096])),
}

# What a reader must know about a provider, added to the notes of its rows.
PEER_NOTES = {
    ("corda", "peft-corda"): "PEFT CorDA (preprocess_corda, kpm): at train time a plain PEFT LoRA layer",
    ("corda", "fastft"): "fastft CorDA (kpm): at train time fastft's LoRA layer over the residual weight",
    ("qgoft", "peft-oft"): "PEFT OFT, a different method (block-diagonal Cayley orthogonal, block 32): the nearest "
                           "PEFT has to qGOFT",
    ("qgoft", "peft-boft"): "PEFT BOFT, a different method (butterfly of Cayley blocks, block 32): the nearest PEFT "
                            "has to qGOFT",
    ("selective_lora", "fastft-closed"): "gate closed (σ < τ): the base layer alone, no low-rank path",
}


# ------------------------------------------------------------------------------------------- building
def _base(config: dict, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(0)
    hidden = config["hidden"]
    return nn.Linear(hidden, hidden, bias=False).to(device=device, dtype=dtype).requires_grad_(False)


def _patched(base: nn.Linear, method_config) -> nn.Module:
    """A copy of ``base`` patched by fastft (its own W: residual inits rewrite it)."""
    holder = OneLinear(copy.deepcopy(base))
    fastft.patch(holder, method_config)
    return holder.proj


def _nonzero_b(*tensors: torch.Tensor, seed: int = 2) -> None:
    """B starts at zero; a non-zero B makes every product of the update matter (same values for every holder)."""
    for tensor in tensors:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            tensor.copy_((torch.randn(tensor.shape, generator=gen) * 0.02).to(tensor.dtype))


def _trainable(layer: nn.Module) -> list[torch.Tensor]:
    return [p for p in layer.parameters() if p.requires_grad]


def _fastft_subjects(provider: str, layer: nn.Module, x, g, ctx, parameters=None) -> list:
    from .harness import Subject, fastft_backends, forced_backend

    op = getattr(layer, "op", "lora_linear")
    backends, skipped = fastft_backends(op, ctx.device)
    subjects = [Subject(provider, backend, "fastft", lambda: layer(x), g, [x, *_trainable(layer)],
                        layer if parameters is None else parameters,
                        context=lambda backend=backend: forced_backend(backend),
                        flops_context=lambda: forced_backend("torch"))
                for backend in backends]
    return subjects + skipped


def _first_runnable(subjects: list):
    """The first fastft backend that runs here (the reference points are timed on one backend)."""
    from .harness import Subject

    return next((s for s in subjects if isinstance(s, Subject)), subjects[0])


@contextlib.contextmanager
def _environment_kept():
    """Restore ``os.environ`` exactly afterwards. PEFT's BOFT tries to build its CUDA extension when a layer is
    made, inside a ``patch_environment(CC="gcc", CXX="gcc")`` that does not restore them when the build fails (no
    CUDA): CXX=gcc would then stay set in this process and every later C++ build (fastft's csrc) would use it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _peft_subject(provider: str, base: nn.Linear, peft_config, x, g, prepare=None):
    from peft import get_peft_model

    from .harness import Subject

    holder = OneLinear(copy.deepcopy(base))
    if prepare is not None:
        prepare(holder)
    with _environment_kept():  # PEFT's BOFT builds its extension here (layers are made, not run)
        model = get_peft_model(holder, peft_config)
    layer = model.base_model.model.proj
    return Subject(provider, "eager", "peer", lambda: layer(x), g, [x, *_trainable(layer)], layer), layer


def _no_peft(method: str, what: str):
    import peft

    from .harness import Skipped

    return Skipped(f"peft-{method}", "-", "peer", f"PEFT {peft.__version__} has no {what}: no PEFT row for {method} "
                                                  "(peft-lora is the PEFT reference point)")


def variant_subjects(method: str, config: dict, ctx) -> tuple[list, list]:
    """The subjects of one method at one point, and a ``trainable_params`` measurement per subject."""
    from .harness import DTYPES, Measurement, Skipped, Subject, compiled_peer, installed, missing_note

    dtype, device = DTYPES[config["dtype"]], ctx.device
    hidden, tokens = config["hidden"], config["tokens"]
    base = _base(config, device, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_(True)
    g = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    lora = lambda cls=fastft.LoRAConfig, **kw: cls(r=RANK, alpha=ALPHA, targets=["proj"], **kw)  # noqa: E731

    # the reference points: fastft LoRA and PEFT LoRA, r = 16
    reference = _patched(base, lora())
    _nonzero_b(reference.lora_B)
    subjects: list = [_first_runnable(_fastft_subjects("fastft-lora", reference, x, g, ctx))]
    subjects[0].role = "peer"  # a reference point beside the method, not the method
    has_peft = installed("peft")
    if has_peft:
        from peft import LoraConfig

        peft_lora, peft_layer = _peft_subject("peft-lora", base, LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]), x, g)
        _nonzero_b(peft_layer.lora_B["default"].weight)
        subjects.append(peft_lora)
    else:
        subjects.append(Skipped("peft-lora", "eager", "peer", missing_note("peft", "the PEFT providers")))

    if method == "loldu":
        layer = _patched(base, lora(init="loldu"))
        subjects += _fastft_subjects("fastft", layer, x, g, ctx)
        if has_peft:
            subjects.append(_no_peft(method, "LoLDU"))
    elif method == "corda":
        batches = [torch.randn(tokens, hidden, generator=gen).to(device, dtype) for _ in range(CORDA_BATCHES)]

        def calibrate(model):
            for batch in batches:
                model(batch)

        layer = _patched(base, lora(init="corda", calib=calibrate))
        subjects += _fastft_subjects("fastft", layer, x, g, ctx)
        if has_peft:
            from peft import LoraConfig
            from peft.tuners.lora.config import CordaConfig
            from peft.tuners.lora.corda import preprocess_corda

            corda = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"],
                               init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))

            def prepare(holder):
                preprocess_corda(holder, corda, run_model=lambda: calibrate(holder))

            subjects.append(_peft_subject("peft-corda", base, corda, x, g, prepare)[0])
    elif method == "selective_lora":
        opened = _patched(base, lora(fastft.SelectiveLoRAConfig))
        closed = _patched(base, lora(fastft.SelectiveLoRAConfig))
        _nonzero_b(opened.lora_B, closed.lora_B)
        with torch.no_grad():
            closed.lora_gate_score.fill_(0.0)  # below the threshold: the block is off
        layer = opened
        subjects += _fastft_subjects("fastft", layer, x, g, ctx)
        subjects.append(_first_runnable(_fastft_subjects("fastft-closed", closed, x, g, ctx)))
        if has_peft:
            subjects.append(_no_peft(method, "Selective LoRA (gated LoRA blocks)"))
    elif method == "lofit":
        heads = max(1, (hidden // HEAD_DIM) // 4)
        layer = fastft.nn.LoFiTLinear(copy.deepcopy(base), range(heads), HEAD_DIM)
        subjects += _fastft_subjects("fastft", layer, x, g, ctx)
        if has_peft:
            subjects.append(_no_peft(method, "LoFiT (per-head offsets)"))
    elif method == "dsee":
        layer = _patched(base, lora(fastft.DSEEConfig, sparse=DSEE_SPARSE))
        _nonzero_b(layer.lora_B)
        subjects += _fastft_subjects("fastft", layer, x, g, ctx)
        if has_peft:
            subjects.append(_no_peft(method, "DSEE (LoRA plus a sparse delta)"))
    elif method == "qgoft":
        layer = _patched(base, fastft.QGOFTConfig(targets=["proj"]))
        subjects += _fastft_subjects("fastft", layer, x, g, ctx)
        if has_peft:
            from peft import BOFTConfig, OFTConfig

            subjects.append(_peft_subject("peft-oft", base, OFTConfig(
                oft_block_size=OFT_BLOCK, r=0, target_modules=["proj"]), x, g)[0])
            subjects.append(_peft_subject("peft-boft", base, BOFTConfig(
                boft_block_size=OFT_BLOCK, boft_n_butterfly_factor=2, target_modules=["proj"]), x, g)[0])
    else:
        raise ValueError(f"variants_layer: unknown method {method!r}; choose from {METHODS}")
    reference, what = REFERENCES[method]
    subjects.append(compiled_peer(ctx, reference, (x, layer), g, [x, *_trainable(layer)], layer, what=what))

    extra = []
    seen = set()
    for s in subjects:
        if isinstance(s, Subject) and s.label not in seen:
            seen.add(s.label)
            count = sum(t.numel() for t in s.grads[1:])
            extra.append(Measurement(s.provider, s.backend, s.role, "step", "trainable_params", "params", count,
                                     note="parameters trained (x excluded)"))
    return subjects, extra


def _lora_reference(x: torch.Tensor, layer: nn.Module, gate: torch.Tensor | float = 1.0) -> torch.Tensor:
    """LoRA in plain PyTorch: ``x Wᵀ + gate · s · (x Aᵀ) Bᵀ``."""
    weight, A, B = (t.to(x.dtype) for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
    return torch.nn.functional.linear(x, weight) + gate * layer.scale * ((x @ A.t()) @ B.t())


def _loldu_reference(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """LoLDU in plain PyTorch: ``x W_resᵀ + s · ((x Aᵀ) ⊙ d) Bᵀ`` (A, B frozen)."""
    weight, A, B, d = (t.to(x.dtype) for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.lora_diag))
    return torch.nn.functional.linear(x, weight) + layer.scale * (((x @ A.t()) * d) @ B.t())


def _selective_lora_reference(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Selective LoRA with its gate open: LoRA times the straight-through gate ``σ - sg(σ) + 1``."""
    score = layer.lora_gate_score
    return _lora_reference(x, layer, (score - score.detach() + 1.0).to(x.dtype))


def _lofit_reference(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """LoFiT in plain PyTorch: the offsets as a bias, ``x Wᵀ + W[:, c] v``."""
    from fastft.ops.lofit_linear import lofit_forward_reference

    weight, offset = layer.base_layer.weight.to(x.dtype), layer.lofit_offset.to(x.dtype)
    return lofit_forward_reference(x, weight, None, layer.columns, offset)


def _dsee_reference(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """DSEE in plain PyTorch: LoRA plus ``y[:, i] += Σ_(i,j) S_ij x[:, j]`` over the k trained entries."""
    rows = layer.delta_indices // layer.in_features
    cols = layer.delta_indices % layer.in_features
    return _lora_reference(x, layer).index_add(1, rows, x[:, cols] * layer.delta_values.to(x.dtype))


def _qgoft_reference(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """qGOFT in plain PyTorch: the butterfly by fastft's reference (autograd differentiates it), then the GEMM."""
    from fastft.nn.qgoft import quasi_givens_blocks
    from fastft.ops.givens_rotation import givens_rotation_reference

    blocks = quasi_givens_blocks(layer.theta, layer.scale, layer.delta, layer.live)
    z = givens_rotation_reference(x, blocks)
    return torch.nn.functional.linear(z, layer.base_layer.weight.to(z.dtype))


# method -> (its formula in plain PyTorch on the fastft layer's tensors: the compiled peer's code, what it is)
REFERENCES = {
    "loldu": (_loldu_reference, "LoLDU in plain PyTorch"),
    "corda": (_lora_reference, "LoRA over CorDA's residual weight in plain PyTorch"),
    "selective_lora": (_selective_lora_reference, "Selective LoRA (gate open) in plain PyTorch"),
    "lofit": (_lofit_reference, "LoFiT's offsets as a bias in plain PyTorch"),
    "dsee": (_dsee_reference, "LoRA plus DSEE's sparse entries (gather, index_add) in plain PyTorch"),
    "qgoft": (_qgoft_reference, "qGOFT's PyTorch reference (givens_rotation_reference + linear)"),
}


def _annotate(method: str, measurements: list) -> list:
    for m in measurements:
        note = PEER_NOTES.get((method, m.provider))
        if note and m.metric != "skipped":
            m.note = f"{note}; {m.note}" if m.note else note
    return measurements


def _step_flops(method: str, config: dict) -> float:
    n, k = config["tokens"], config["hidden"]
    lora = 4.0 * n * k * k + 10.0 * n * k * RANK
    return lora * (3 if method in ("qgoft", "selective_lora") else 2)  # providers beyond the two references, roughly


def _cases(method: str, sweeps: dict):
    from .harness import COMPILE_SECONDS, layer_case, layer_estimate, sweep_of, sweep_points

    def cases(ctx) -> list:
        base, variables = sweep_of(method, sweeps, ctx)
        out = []
        for point, x_names in sweep_points(base, variables):
            case = layer_case(
                method, point, x_names, agreement=False,
                build=lambda config, ctx: variant_subjects(method, config, ctx),
                estimate_s=lambda ctx, point=point: layer_estimate(_step_flops(method, point), 2, ctx,
                                                                   8.0 if method == "qgoft" else 1.0)
                + (COMPILE_SECONDS if ctx.compile else 0.0),
            )
            run = case.run
            case.run = lambda ctx, run=run: _annotate(method, run(ctx))
            out.append(case)
        return out

    return cases


DESCRIPTIONS = {
    "loldu": "LoLDU (LoRAConfig init='loldu') on one linear layer, beside fastft and PEFT LoRA",
    "corda": "CorDA (LoRAConfig init='corda'), fastft and PEFT, on one linear layer, beside LoRA",
    "selective_lora": "Selective LoRA, gate open and closed, on one linear layer, beside LoRA",
    "lofit": "LoFiT offsets on an o_proj-shaped layer, beside LoRA",
    "dsee": "DSEE (LoRA + sparse delta) on one linear layer, beside LoRA",
    "qgoft": "qGOFT on one linear layer, beside LoRA, PEFT OFT/BOFT (different methods)",
}


def suite_benchmarks(sweeps: dict | None = None, methods=METHODS) -> list:
    """One benchmark per method (tags "layer", "variants"); ``sweeps`` replaceable (tests)."""
    from .harness import Benchmark

    return [Benchmark(method, _cases(method, sweeps or SUITE_SWEEPS), DESCRIPTIONS[method],
                      tags=("layer", "variants")) for method in methods]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("variants_layer", suite_benchmarks()))
