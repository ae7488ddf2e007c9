"""benchmarks/sparse_step.py's providers: the list a case yields, and the torch.compile peer's formula.

Nothing here asserts a timing. Shapes tiny; torch.compile is replaced by the identity where the wiring is checked
(inductor on 2 CPU cores takes 5 to 60 s a shape).
"""

import torch

from helpers import bench_context, subjects_by_provider

from benchmarks import harness, sparse_step
from benchmarks.harness import Skipped, Subject

POINT = dict(tokens=6, out_features=12, in_features=10, density=0.1, dtype="float32")




def _run(subject):
    subject.drop_grads()
    with subject.context():
        y = subject.forward()
        y.backward(subject.grad_output)
    return y.detach().clone(), [t.grad.clone() for t in subject.grads]


def test_providers_include_the_compiled_peer_skipped_in_quick():
    subjects = subjects_by_provider(sparse_step.layer_subjects(POINT, bench_context()))
    assert {"fastft", "fastft-auto-path", "masked-dense", "lora", "torch.compile", "frozen"} <= set(subjects)
    compiled = subjects["torch.compile"]
    assert isinstance(compiled, Skipped) and (compiled.backend, compiled.role) == ("inductor", "peer")
    assert "--compile" in compiled.reason and "index_put" in compiled.reason


def test_the_compiled_peer_is_built_with_compile_and_computes_the_ops_output_and_gradients(monkeypatch):
    monkeypatch.setattr(harness, "compiler_available", lambda: None)
    compiled_fns = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_fns.append((fn, kw)) or fn)
    subjects = subjects_by_provider(sparse_step.layer_subjects(POINT, bench_context(quick=False, compile=True)))
    compiled = subjects["torch.compile"]
    assert isinstance(compiled, Subject) and (compiled.backend, compiled.role) == ("inductor", "peer")
    assert [fn for fn, _ in compiled_fns] == [sparse_step.plain_sparse_delta]
    (y0, (dx0, dv0)), (y1, (dx1, dv1)) = _run(subjects["fastft"]), _run(compiled)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(dx1, dx0)
    torch.testing.assert_close(dv1, dv0)
    assert dv1.abs().max() > 0


def test_plain_formula_is_the_dense_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(4, 5, generator=gen, dtype=torch.float64)
    idx, v = torch.tensor([1, 7, 18]), torch.randn(3, generator=gen, dtype=torch.float64)
    dense = w.clone()
    dense.view(-1)[idx] += v
    torch.testing.assert_close(sparse_step.plain_sparse_delta(x, w, idx, v), x @ dense.t(), rtol=0, atol=1e-12)
