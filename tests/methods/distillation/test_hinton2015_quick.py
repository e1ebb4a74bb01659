"""Smoke test of the Hinton et al. (2015) reproduction (``main.py --quick``)."""

import pytest

from experiments.hinton2015.main import main


@pytest.mark.slow  # the whole experiment, in its quick configuration
def test_quick_run_prints_a_table_with_paper_figures(capsys):
    result = main(["--quick"])
    out = capsys.readouterr().out
    assert "paper errors/10000" in out and "distilled" in out
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", "student", "distilled"}
    assert rows["teacher"]["paper_errors"] == 67 and rows["distilled"]["paper_errors"] == 74
    assert result["test_size"] == 1000
    for r in rows.values():
        assert 0 <= r["errors"] <= 1000
        assert abs(r["error_rate_pct"] - r["errors"] / 10) < 1e-9
    assert rows["student"]["params"] < rows["teacher"]["params"]
    assert isinstance(result["between"], bool)
