"""Extension points: a user's own KD term, pruning scorer, sampler and export format in a module beside a config.

Each new entry is registered in a temporary module (``ext_probe.py`` in a temporary directory,
imported by the config file next to it, which works because ``load_config`` puts the config's
directory on ``sys.path``). The test then finds each entry used by config validation (a typo is
refused with a did-you-mean, the right name passes) and runs each through the conformance
check of its registry, without editing any other file.

To add a case: add its registration to
``EXT_MODULE``, its ``(registry, name)`` to ``REGISTERED``, a stage field naming it to
``CONFIG`` and its conformance check to ``test_each_entry_passes_its_registrys_conformance_check``.
"""

import dataclasses
import importlib
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

import methods.distillation as md
import methods.pruning as mp
from research import automl
from research import cli
from research import config as C
from research import run as run_lib
from research.export import EXPORT_FORMATS
from research.export import export

run_lib.register_all_stages()

EXT_MODULE = textwrap.dedent(
    '''
    """A user's extension module: one KD term, one pruning scorer, one sampler, one export format."""

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from methods.distillation import KDTerm
    from methods.distillation import register_kd_term
    from methods.pruning import register_scorer
    from research.automl import RandomSampler
    from research.automl import register_sampler
    from research.export import ExportFormat
    from research.export import Produced
    from research.export import register_format


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


    class _NumpyMLP:
        """Runs the Linear layers stored in an .npz file (ReLU between them) with numpy."""

        def __init__(self, path):
            with np.load(path) as z:
                self.layers = [(z[f"w{i}"], z[f"b{i}"]) for i in range(len(z.files) // 2)]

        def __call__(self, x):
            h = np.asarray(x, np.float32).reshape(len(x), -1)
            for i, (w, b) in enumerate(self.layers):
                h = h @ w + b
                h = np.maximum(h, 0) if i < len(self.layers) - 1 else h
            return h


    @register_format
    class ExtNpzFormat(ExportFormat):
        """A dense network's weights in an .npz file, run by numpy."""

        name = "ext_npz"
        runtime_name = "numpy"
        extension = ".npz"

        def produce(self, job, q):
            linears = [m for _, m in nnx.iter_graph(job.convert_model) if isinstance(m, nnx.Linear)]
            arrays = {}
            for i, m in enumerate(linears):
                arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(m.kernel[...]), np.asarray(m.bias[...])
            path = job.path(f"{job.name}_{q}.npz")
            np.savez(path, **arrays)
            return [Produced(name=f"ext_npz_{q}", quantize=q, path=path, runtime="numpy", run=self.load(path))]

        def load(self, path, num_threads=1):
            return _NumpyMLP(path)
    '''
)

CONFIG = textwrap.dedent(
    '''
    """A config that uses the extension module beside it."""

    import ext_probe  # noqa: F401  (registers ext_cosine, ext_square, ext_random, ext_npz)

    from methods.distillation import DistillStage
    from methods.distillation import KDTermConfig
    from methods.nas import NASStage
    from methods.pruning import PruneStage
    from research.config import Config
    from research.export import ExportStage
    from research.stages import TrainStage


    def get_config(arg=None):
        return Config(
            name="ext",
            stages=(
                TrainStage(steps=2),
                PruneStage(scorer="ext_square"),
                DistillStage(terms=(KDTermConfig(name="ext_cosine", weight=0.5),), hard_weight=0.5),
                NASStage(sampler="ext_random", trials=4, batch=2),
                ExportStage(formats=("ext_npz",)),
            ),
        )
    '''
)

# (registry, name) of each entry the module registers.
REGISTERED = [
    (mp.SCORERS, "ext_square"),
    (md.KD_TERMS, "ext_cosine"),
    (automl.SAMPLERS, "ext_random"),
    (EXPORT_FORMATS, "ext_npz"),
]
# (override, the key the error names, the typo, the registered name) for each stage field that names one.
FIELDS = [
    ("stages.prune.scorer=ext_squar", "stages.prune.scorer", "ext_squar", "ext_square"),
    ("stages.distill.terms.0.name=ext_cosin", "stages.distill.terms.0.name", "ext_cosin", "ext_cosine"),
    ("stages.nas.sampler=ext_randon", "stages.nas.sampler", "ext_randon", "ext_random"),
    ('stages.export.formats=["ext_np"]', "stages.export.formats.0", "ext_np", "ext_npz"),
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
    for override, key, typo, name in FIELDS:
        bad = C.apply_overrides(config, [override])
        with pytest.raises(C.ConfigError, match=rf"{key}='{typo}' is not registered .*did you mean '{name}'\?"):
            C.validate(bad)


def test_the_cli_finds_the_module_beside_the_config(ext_config, tmp_path, capsys):
    # A typo in a name the module registers: exit 2 with the did-you-mean, before anything trains.
    workdir = tmp_path / "run"
    code = cli.main(["run", ext_config, "--workdir", str(workdir), "--set", "stages.prune.scorer=ext_squar"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'ext_square'?" in err, err
    assert not workdir.exists()


def test_each_entry_passes_its_registrys_conformance_check(ext_config, tmp_path):
    C.load_config(ext_config)
    scorers = importlib.import_module("tests.methods.pruning.test_scorers")
    kd = importlib.import_module("tests.methods.distillation.test_distill_losses")
    samplers = importlib.import_module("tests.research.automl.test_automl_samplers")

    for allocation in ("layerwise", "global"):
        scorers.test_scorer_conformance("ext_square", allocation)
    kd.check_kd_term(md.make_kd_term("ext_cosine"))
    samplers.check_sampler(samplers.sampler_factory("ext_random"))
    export_formats = importlib.import_module("tests.research.export.test_formats")
    assert "ext_npz" in export_formats.runnable_formats()[0]
    model, x = export_formats.SmallMLP(16, rngs=nnx.Rngs(0)), np.random.default_rng(0).random((24, 64), np.float32)
    report = export(model, x[:8], formats=("ext_npz",), out_dir=tmp_path / "export", eval_data=x, latency_repeats=1)
    export_formats.assert_conforms("ext_npz", report, model, x)


def test_the_distill_stage_builds_a_registered_term_by_name(ext_config):
    C.load_config(ext_config)
    stage = md.DistillStage(terms=(md.KDTermConfig(name="ext_cosine", weight=0.5, options={"eps": 1e-6}),))
    (spec,), hard = stage.kd_terms()
    term = spec.build()
    assert term.name == "ext_cosine" and spec.weight == 0.5 and hard == stage.hard_weight
    bad = dataclasses.replace(spec, options={"epsilon": 1e-6})
    with pytest.raises(C.ConfigError, match=r"terms.0.options=\{'epsilon': 1e-06\} do not build KD term 'ext_cosine'"):
        C.validate_fields(bad, "stages.distill.terms.0")
