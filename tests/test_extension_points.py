"""Extension points: a user's own KD term, pruning scorer and sampler in a module beside a config.

Each new entry is registered in a temporary module (``ext_probe.py`` in a temporary directory,
imported by the config file next to it, which works because ``load_config`` puts the config's
directory on ``sys.path``). The test then finds each entry used by config validation (a typo is
refused with a did-you-mean, the right name passes) and runs each through the conformance
check of its registry, without editing any other file.

To add a case (an export format, once formats are a registry): add its registration to
``EXT_MODULE``, its ``(registry, name)`` to ``REGISTERED``, a stage field naming it to
``CONFIG`` and its conformance check to ``test_each_entry_passes_its_registrys_conformance_check``.
"""

import dataclasses
import importlib
import sys
import textwrap

import pytest

import methods.distillation as md
import methods.pruning as mp
from research import automl
from research import cli
from research import config as C
from research import run as run_lib

run_lib.register_all_stages()

EXT_MODULE = textwrap.dedent(
    '''
    """A user's extension module: one KD term, one pruning scorer, one sampler."""

    import jax
    import jax.numpy as jnp

    from methods.distillation import KDTerm
    from methods.distillation import register_kd_term
    from methods.pruning import register_scorer
    from research.automl import RandomSampler
    from research.automl import register_sampler


    @register_kd_term("ext_cosine")
    def cosine_term(eps: float = 1e-8) -> KDTerm:
        """Mean cosine distance between student and teacher logits."""

        def fn(s, t, batch, model):
            a, b = s["logits"], jax.lax.stop_gradient(t["logits"])
            cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)
            return jnp.mean(1.0 - cos)

        return KDTerm("ext_cosine", fn)


    @register_scorer("ext_square")
    def square_score(weight, grad, key):
        """``w ** 2``."""
        del grad, key
        return weight * weight


    @register_sampler("ext_random")
    class ExtRandomSampler(RandomSampler):
        """The random sampler under the user's own name."""
    '''
)

CONFIG = textwrap.dedent(
    '''
    """A config that uses the extension module beside it."""

    import ext_probe  # noqa: F401  (registers ext_cosine, ext_square, ext_random)

    from methods.distillation import DistillStage
    from methods.distillation import KDTermConfig
    from methods.nas import NASStage
    from methods.pruning import PruneStage
    from research.config import Config
    from research.stages import TrainStage


    def get_config(arg=None):
        return Config(
            name="ext",
            stages=(
                TrainStage(steps=2),
                PruneStage(scorer="ext_square"),
                DistillStage(terms=(KDTermConfig(name="ext_cosine", weight=0.5),), hard_weight=0.5),
                NASStage(sampler="ext_random", trials=4, batch=2),
            ),
        )
    '''
)

# (registry, name) of each entry the module registers.
REGISTERED = [(mp.SCORERS, "ext_square"), (md.KD_TERMS, "ext_cosine"), (automl.SAMPLERS, "ext_random")]
# (override key, a typo of the registered name, the name) for each stage field that names one.
FIELDS = [
    ("stages.prune.scorer", "ext_squar", "ext_square"),
    ("stages.distill.terms.0.name", "ext_cosin", "ext_cosine"),
    ("stages.nas.sampler", "ext_randon", "ext_random"),
]


@pytest.fixture
def ext_config(tmp_path):
    """The path of the config; the module and its registrations are removed afterwards."""
    (tmp_path / "ext_probe.py").write_text(EXT_MODULE)
    (tmp_path / "config.py").write_text(CONFIG)
    path_before = list(sys.path)
    yield str(tmp_path / "config.py")
    sys.path[:] = path_before
    sys.modules.pop("ext_probe", None)
    for registry, name in REGISTERED:
        registry.unregister(name)


def test_a_config_imports_its_neighbour_module_and_validation_uses_its_entries(ext_config):
    assert "ext_probe" not in sys.modules
    config = C.load_config(ext_config)
    for registry, name in REGISTERED:
        assert name in registry, f"{name} was not registered by the module beside the config"
    C.validate(config)  # every new name is accepted
    importlib.reload(sys.modules["ext_probe"])  # run twice (a notebook cell, a config loaded again): no-op
    C.validate(C.load_config(ext_config))
    for key, typo, name in FIELDS:
        bad = C.apply_overrides(config, [f"{key}={typo}"])
        with pytest.raises(C.ConfigError, match=rf"{key}='{typo}' is not registered .*did you mean '{name}'\?"):
            C.validate(bad)


def test_the_cli_finds_the_module_beside_the_config(ext_config, tmp_path, capsys):
    # A typo in a name the module registers: exit 2 with the did-you-mean, before anything trains.
    workdir = tmp_path / "run"
    code = cli.main(["run", ext_config, "--workdir", str(workdir), "--set", "stages.prune.scorer=ext_squar"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'ext_square'?" in err, err
    assert not workdir.exists()


def test_each_entry_passes_its_registrys_conformance_check(ext_config):
    C.load_config(ext_config)
    scorers = importlib.import_module("tests.methods.pruning.test_scorers")
    kd = importlib.import_module("tests.methods.distillation.test_distill_losses")
    samplers = importlib.import_module("tests.research.automl.test_automl_samplers")

    for allocation in ("layerwise", "global"):
        scorers.test_scorer_conformance("ext_square", allocation)
    kd.check_kd_term(md.make_kd_term("ext_cosine"))
    samplers.check_sampler(samplers.sampler_factory("ext_random"))


def test_the_distill_stage_builds_a_registered_term_by_name(ext_config):
    C.load_config(ext_config)
    stage = md.DistillStage(terms=(md.KDTermConfig(name="ext_cosine", weight=0.5, options={"eps": 1e-6}),))
    (spec,), hard = stage.kd_terms()
    term = spec.build()
    assert term.name == "ext_cosine" and spec.weight == 0.5 and hard == stage.hard_weight
    bad = dataclasses.replace(spec, options={"epsilon": 1e-6})
    with pytest.raises(C.ConfigError, match=r"terms.0.options=\{'epsilon': 1e-06\} do not build KD term 'ext_cosine'"):
        C.validate_fields(bad, "stages.distill.terms.0")
