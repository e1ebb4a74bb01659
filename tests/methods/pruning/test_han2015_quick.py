"""The Han et al. (2015) experiment runs end to end in its --quick form."""

import pytest

from experiments.han2015.main import main


@pytest.mark.slow  # the whole experiment, in its quick configuration
def test_han2015_quick(capsys):
    result = main(["--quick"])
    out = capsys.readouterr().out
    assert "paper kept %" in out and "fc1" in out and "target (pruned error" in out
    layers = {r["layer"]: r for r in result["layers"]}
    assert list(layers) == ["fc1", "fc2", "fc3", "total"]
    # exact zeros in the final weights match the paper's per-layer keep ratios
    for name, kept in (("fc1", 8.0), ("fc2", 9.0), ("fc3", 26.0)):
        row = layers[name]
        assert row["paper kept %"] == pytest.approx(kept)
        assert row["kept %"] == pytest.approx(kept, abs=100.0 / row["weights"])
        assert row["nonzero"] == round(kept / 100 * row["weights"])
    assert layers["total"]["kept %"] == pytest.approx(8.18, abs=0.01)
    assert result["compression"] == pytest.approx(12.0, abs=0.1)
    (seed,) = result["seeds"]
    for k in ("dense_error", "pruned_error", "dense_val_error", "pruned_val_error"):
        assert 0.0 <= seed[k] <= 100.0
    assert seed["delta_points"] == pytest.approx(seed["pruned_error"] - seed["dense_error"])
    assert result["target_met"] == (result["delta_points_mean"] <= 0.3 + 1e-6)
