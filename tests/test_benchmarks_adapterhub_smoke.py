"""`python -m benchmarks.adapterhub` on tiny BERT: the report's shape and exactness, not its timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` sits beside `src/`, not inside the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import adapterhub, adapterhub_models  # noqa: E402


def test_without_adapters_it_says_where_to_run_it_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(adapterhub_models, "available", lambda: False)
    assert adapterhub.main(["--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "adapters" in out[0] and "4.57" in out[0]


def test_quick_run_compares_the_same_config_with_the_same_weights(tmp_path: Path) -> None:
    pytest.importorskip("adapters")
    out = tmp_path / "report.json"
    assert adapterhub.main(["--quick", "--methods", "lora,seq_bn", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"torch", "transformers", "adapters", "deltatune", "loadavg_start", "loadavg_end"} <= set(report["machine"])
    for method in ("lora", "seq_bn"):
        info = report["exactness"][method]
        assert info["config_is_the_preset"]
        assert info["trainable_adapterhub"] == info["trainable_deltatune"]
        assert max(info["max_logit_diff_dt_to_ah"], info["max_logit_diff_ah_to_dt"]) <= 1e-5
        assert info["max_logit_diff_delta_off"] > 0  # the delta was perturbed: the check has something to see
    assert report["exactness"]["lora"]["max_logit_diff_merged_dt_vs_ah"] <= 1e-5
    assert set(report["train"]["dt_over_ah"]) == {"lora", "seq_bn"}
    assert set(report["infer"]["dt_over_ah"]) == {"lora", "seq_bn", "lora-merged"}
    assert {"full", "ah-lora", "dt-lora"} <= set(report["train"]["summary"])
    from benchmarks.report import render

    table = render(report)  # docs/benchmarks.md is written from this
    assert "| lora |" in table and "| lora-merged |" in table and "| seq_bn |" in table
