import dataclasses

import pytest

from research import config as C
from research.stages import TrainStage


def _cfg():
    return C.Config(model=C.ModelConfig(name="mlp"), stages=(TrainStage(steps=10), TrainStage(steps=20)))


def test_override_types_and_paths():
    cfg = C.apply_overrides(
        _cfg(), ["seed=3", "stages.1.learning_rate=1", "model.options.widths=[8,4]", "data.limit=None"]
    )
    assert cfg.seed == 3 and cfg.stages[1].learning_rate == 1.0 and isinstance(cfg.stages[1].learning_rate, float)
    assert cfg.model.options == {"widths": [8, 4]} and cfg.data.limit is None
    cfg = C.apply_overrides(cfg, ["data.limit=100", "stages.0.optimizer=sgd"])
    assert cfg.data.limit == 100 and cfg.stages[0].optimizer == "sgd"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(C.ConfigError, match=r"unknown key 'stages.0.stepz'.*valid keys: .*'steps'"):
        C.apply_overrides(_cfg(), ["stages.0.stepz=5"])
    with pytest.raises(
        C.ConfigError, match=r"valid keys: \['data', 'latency_batch_size', 'model', 'name', 'seed', 'stages'\]"
    ):
        C.apply_overrides(_cfg(), ["modle.name=x"])


def test_wrong_types_are_refused():
    with pytest.raises(C.ConfigError, match="must be an int"):
        C.apply_overrides(_cfg(), ["stages.0.steps=1.5"])
    with pytest.raises(C.ConfigError, match="must be one of"):
        C.apply_overrides(_cfg(), ["stages.0.optimizer=lion"])
    with pytest.raises(C.ConfigError, match="key=value"):
        C.apply_overrides(_cfg(), ["seed"])


def test_stage_by_kind_must_be_unique():
    with pytest.raises(C.ConfigError, match="address one by index"):
        C.apply_overrides(_cfg(), ["stages.train.steps=5"])
    single = dataclasses.replace(_cfg(), stages=(TrainStage(steps=10),))
    assert C.apply_overrides(single, ["stages.train.steps=5"]).stages[0].steps == 5
    with pytest.raises(C.ConfigError, match="no stage 'prune'"):
        C.apply_overrides(single, ["stages.prune.sparsity=0.5"])


def test_validate_names_and_options():
    C.validate(_cfg())
    with pytest.raises(C.ConfigError, match=r"model.name='gpt' is not registered \(model\)"):
        C.validate(dataclasses.replace(_cfg(), model=C.ModelConfig(name="gpt")))
    with pytest.raises(C.ConfigError, match="valid keys"):
        C.validate(dataclasses.replace(_cfg(), model=C.ModelConfig(name="lenet5", options={"depth": 3})))
    with pytest.raises(C.ConfigError, match=r"data.name='cifar100' is not registered \(data set\)"):
        C.validate(dataclasses.replace(_cfg(), data=C.DataConfig(name="cifar100")))
    with pytest.raises(ValueError, match="steps=0"):
        C.validate(dataclasses.replace(_cfg(), stages=(TrainStage(steps=0),)))
    with pytest.raises(C.ConfigError, match="no stages"):
        C.validate(dataclasses.replace(_cfg(), stages=()))


def test_load_config_and_json(tmp_path):
    cfg = C.load_config("configs/quickstart.py:smoke")
    assert cfg.stages[0].kind == "train"
    assert '"kind": "train"' in C.to_json(cfg)
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(C.ConfigError, match="no get_config"):
        C.load_config(str(bad))
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(str(tmp_path / "missing.py"))
