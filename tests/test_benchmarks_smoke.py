"""`python -m benchmarks` end to end on a tiny random model: the JSON report's shape, not its timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` sits beside `src/`, not inside the installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("peft")
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.memory import probe  # noqa: E402


def test_quick_train_suite_writes_ratios_for_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--suite", "train", "--quick", "--models", "tiny-bert", "--variants", "full,lora,peft-lora"]
    assert main([*argv, "--no-memory", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"date", "torch", "transformers", "peft", "loadavg_start", "loadavg_end"} <= set(report["machine"])
    result = report["suites"]["train"]["tiny-bert"]
    assert result["errors"] == {}
    assert set(result["times_s"]) == {"full", "lora", "peft-lora"}
    assert all(len(t) == 2 and min(t) > 0 for t in result["times_s"].values())
    assert result["summary"]["full"]["ratio_min"] == pytest.approx(1.0)
    assert {"ratio_min", "ratio_median", "ratio_paired_median"} <= set(result["summary"]["lora"])
    assert set(result["vs_peft"]) == {"lora/peft-lora"}
    assert result["trainable_parameters"]["lora"] < result["trainable_parameters"]["full"]


def test_lora_keeps_fewer_activations_for_backward_than_full_finetuning() -> None:
    """Frozen weights need no saved inputs: LoRA keeps only what its factors' gradients use."""
    full = probe("tiny-bert", "full", 2, 16)
    lora = probe("tiny-bert", "lora", 2, 16)
    for row in (full, lora):
        assert row["peak_mb"] >= row["loaded_mb"] > 0
    assert 0 < lora["saved_activations_bytes"] < full["saved_activations_bytes"]


def test_unknown_model_is_refused_with_the_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--models", "gpt-5"])
    assert "tiny-bert" in capsys.readouterr().err


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_module_imports(module: str) -> None:
    """A rename inside deltatune must not silently break a benchmark nobody runs in CI (e2e did once)."""
    import importlib

    importlib.import_module(f"benchmarks.{module}")
