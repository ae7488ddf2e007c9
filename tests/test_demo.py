"""``python -m fastft.demo --quick`` in-process: the report, both loss curves, fastft == PEFT, PEFT reloads."""
import importlib.util
import math

import pytest

from fastft import demo


def test_quick_demo_matches_peft_and_prints_everything(capsys):
    pytest.importorskip("peft", reason="the demo compares with PEFT; install fastft[test]")
    summary = demo.main(["--quick"])
    out = capsys.readouterr().out

    assert "fastft patch report: LlamaForCausalLM" in out
    assert "patched 14 modules" in out  # 2 layers x 7 linear layers
    assert "fastft loss" in out and "PEFT loss" in out
    assert "max |fastft loss - PEFT loss|" in out
    assert "median step time" in out and "peak live tensors" in out and "peak RSS" in out
    assert "peft.PeftModel.from_pretrained" in out

    fastft_losses, peft_losses = summary["losses"]["fastft"], summary["losses"]["PEFT"]
    assert len(fastft_losses) == len(peft_losses) == demo.QUICK.steps
    assert all(math.isfinite(v) for v in fastft_losses + peft_losses)
    assert summary["max_loss_diff"] <= 1e-4
    assert max(abs(a - b) for a, b in zip(fastft_losses, peft_losses)) == summary["max_loss_diff"]
    assert fastft_losses[-1] < fastft_losses[0]  # it learns
    assert summary["logits_max_diff"] <= 1e-5
    assert summary["memory"]["fastft"].peak_live_bytes > 0


def test_demo_without_peft_says_how_to_install_it(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_peft(name, *args, **kwargs):
        return None if name == "peft" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec_without_peft)
    summary = demo.main(["--quick", "--steps", "2"])
    out = capsys.readouterr().out
    assert 'pip install "fastft[peft]"' in out
    assert "fastft patch report" in out and "fastft loss" in out and "PEFT loss" not in out
    assert set(summary["losses"]) == {"fastft"}
    assert all(math.isfinite(v) for v in summary["losses"]["fastft"])
