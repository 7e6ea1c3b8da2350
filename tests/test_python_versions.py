"""What the oldest Python deltatune admits (3.10, pyproject's requires-python) lacks, handled.

CI runs Python 3.11 only (the machine's); ruff's target-version py310 checks the syntax. The standard
library differs in one place deltatune uses: `tomllib` (3.11+), which reads TOML study specs.
"""

from __future__ import annotations

import sys

import pytest

from deltatune.study.spec_file import SpecError, read_spec_file


def test_a_toml_spec_without_tomllib_names_tomli_or_yaml(tmp_path, monkeypatch) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10: import fails
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(SpecError, match=r"Python 3.10 needs tomli \(pip install tomli\), or write it as .yaml"):
        read_spec_file(spec)


def test_a_toml_spec_reads_with_tomli_where_tomllib_is_missing(tmp_path, monkeypatch) -> None:
    import tomllib

    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\nmodels = ["minilm-l6"]\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # tomli is the same code under another name
    assert read_spec_file(spec)["name"] == "s"
