"""The roofline model of benchmarks/roofline.py: byte and FLOP formulas by hand on a small case, and fastft's
predicted plan no slower (and moving no more bytes) than the peer path for every op at the LLM shapes."""
import pytest

from benchmarks import roofline as rl

SMALL = rl.Shapes(tokens=4, hidden=2, rank=1, vocab=8, s2ft_width=1, dropout=True, nf4_blocksize=2, absmax_blocksize=2)


def test_gemm_and_pointwise_formulas():
    k = rl.gemm("c = a b", 2, 3, 4)
    assert k.flops == 2 * 2 * 3 * 4 and k.bytes == (2 * 4 + 4 * 3 + 2 * 3) * 2
    acc = rl.gemm("c += a b", 2, 3, 4, out_bytes=4, accumulate=True)
    assert acc.bytes == (2 * 4 + 4 * 3) * 2 + 2 * (2 * 3 * 4)
    p = rl.pointwise("copy", 10, 6)
    assert p.flops == 0 and p.bytes == 16
    gpu = rl.GPU("toy", flops=100.0, bandwidth=10.0)
    assert k.seconds(gpu) == max(96 / 100, 52 / 10)


def test_lora_forward_by_hand():
    # M=4 tokens, K=N=2, R=1, bf16 (2 B), boolean mask (1 B)
    fwd = rl.lora_fastft(SMALL)["forward"]
    assert [round(k.bytes) for k in fwd] == [
        4 * 2 * 1,  # the dropout mask
        4 * 2 * 2 + 4 * 2 * 1 + 1 * 2 * 2 + 4 * 1 * 2,  # xa: x, mask, A, xa
        4 * 2 * 2 + 2 * 2 * 2 + 4 * 2 * 2,  # y = x Wᵀ: x, W, y
        4 * 1 * 2 + 1 * 2 * 2 + 2 * (4 * 2 * 2),  # y += s xa Bᵀ: xa, B, y read and written
    ]
    assert [k.flops for k in fwd] == [0, 2 * 4 * 2 * 1, 2 * 4 * 2 * 2, 2 * 4 * 2 * 1]
    peft = rl.lora_peft(SMALL)["forward"]
    assert sum(k.bytes for k in peft) == (
        (16 + 8 + 16)  # result = base_layer(x)
        + (16 + 16 + 8)  # dropout: x in, x̃ and mask out
        + (16 + 4 + 8)  # lora_A
        + (8 + 4 + 16)  # lora_B
        + (16 + 16)  # * scaling
        + (32 + 16)  # add
    )


def test_cross_entropy_transformers_by_hand():
    T, H, V = 4, 2, 8
    plan = rl.ce_transformers(SMALL, train_head=True)
    f = {k.name.split("  ")[0]: k for k in plan["forward"] + plan["backward"]}
    assert f["logits = lm_head(h)"].bytes == (T * H + H * V + T * V) * 2 and f["logits = lm_head(h)"].flops == 2 * T * V * H
    assert f["logits.float()"].bytes == T * V * (2 + 4)
    assert f["log_softmax backward"].bytes == 3 * T * V * 4
    assert f["dW = dlogitsᵀ h"].flops == 2 * V * H * T
    assert rl.plan_totals(plan)["flops"] == 3 * 2 * T * H * V


def test_cross_entropy_chunks_cover_the_tokens():
    s = rl.Shapes()
    chunk = rl.ce_chunk(s)
    assert chunk == 2048  # smallest power of two >= 4 · 989/3.35 (H100) and 4 · 312/2 (A100)
    plan = rl.ce_fastft(s, train_head=True)
    logits = [k for k in plan["forward"] if k.name.startswith("logits_c")]
    assert len(logits) * chunk == s.tokens
    assert sum(k.flops for k in plan["forward"]) == 3 * 2 * s.tokens * s.hidden * s.vocab


@pytest.mark.parametrize("op", [o[0] for o in rl.OPS])
def test_fastft_is_predicted_no_worse_than_the_peer(op):
    row = next(r for r in rl.rows() if r["op"] == op)
    fast, peer = row["fastft"], row["peer_totals"]
    assert fast["bytes"] <= peer["bytes"]
    assert fast["flops"] <= peer["flops"] * (1 + 1e-9)
    for gpu in rl.GPUS:
        assert fast["seconds"][gpu] <= peer["seconds"][gpu], (gpu, fast, peer)


def test_table_says_predicted_and_writes_the_page(tmp_path, capsys):
    out = tmp_path / "roofline.md"
    assert rl.main(["--write", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Predicted, not measured" in printed and printed.count("\n| ") >= 1 + len(rl.OPS)
    page = out.read_text()
    assert "**Predicted, not measured.**" in page and "## Launch plans" in page
    for op, *_ in rl.OPS:
        assert f"### {op}" in page
