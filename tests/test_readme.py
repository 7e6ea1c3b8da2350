"""The README's first Python example, the API tour every new user copies, runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_the_readme_api_tour_runs_and_counts_what_it_says(capsys) -> None:  # noqa: ANN001
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    tour = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    assert "dt.attach(" in tour
    exec(compile(tour, "README.md (first python block)", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    claimed = re.search(r"print\(dm.trainable_parameters\(\)\)\s+# .*= (\d+)", tour)
    assert claimed and out.splitlines()[0] == claimed.group(1)
