"""`slimjax nas` on the smoke config: supernet, search, extraction, fine-tuning, then int8 quantization."""

import json

from research import cli


def test_nas_cli_smoke_runs_the_stage_and_prints_the_front(tmp_path, capsys):
    assert cli.main(["nas", "configs/nas_mnist1d.py:smoke", "--workdir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of conv1d_family" in out and "chosen:" in out
    found = json.loads((tmp_path / "stages" / "0_nas" / "nas.json").read_text())
    assert len(found["candidates"]) == 4 and any(r["pareto"] for r in found["candidates"])
    assert (tmp_path / "report.json").exists()


def test_nas_cli_refuses_a_config_without_a_nas_stage(capsys):
    assert cli.main(["nas", "configs/quickstart.py:smoke"]) == 2
    assert "has no nas stage" in capsys.readouterr().err
