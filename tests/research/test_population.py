"""The population executor: same answers as the sequential executor, grouping, K chooser, resume, sharding."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from research import cli
from research import config as C
from research import run as run_lib
from research import sweep as sweep_lib
from research.executors import make_executor
from research.population import executor as pop_executor
from research.population import split_populations
from research.population.chooser import SEQUENTIAL_K
from research.population.chooser import Budget
from research.population.chooser import Candidate
from research.population.chooser import candidate_ks
from research.population.chooser import choose_k
from research.population.trainer import PopulationTrainer
from research.population.trainer import _block_length
from research.train import loops_slow_down_convolutions
from research.train import read_metrics
from research.train import split_model

TINY = """
from methods.pruning import PruneStage
from methods.quantization import QuantizeStage
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    stages = (
        TrainStage(
            steps=6, batch_size=32, optimizer="adamw", weight_decay=0.5, checkpoint_every=0, eval_every=0, log_every=3
        ),
    )
    if arg == "pruned":
        stages += (PruneStage(sparsity=0.8, steps=2, batch_size=32), QuantizeStage(bits=4, calibration_examples=32))
    return Config(
        name="tiny",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=stages,
    )
"""
GRID = {"stages.train.learning_rate": [3e-3, 1e-2, 3e-2]}


def favour(k_best):
    """A fake timer: a chunk of k costs k seconds, except k_best, which costs 1 (no wall clock); the
    sequential executor's step (k=SEQUENTIAL_K) costs as much as one trial's, 1."""

    def timer(k, fn):
        return 1.0 if k in (k_best, SEQUENTIAL_K) else float(k)

    return timer


def _params(run_dir):
    _, model, _ = run_lib.load_run(run_dir)
    return jax.tree.leaves(split_model(model)[1])


def _files(run_dir):
    """Relative paths of a run directory's files (the lock file aside; a checkpoint as its step's
    directory: Orbax names its files by content hashes)."""
    out = set()
    for d, _, fs in os.walk(run_dir):
        for f in fs:
            path = os.path.relpath(os.path.join(d, f), run_dir)
            head, sep, tail = path.partition("/checkpoints/")
            out.add(f"{head}{sep}{tail.split('/')[0]}" if sep else path)
    return sorted(out - {".lock"})


def _steps(stage_dir):
    """The checkpoint steps kept in a stage directory."""
    return sorted(int(n) for n in os.listdir(os.path.join(stage_dir, "checkpoints")) if n.isdigit())


def _val_rows(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "stages", "0_train", "metrics.jsonl"))]
    return [v for r in rows if r["split"] == "val" for v in (r["loss"], r["accuracy"], r["count"])]


def _seq_and_pop(base, grid, tmp_path, timer):
    """The grid swept by the sequential and the population executor (``timer``), neither failing."""
    seq = sweep_lib.sweep(base, grid, str(tmp_path / "seq"), progress=False)
    pop = sweep_lib.sweep(
        base, grid, str(tmp_path / "pop"), progress=False, executor=make_executor("population", timer=timer)
    )
    assert not seq.failed and not pop.failed
    return seq, pop


def _close(a, b, atol=2e-5):
    return all(np.allclose(x, y, atol=atol, rtol=1e-4) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY)
    return str(path)


@pytest.fixture(scope="module")
def pruned_runs(config_file, tmp_path_factory):
    """3 learning rates of a train+prune+quantize pipeline, sequential and population (K=2 by a fake timer:
    a chunk of 2 and a padded chunk of 1); the first stage writes validation rows every 2 of its 6 steps."""
    base = C.apply_overrides(C.load_config(config_file + ":pruned"), ["stages.0.eval_every=2"])
    seq_dir, pop_dir = str(tmp_path_factory.mktemp("seq")), str(tmp_path_factory.mktemp("pop"))
    seq = sweep_lib.sweep(base, GRID, seq_dir, progress=False)
    pop = sweep_lib.sweep(
        base, GRID, pop_dir, progress=False, executor=make_executor("population", timer=favour(2), block_steps=4)
    )
    return seq, pop


def test_population_trials_match_sequential_trials(pruned_runs):
    seq, pop = pruned_runs
    assert not seq.failed and not pop.failed
    (population,) = pop.executor["populations"]
    assert population["k"] == 2 and [c["k"] for c in population["choice"]["candidates"]] == [1, 2]
    # the prune stage's fine-tuning of the full chunk trained as one program too; the padded chunk's
    # single trial fine-tuned alone
    assert population["later_stages"] == [{"stage": 1, "trials": [0, 1], "k": 2}]
    assert population["later_alone"] == [
        {"stage": 1, "trial": 2, "why": "the only fine-tuning of its chunk at this stage"}
    ]
    for a, b in zip(seq.points, pop.points, strict=True):
        assert b.note == "population 0, chunk of 2"
        stages_a, stages_b = (json.load(open(os.path.join(p.run_dir, "report.json")))["stages"] for p in (a, b))
        assert [s["kind"] for s in stages_b] == ["train", "prune", "quantize"]
        for sa, sb in zip(stages_a, stages_b, strict=True):
            for key in ("test_accuracy", "val_accuracy", "nonzeros", "mask_sparsity", "bytes_int4"):
                if key in sa["metrics"]:
                    assert sb["metrics"][key] == pytest.approx(sa["metrics"][key], abs=2e-3), (sa["kind"], key)
        loss_a, loss_b = (s[0]["metrics"]["final_train_loss"] for s in (stages_a, stages_b))
        assert loss_b == pytest.approx(loss_a, rel=1e-4)
        assert stages_b[0]["metrics"]["population_k"] == 2
        assert any("latency_ms measured once for population 0" in n for n in stages_b[0]["notes"])
        in_population = any("fine-tuned in a population of 2" in n for n in stages_b[1]["notes"])
        assert in_population == (a.index < 2)
        assert _close(_params(a.run_dir), _params(b.run_dir))
        # the same files as a sequential run (curves.png drawn on the population's reused figure)
        assert _files(b.run_dir) == _files(a.run_dir)
        assert _val_rows(b.run_dir) == pytest.approx(_val_rows(a.run_dir), abs=2e-5)
        # metrics.jsonl: the same rows (every step's scalars, validation rows at steps 2, 4 and 6)
        rows_a, rows_b = (read_metrics(os.path.join(p.run_dir, "stages", "0_train")) for p in (a, b))
        assert [(r["step"], r["split"], sorted(r)) for r in rows_b] == [
            (r["step"], r["split"], sorted(r)) for r in rows_a
        ]
        assert [r["step"] for r in rows_b if r["split"] == "val"] == [2, 4, 6]
        for ra, rb in zip(rows_a, rows_b, strict=True):
            assert {n: rb[n] for n in ra if n != "split"} == pytest.approx(
                {n: v for n, v in ra.items() if n != "split"}, abs=2e-5, rel=1e-4
            )
    # the grid's learning rates really reach the trials
    params = [_params(p.run_dir) for p in pop.points]
    assert not _close(params[0], params[1]) and not _close(params[1], params[2])
    with open(os.path.join(pop.workdir, "sweep.json")) as f:
        assert json.load(f)["executor"]["populations"][0]["k"] == 2


def test_lenet5_population_matches_sequential_training(tmp_path):
    from research.stages import StageContext
    from research.stages import TrainStage
    from research.stages import finetune
    from research.stages import train_kwargs

    base = C.Config(
        model=C.ModelConfig(name="lenet5"),
        data=C.DataConfig(name="digits", limit=120, val_fraction=0.0),
        stages=(
            TrainStage(steps=2, batch_size=8, learning_rate=3e-3, optimizer="adamw", checkpoint_every=0, eval_every=0),
        ),
    )
    overrides = (["seed=0"], ["seed=1", "stages.0.learning_rate=1e-2", "stages.0.weight_decay=0.5"])
    configs = [C.apply_overrides(base, o) for o in overrides]
    trainer = PopulationTrainer(configs, block_steps=2)
    # A CPU runs LeNet-5's convolutions slowly inside a loop: the blocks are single steps there.
    assert trainer.unlooped == loops_slow_down_convolutions(jax.devices()[0].platform)
    assert trainer.block_steps == (1 if trainer.unlooped else 2)
    trained = trainer.train([0, 1])
    cfg = configs[1]  # another seed (init, split, batches), learning rate and weight decay than trial 0
    bundle = run_lib.build_bundle(cfg)
    ctx = StageContext(index=0, label="0_train", workdir=tmp_path, seed=cfg.seed, progress=False)
    model, _ = finetune(bundle.model, bundle.dataset, ctx, **train_kwargs(cfg.stages[0]))
    assert _close(jax.tree.leaves(split_model(model)[1]), jax.tree.leaves(split_model(trained[1].model)[1]))


DECOMPOSED = """
from methods.decomposition import DecomposeStage, DecompositionRule
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    return Config(
        name="decomposed",
        model=ModelConfig(name="mlp", options={"widths": (32,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(
            TrainStage(steps=40, learning_rate=1e-2, batch_size=32, checkpoint_every=0, eval_every=0, log_every=10),
            DecomposeStage(
                rules=(DecompositionRule(pattern=".*"),),  # ranks from the parameter budget
                check_speed=False,
                train=TrainStage(steps=4, batch_size=32, checkpoint_every=2, eval_every=0, log_every=2),
            ),
        ),
    )
"""


def _checkpoint_shapes(stage_dir, step):
    import orbax.checkpoint as ocp

    item = os.path.join(stage_dir, "checkpoints", str(step), "default")
    meta = ocp.StandardCheckpointer().metadata(item)
    leaves = jax.tree_util.tree_leaves(getattr(meta, "item_metadata", meta), is_leaf=lambda x: hasattr(x, "shape"))
    return sorted(tuple(v.shape) for v in leaves if hasattr(v, "shape"))


def test_factorized_trials_of_different_ranks_fine_tune_together_padded(tmp_path):
    """Two parameter budgets give different ranks; the decompose stage's fine-tuning trains both as
    one program padded to the larger ranks, and each trial ends at its own ranks with what a
    sequential run leaves (metrics, parameters, files, checkpoint shapes)."""
    cfg = tmp_path / "decomposed.py"
    cfg.write_text(DECOMPOSED)
    base = C.load_config(str(cfg))
    grid = {"stages.decompose.budget_param_ratio": [0.3, 0.6]}
    seq, pop = _seq_and_pop(base, grid, tmp_path, favour(2))
    (later,) = pop.executor["populations"][0]["later_stages"]
    assert later["stage"] == 1 and later["trials"] == [0, 1] and later["k"] == 2
    stages = [[json.load(open(os.path.join(p.run_dir, "report.json")))["stages"] for p in r.points] for r in (seq, pop)]
    rows = [json.load(open(os.path.join(p.run_dir, "stages", "1_decompose", "factorization.json")))["layers"]
            for p in seq.points]  # fmt: skip
    ranks = [{r["path"]: r["rank"] for r in layers if r["decision"] == "factorized"} for layers in rows]
    assert ranks[0] != ranks[1] and set(ranks[0]) == set(later["padded_to"])
    for path, padded in later["padded_to"].items():  # the larger of the two trials' ranks
        assert padded == [max(json.loads(r[path]) for r in ranks)]
    for a, b, sa, sb in zip(seq.points, pop.points, *stages, strict=True):
        ma, mb = sa[1]["metrics"], sb[1]["metrics"]
        for key in ("test_accuracy", "val_accuracy", "params", "flops", "final_train_loss"):
            assert mb[key] == pytest.approx(ma[key], abs=2e-3, rel=1e-4), key
        assert any("trained padded with zero components" in n for n in sb[1]["notes"])
        assert any("latency_ms measured once per architecture" in n for n in sb[1]["notes"])
        assert _close(_params(a.run_dir), _params(b.run_dir))
        assert _files(b.run_dir) == _files(a.run_dir)
        for step in (2, 4):  # checkpoints at the trial's own ranks: a killed stage resumes from them
            dirs = [os.path.join(p.run_dir, "stages", "1_decompose") for p in (a, b)]
            assert _checkpoint_shapes(dirs[1], step) == _checkpoint_shapes(dirs[0], step)
    assert stages[1][0][1]["metrics"]["params"] != stages[1][1][1]["metrics"]["params"]


DISTILLED = """
from methods.pruning import PruneStage
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage
from research.teacher import KDTermConfig, TeacherConfig


def get_config(arg=None):
    teacher = TeacherConfig(stage="0_train", terms=(KDTermConfig(name="hinton", weight=0.7),), hard_weight=0.3)
    return Config(
        name="distilled",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(
            TrainStage(steps=6, batch_size=32, checkpoint_every=0, eval_every=0, log_every=3),
            PruneStage(
                sparsity=0.5,
                train=TrainStage(steps=4, batch_size=32, checkpoint_every=2, eval_every=0, log_every=2, teacher=teacher),
            ),
        ),
    )
"""


def test_distilled_fine_tunings_of_different_teachers_and_temperatures_train_together(tmp_path):
    """A prune stage distilled from each trial's own trained model at two temperatures: the four
    fine-tunings train as one program (the teachers' logits and the temperatures are data of the
    program) and each trial ends where its sequential run ends."""
    cfg = tmp_path / "distilled.py"
    cfg.write_text(DISTILLED)
    base = C.load_config(str(cfg))
    grid = {
        "stages.train.learning_rate": [1e-2, 3e-2],
        "stages.prune.train.teacher.terms.0.options.temperature": [2.0, 6.0],
    }
    seq, pop = _seq_and_pop(base, grid, tmp_path, favour(4))
    assert pop.executor["populations"][0]["later_stages"] == [{"stage": 1, "trials": [0, 1, 2, 3], "k": 4}]
    kd = []
    for a, b in zip(seq.points, pop.points, strict=True):
        sa, sb = (json.load(open(os.path.join(p.run_dir, "report.json")))["stages"][1] for p in (a, b))
        assert any("fine-tuned in a population of 4" in n for n in sb["notes"])
        assert any("distilled from" in n for n in sb["notes"])
        for key in ("test_accuracy", "val_accuracy", "final_train_loss", "kd_hinton", "hard_loss"):
            assert sb["metrics"][key] == pytest.approx(sa["metrics"][key], abs=2e-3, rel=1e-4), key
        kd.append(sa["metrics"]["kd_hinton"])
        assert _close(_params(a.run_dir), _params(b.run_dir))
        assert _files(b.run_dir) == _files(a.run_dir)
        rows_a, rows_b = (read_metrics(os.path.join(p.run_dir, "stages", "1_prune")) for p in (a, b))
        assert [(r["step"], r["split"], sorted(r)) for r in rows_b] == [
            (r["step"], r["split"], sorted(r)) for r in rows_a
        ]
        for ra, rb in zip(rows_a, rows_b, strict=True):
            assert {n: rb[n] for n in ra if n != "split"} == pytest.approx(
                {n: v for n, v in ra.items() if n != "split"}, abs=2e-5, rel=1e-4
            )
    assert len({round(v, 4) for v in kd}) == 4  # the temperatures and teachers reached the trials


DISTILL_STAGE = """
from methods.distillation import DistillStage
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage
from research.teacher import KDTermConfig


def get_config(arg=None):
    return Config(
        name="distill",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(
            TrainStage(steps=20, learning_rate=1e-2, batch_size=32, checkpoint_every=0, eval_every=0, log_every=10),
            DistillStage(
                student_model="mlp",
                student_options={"widths": (8,)},
                terms=(KDTermConfig(name="dkd", weight=1.0, options={"beta": 4.0}),),
                hard_weight=1.0,
                train=TrainStage(steps=4, batch_size=32, checkpoint_every=0, eval_every=0, log_every=2),
            ),
        ),
    )
"""


def test_distill_stages_with_different_kd_values_train_together(tmp_path):
    """The ``distill`` stage (a fresh student, DKD) at two betas and two hard weights: one program,
    the sequential executor's results."""
    cfg = tmp_path / "distill.py"
    cfg.write_text(DISTILL_STAGE)
    base = C.load_config(str(cfg))
    grid = {"stages.distill.terms.0.options.beta": [2.0, 8.0], "stages.distill.hard_weight": [0.5, 1.0]}
    seq, pop = _seq_and_pop(base, grid, tmp_path, favour(4))
    assert pop.executor["populations"][0]["later_stages"] == [{"stage": 1, "trials": [0, 1, 2, 3], "k": 4}]
    losses = []
    for a, b in zip(seq.points, pop.points, strict=True):
        sa, sb = (json.load(open(os.path.join(p.run_dir, "report.json")))["stages"][1] for p in (a, b))
        assert any("fine-tuned in a population of 4" in n for n in sb["notes"])
        for key in ("test_accuracy", "final_train_loss", "kd_dkd", "hard_loss"):
            assert sb["metrics"][key] == pytest.approx(sa["metrics"][key], abs=2e-3, rel=1e-4), key
        losses.append(sa["metrics"]["final_train_loss"])
        assert _close(_params(a.run_dir), _params(b.run_dir))
        assert _files(b.run_dir) == _files(a.run_dir)
    assert len({round(v, 5) for v in losses}) == 4


FITNETS = DISTILL_STAGE.replace(
    'terms=(KDTermConfig(name="dkd", weight=1.0, options={"beta": 4.0}),),',
    'terms=(KDTermConfig(name="hinton", weight=0.9, options={"temperature": 4.0}), '
    'KDTermConfig(name="fitnets", weight=0.01, options={"hints": (("layers/0", "layers/0"),)})),',
)


def test_fitnets_hints_from_cached_teacher_features_train_together(tmp_path):
    """A FitNets hint (the student wrapped with a trained projection, the teacher's hidden features
    cached per example) at two weights and two Hinton temperatures: one program, sequential results."""
    assert FITNETS != DISTILL_STAGE
    cfg = tmp_path / "fitnets.py"
    cfg.write_text(FITNETS)
    grid = {"stages.distill.terms.1.weight": [0.01, 0.1], "stages.distill.terms.0.options.temperature": [2.0, 4.0]}
    seq, pop = _seq_and_pop(C.load_config(str(cfg)), grid, tmp_path, favour(4))
    (population,) = pop.executor["populations"]
    assert population["later_stages"] == [{"stage": 1, "trials": [0, 1, 2, 3], "k": 4}]
    assert "later_alone" not in population
    hints = []
    for a, b in zip(seq.points, pop.points, strict=True):
        sa, sb = (json.load(open(os.path.join(p.run_dir, "report.json")))["stages"][1] for p in (a, b))
        for key in ("test_accuracy", "final_train_loss", "kd_fitnets", "kd_hinton"):
            assert sb["metrics"][key] == pytest.approx(sa["metrics"][key], abs=2e-3, rel=1e-4), key
        hints.append(sa["metrics"]["kd_fitnets"])
        assert _close(_params(a.run_dir), _params(b.run_dir))
        assert _files(b.run_dir) == _files(a.run_dir)  # the projection dropped after the stage in both
    assert len({round(v, 4) for v in hints}) == 4


UNCACHEABLE = """
from methods.distillation import DistillStage
from methods.quantization import KurtosisStage
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    short = dict(steps=2, batch_size=32, checkpoint_every=0, eval_every=0, log_every=1)
    return Config(
        name="uncacheable",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(
            TrainStage(steps=6, learning_rate=1e-2, batch_size=32, checkpoint_every=0, eval_every=0, log_every=3),
            KurtosisStage(weight=0.01, train=TrainStage(learning_rate=1e-3, **short)),
            DistillStage(student_model="mlp", student_options={"widths": (8,)}, cache_teacher=False, train=TrainStage(**short)),
        ),
    )
"""


def test_fine_tunings_that_cannot_share_a_program_are_reported_with_the_reason(tmp_path):
    """A stage with its own loss transform (kurtosis) and one whose teacher runs in every step:
    both train alone in every trial, as in a sequential run, and the summary says why."""
    cfg = tmp_path / "uncacheable.py"
    cfg.write_text(UNCACHEABLE)
    base = C.load_config(str(cfg))
    grid = {"stages.train.learning_rate": [1e-2, 3e-2]}
    seq, pop = _seq_and_pop(base, grid, tmp_path, favour(2))
    (population,) = pop.executor["populations"]
    assert population["k"] == 2 and "later_stages" not in population
    why = {(a["stage"], a["trial"]): a["why"] for a in population["later_alone"]}
    assert set(why) == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert why[1, 0] == "the loss transforms of stage 1_kurtosis itself are constants of its program"
    assert why[2, 1].startswith("its teacher runs in every step (not cached: TeacherConfig(cache=False) or ")
    lines = sweep_lib.report_populations(pop.executor)
    assert any(
        line.startswith("  trial 1, stage 2: fine-tuned alone: its teacher runs in every step") for line in lines
    )
    for a, b in zip(seq.points, pop.points, strict=True):
        assert _close(_params(a.run_dir), _params(b.run_dir))


def test_the_reason_names_every_part_of_a_step_that_is_not_cacheable():
    from research.stages import _not_cacheable
    from research.teacher import KDSetup

    online = KDSetup(student=None, loss_transforms=())
    assert _not_cacheable("2_prune", (), lambda tx: tx, None, None) == (
        "its optimizer wrapper declares no wrap_key (what it bakes into the step is unknown)"
    )
    assert _not_cacheable("2_prune", (), lambda tx: tx, ("masked", 1), None) == "its compiled step is not cacheable"
    both = _not_cacheable("1_kd", (lambda loss: loss,), None, None, online)
    assert both.startswith("the loss transforms of stage 1_kd itself are constants of its program; its teacher runs")


QAT = """
from methods.quantization import QATStage
from research.config import Config, DataConfig, ModelConfig
from research.stages import TrainStage


def get_config(arg=None):
    return Config(
        name="qat",
        model=ModelConfig(name="mlp", options={"widths": (16,)}),
        data=DataConfig(name="digits", limit=300),
        stages=(
            TrainStage(steps=30, learning_rate=1e-2, batch_size=32, checkpoint_every=0, eval_every=0, log_every=10),
            QATStage(
                method=arg or "ste",
                calibration_examples=64,
                train=TrainStage(steps=4, learning_rate=1e-3, batch_size=32, checkpoint_every=2, eval_every=0, log_every=2),
            ),
        ),
    )
"""


def test_qat_trials_of_different_bit_widths_fine_tune_together(tmp_path):
    """QAT at 3, 4, 6 and 8 bits: the four fine-tunings train as one program with each quantizer's
    integer grid a value in the state, and each trial ends at its own bit width where its
    sequential run ends (metrics, parameters, files, checkpoint shapes, the stored model's bits).

    A vmapped step rounds some sums differently from the sequential one (ulps); a weight whose value
    sits on its grid's rounding or clipping boundary (a weight quantizer re-reads the kernel's range
    each step, so its largest weight sits on the clipping edge) then takes the other side, and its
    update differs by about one optimizer step: a few weights differ by up to ~3e-3, the rest agree to
    float rounding. That the lifted grids compute exactly what the trials' own do is
    tests/methods/quantization/test_quant_lift.py's."""
    cfg = tmp_path / "qat.py"
    cfg.write_text(QAT)
    base = C.load_config(str(cfg))
    grid = {"stages.qat.bits": [3, 4, 6, 8]}
    seq, pop = _seq_and_pop(base, grid, tmp_path, favour(4))
    (later,) = pop.executor["populations"][0]["later_stages"]
    assert later["stage"] == 1 and later["trials"] == [0, 1, 2, 3] and later["k"] == 4
    assert later["lifted"] and all(v == [[3], [4], [6], [8]] for v in later["lifted"].values())
    accuracy = []
    for bits, a, b in zip((3, 4, 6, 8), seq.points, pop.points, strict=True):
        sa, sb = (json.load(open(os.path.join(p.run_dir, "report.json")))["stages"][1] for p in (a, b))
        assert any("integer grids as values" in n for n in sb["notes"])
        for key in ("test_accuracy", "val_accuracy", "final_train_loss"):
            assert sb["metrics"][key] == pytest.approx(sa["metrics"][key], abs=2e-3, rel=1e-4), key
        accuracy.append(sa["metrics"]["final_train_loss"])
        for x, y in zip(_params(a.run_dir), _params(b.run_dir), strict=True):
            off = np.abs(np.asarray(x) - np.asarray(y))
            assert off.max() < 5e-3 and np.mean(off > 2e-5) < 0.01, (bits, off.max(), np.mean(off > 2e-5))
        assert _files(b.run_dir) == _files(a.run_dir)
        stage_dirs = [os.path.join(p.run_dir, "stages", "1_qat") for p in (a, b)]
        for step in (2, 4):
            assert _checkpoint_shapes(stage_dirs[1], step) == _checkpoint_shapes(stage_dirs[0], step)
        from methods.quantization.modules import find_quantizers

        _, model, _ = run_lib.load_run(b.run_dir)
        assert {q.spec.bits for _, q in find_quantizers(model)} == {bits}
        assert all(getattr(q, "lifted_grid", None) is None for _, q in find_quantizers(model))
    assert len(set(accuracy)) == 4  # the bit widths reached the trials


def test_later_fine_tunings_that_differ_train_alone_with_the_reason(config_file, tmp_path):
    """Two trials whose prune stages fine-tune at different batch sizes: both train alone, and the
    executor summary (sweep.json, the CLI's lines) says which part of their programs differs."""
    base = C.load_config(config_file + ":pruned")
    grid = {"stages.prune.batch_size": [32, 16]}
    seq, pop = _seq_and_pop(base, grid, tmp_path, favour(2))
    (population,) = pop.executor["populations"]
    assert population["k"] == 2 and "later_stages" not in population
    assert population["later_alone"] == [
        {"stage": 1, "trial": i, "why": "its program differs from the chunk's other trials' in: batch size"}
        for i in (0, 1)
    ]
    lines = sweep_lib.report_populations(pop.executor)
    assert (
        "  trial 1, stage 1: fine-tuned alone: its program differs from the chunk's other trials' in: batch size"
        in lines
    )
    for a, b in zip(seq.points, pop.points, strict=True):
        assert _close(_params(a.run_dir), _params(b.run_dir))
    with open(os.path.join(pop.workdir, "sweep.json")) as f:
        assert json.load(f)["executor"]["populations"][0]["later_alone"] == population["later_alone"]


def test_mixed_keys_split_into_populations_with_a_reason(config_file):
    base = C.load_config(config_file)
    configs = [
        C.apply_overrides(base, o)
        for o in (
            ["stages.0.learning_rate=0.01"],
            ["stages.0.batch_size=64"],
            ["seed=3"],
            ["stages.0.optimizer='sgd'", "stages.0.weight_decay=0.1"],
            ["stages.0.optimizer='sgd'", "stages.0.weight_decay=0.2"],
        )
    ]
    configs.append(C.Config(stages=(run_lib.get_stage("prune")[0](sparsity=0.5),)))
    groups = split_populations(configs)
    assert [g.indices for g in groups] == [(0, 2), (1,), (3,), (4,), (5,)]
    assert groups[0].reason == "" and not groups[0].solo
    assert "stages.0.batch_size=64" in groups[1].reason and "first population: 32" in groups[1].reason
    # sgd's weight decay is a constant of the compiled program, adamw's a value in its state
    assert "weight_decay (optimizer != adamw)" in groups[3].reason
    assert groups[4].solo and "first stage is 'prune'" in groups[4].reason


def test_chooser_falls_back_to_sequential_when_vmap_is_slower():
    measured = []

    def measure(k):
        measured.append(k)
        return (0.01 if k == 1 else 0.015 * k), 1000 * k  # a vmapped conv on a CPU: 1.5x K single steps

    choice = choose_k(16, measure, memory_limit=10**9)
    assert choice.k == 1 and choice.sequential and "does not pay" in choice.reason
    assert measured == [1, 2]  # stops once a larger K is slower per trial


def test_chooser_picks_best_throughput_and_respects_memory():
    def measure(k):
        return {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.3, 16: 4.0}[k], 100 + 50 * k

    assert choose_k(16, measure, memory_limit=10**9).k == 8
    # 8 trials would need 500 bytes: predicted from K=1,2,4 and never compiled or measured
    seen = []
    choice = choose_k(16, lambda k: (seen.append(k), measure(k))[1], memory_limit=400)
    assert choice.k == 4 and seen == [1, 2, 4, 1, 4, 1, 4] and "not tried" in choice.reason
    with pytest.raises(MemoryError, match="one trial"):
        choose_k(4, measure, memory_limit=10)
    # padding counts: 5 trials in chunks of 4 need two chunks
    flat = choose_k(5, lambda k: (1.0, 0), memory_limit=10**9)
    assert [c.k for c in flat.candidates] == [1, 2, 4] and flat.k == 4
    assert flat.candidates[-1].trial_steps_per_s == pytest.approx(5 / 2)
    assert candidate_ks(12, max_k=8, multiple_of=4) == [1, 4, 8]


def test_chooser_confirms_a_winning_k_against_one_trial_at_a_time():
    # K=1's first timing was slowed by other processes: timed again alternately with K=2, it wins
    times = {1: [2.6, 1.0, 1.1], 2: [2.4, 2.5, 2.4]}

    def measure(k):
        return times[k].pop(0), 0

    choice = choose_k(2, measure, memory_limit=10**9)
    assert choice.k == 1 and "confirmed" in choice.reason
    assert [c.step_seconds for c in choice.candidates] == [1.0, 2.4]


def test_chooser_compares_the_best_program_with_the_sequential_step():
    def pop(k):  # seconds per step of a chunk of k: K=2 is the best program
        return {1: 1.0, 2: 1.2, 4: 4.0}[k], 0

    # the sequential executor's step beats even K=2's 0.6 s per trial step: the sequential path
    calls = []
    choice = choose_k(4, pop, memory_limit=10**9, sequential=lambda: calls.append(1) or 0.5)
    assert choice.k == 1 and choice.runner == "sequential" and choice.sequential
    assert choice.sequential_seconds == 0.5 and len(calls) == 3  # timed 1 + 2 confirm rounds
    assert "sequential executor" in choice.reason and choice.to_dict()["sequential_step_seconds"] == 0.5
    # slower than K=2 per trial step (0.7 > 0.6): the population's K=2 program
    choice = choose_k(4, pop, memory_limit=10**9, sequential=lambda: 0.7)
    assert choice.k == 2 and choice.runner == "population" and choice.sequential_seconds == 0.7
    # a tie goes to the sequential path (the population must be faster, never slower)
    assert choose_k(4, pop, memory_limit=10**9, sequential=lambda: 0.6).runner == "sequential"
    # vmap does not pay, and the sequential step (1.1 s) is slower than the K=1 program (1.0 s)
    slow = choose_k(4, lambda k: (1.0 * k * 1.5 if k > 1 else 1.0, 0), memory_limit=10**9, sequential=lambda: 1.1)
    assert slow.k == 1 and slow.runner == "population" and "K=1 program beats" in slow.reason
    # ... and faster than it: the sequential path
    fast = choose_k(4, lambda k: (1.0 * k * 1.5 if k > 1 else 1.0, 0), memory_limit=10**9, sequential=lambda: 0.9)
    assert fast.runner == "sequential"


def test_sequential_step_timings_alternate_with_the_best_program_and_keep_the_fastest():
    # a loaded machine: the sequential step's first timing was slowed; timed again alternately, it wins
    order, seq_times = [], [3.0, 0.4, 0.45]

    def pop(k):
        order.append(k)
        return {1: 1.0, 2: 1.0}[k], 0

    def seq():
        order.append("seq")
        return seq_times.pop(0)

    choice = choose_k(2, pop, memory_limit=10**9, sequential=seq, confirm_rounds=2)
    assert choice.runner == "sequential" and choice.sequential_seconds == 0.4
    assert order == ["seq", 1, 2, 1, 2, 1, 2, 2, "seq", 2, "seq"]  # the sequential step first


class FakeCosts:
    """A fake clock and fake programs: measuring K costs its compile (the first time) plus
    ``timed`` steps of its step time, on the fake clock; no wall clock anywhere."""

    def __init__(self, step, compile_, seq, seq_compile=0.0, timed=4, seq_timed=4):
        self.step, self.compile_, self.seq, self.seq_compile = step, compile_, seq, seq_compile
        self.timed, self.seq_timed, self.now, self.measured, self.compiled = timed, seq_timed, 0.0, [], {}

    def measure(self, k):
        self.measured.append(k)
        if k not in self.compiled:
            self.compiled[k] = self.compile_(k)
            self.now += self.compiled[k]
        self.now += self.timed * self.step(k)
        return self.step(k), 0

    def sequential(self):
        self.now += self.seq_timed * self.seq
        return self.seq

    def budget(self, trials, steps, fraction=0.1):
        return Budget(
            trials=trials,
            steps=steps,
            fraction=fraction,
            clock=lambda: self.now,
            compile_seconds=lambda k: self.compiled.get(k, 0.0),
            timed_steps=self.timed,
            sequential_timed_steps=self.seq_timed,
            sequential_compile=lambda: self.seq_compile,
        )

    def choose(self, trials, steps, fraction=0.1, **options):
        budget = self.budget(trials, steps, fraction)
        choice = choose_k(
            trials, self.measure, memory_limit=10**9, sequential=self.sequential, budget=budget, **options
        )
        return choice, budget


def test_chooser_stops_measuring_when_the_budget_is_spent():
    # 8 trials x 100 steps at 1 s a step: a budget of 0.1 x 800 s = 80 s
    # the sequential step compiled in 100 s: a population program compiles no faster; none is compiled
    costs = FakeCosts(step=lambda k: 1.0, compile_=lambda k: 100.0, seq=1.0, seq_compile=100.0)
    choice, _ = costs.choose(8, 100)
    assert costs.measured == [] and choice.runner == "sequential" and choice.candidates == ()
    assert "K=1 and larger not measured" in choice.reason and "exceeds the budget" in choice.reason
    # its compile took 40 s: K=1 (at least 40 s + 4 timed steps) fits; K=2 would compile in at least
    # K=1's 41 s more, beyond the 80 s, so it is not compiled; the two confirmation rounds against the
    # sequential step (8 s each) fit
    costs = FakeCosts(step=lambda k: 1.0 * k, compile_=lambda k: 40.0 + k, seq=1.0, seq_compile=40.0)
    choice, budget = costs.choose(8, 100)
    assert costs.measured == [1, 1, 1] and choice.runner == "sequential"
    assert "K=2 and larger not measured" in choice.reason and budget.spent() <= budget.limit()
    # a longer training affords more: K=1, 2 and 4 are compiled (at 1000 steps the budget is 800 s)
    costs = FakeCosts(step=lambda k: 1.0 * k**0.5, compile_=lambda k: 30.0 + k, seq=0.9, seq_compile=30.0)
    choice, budget = costs.choose(8, 1000)
    assert set(costs.measured) == {1, 2, 4, 8} and choice.k == 8 and choice.runner == "population"
    # a population program slightly faster in its one timing, with no budget left to confirm it (a
    # round costs 4 x 0.9 + 4 x 1 = 7.6 s, more than 0.1 of the 8 x 55 x 0.1 = 44 s it promises): the
    # sequential path
    costs = FakeCosts(step=lambda k: {1: 0.9, 2: 2.0}[k], compile_=lambda k: 40.0, seq=1.0, seq_compile=40.0)
    choice, budget = costs.choose(8, 55)
    assert costs.measured == [1] and choice.runner == "sequential" and "unconfirmed" in choice.reason
    assert not budget.allows(7.6) and not budget.allows_confirming(7.6, 0.9)
    # ... twice as fast: its compile overran the budget, but a round (6 s) costs less than 0.1 of the
    # 220 s it promises, so both rounds run, confirm it and it trains (K=2 is not compiled: over budget)
    costs = FakeCosts(step=lambda k: {1: 0.5, 2: 2.0}[k], compile_=lambda k: 40.0, seq=1.0, seq_compile=40.0)
    choice, budget = costs.choose(8, 55)
    assert costs.measured == [1, 1, 1] and choice.runner == "population" and choice.k == 1
    assert budget.spent() > budget.limit() and "unconfirmed" not in choice.reason
    # ... and one slower in its one timing: the sequential step is faster, nothing to confirm
    costs = FakeCosts(step=lambda k: {1: 2.0, 2: 4.0}[k], compile_=lambda k: 40.0, seq=1.0, seq_compile=40.0)
    choice, _ = costs.choose(8, 55)
    assert costs.measured == [1] and choice.runner == "sequential" and "unconfirmed" not in choice.reason
    assert "the sequential executor's own jitted step is at least as fast" in choice.reason, choice.reason


def test_chooser_compiles_a_program_only_when_its_best_gain_repays_it():
    # the K=1 program steps at twice the sequential step's time: a chunk of 2 steps at least as long,
    # so K=2 trains each trial step in at least the sequential step's time: it cannot gain; not compiled
    costs = FakeCosts(step=lambda k: 2.0 * k, compile_=lambda k: 1.0, seq=1.0)
    choice, _ = costs.choose(16, 10**6, fraction=1.0)
    assert set(costs.measured) == {1} and choice.runner == "sequential" and "could save at most 0 s" in choice.reason
    # K=2 nearly as slow as K=1 per step: K=4 could save at most ~1/2 of the training, worth its compile
    costs = FakeCosts(step=lambda k: {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0}[k], compile_=lambda k: 1.0, seq=1.0)
    choice, _ = costs.choose(16, 10**6, fraction=1.0)
    assert choice.k == 16 and choice.runner == "population"
    # a short training cannot repay a large compile even with the whole budget: K=2 saves at most
    # 16 trials x 10 steps x (1 - 1/2) s = 80 s, less than its predicted 100 s compile
    costs = FakeCosts(step=lambda k: 1.0, compile_=lambda k: 100.0, seq=1.0)
    choice, _ = costs.choose(16, 10, fraction=10.0)
    assert set(costs.measured) == {1} and "could save at most 80 s" in choice.reason


@pytest.mark.parametrize("seed", range(4))
def test_when_vmap_does_not_pay_measuring_loses_at_most_the_budget_and_one_misprediction(seed):
    """Random fake programs, every one slower per trial step than the sequential step, compiles growing
    with K (so each is predicted below its cost): the time spent measuring stays within the budget plus
    the largest amount by which one measurement's cost exceeded its prediction."""
    rng = np.random.default_rng(seed)
    compiled_two = mispredicted = 0
    for _ in range(25):
        seq = rng.uniform(0.5, 2.0)
        slow = rng.uniform(1.0, 3.0, size=9)  # per-trial slowdown of K = 2**i against the sequential step
        growth = rng.uniform(1.0, 2.0)
        seq_compile = rng.uniform(0.0, 50.0)
        costs = FakeCosts(
            step=lambda k, slow=slow, seq=seq: seq * slow[int(np.log2(k))] * k,
            compile_=lambda k, g=growth, c=seq_compile: (c + 1.0) * g ** np.log2(k),
            seq=seq,
            seq_compile=seq_compile,
        )
        trials, steps = int(rng.integers(2, 256)), int(rng.integers(10, 5000))
        budget = costs.budget(trials, steps)
        overrun, measured = [0.0], []

        def measure(k, budget=budget, costs=costs, overrun=overrun, measured=measured):
            predicted, before = budget.predict(k, measured), costs.now
            out = costs.measure(k)
            if k not in [c.k for c in measured]:
                overrun[0] = max(overrun[0], costs.now - before - predicted)
                measured.append(Candidate(k=k, step_seconds=out[0], trial_steps_per_s=k / out[0], bytes=0))
            return out

        choice = choose_k(trials, measure, memory_limit=10**9, sequential=costs.sequential, budget=budget)
        assert choice.runner == "sequential"
        assert budget.spent() <= budget.limit() + overrun[0] + 1e-9
        compiled_two += len(measured) >= 2
        mispredicted += overrun[0] > 0
    assert compiled_two and mispredicted  # the scenarios do measure, and predict below the cost


# Costs as measured on one H200 (session 18, LeNet-300-100, digits, batch 64): the sequential step
# 0.78 ms, a chunk of 32 stepping in 0.133 ms, of 8 in 0.107 ms; population programs compiled in
# about 3 s each (inferred from the first population sweep of a process against a warm one).
H200 = dict(step=lambda k: {1: 0.8e-3, 2: 0.8e-3, 4: 0.9e-3, 8: 0.107e-3, 16: 0.12e-3, 32: 0.133e-3}[k],
            compile_=lambda k: 3.0, seq=0.78e-3, seq_compile=1.0)  # fmt: skip


def test_on_gpu_costs_the_ascending_search_trains_sequentially_and_largest_first_finds_the_gain():
    # the ascending search with the CPU budget: what session 18 saw on the H200 (no K taken)
    costs = FakeCosts(**H200)
    choice, _ = costs.choose(32, 1000)
    assert choice.runner == "sequential"
    # largest first, with the accelerator defaults: one program compiled, K=32 confirmed and taken
    accelerator = dict(fraction=0.5, largest_first=True, accept_margin=2.0)
    costs = FakeCosts(**H200)
    choice, budget = costs.choose(32, 1000, **accelerator)
    assert choice.k == 32 and choice.runner == "population" and list(costs.compiled) == [32]
    # the scanned program also saves the per-step dispatch that the sequential step pays from Python
    assert "largest first: K=32 measured" in choice.reason and "187.67x the sequential step" in choice.reason
    assert budget.spent() <= budget.limit()
    # 8 trials, a 3.2 s compile: it spends the budget (3.12 s); the confirmation rounds cost 3.5 ms
    # against the 6.1 s it promises, so they run and it is taken confirmed
    slow_compile = {**H200, "compile_": lambda k: 3.2}
    costs = FakeCosts(**slow_compile)
    choice, _ = costs.choose(8, 1000, **accelerator)
    assert choice.k == 8 and costs.measured == [8, 8, 8] and "at least 2x: taken" not in choice.reason
    # where a round costs too much the margin still decides an unconfirmed timing: 2.5x the sequential step
    # at a compile that leaves no budget, where a round (3.3 s) costs more than half of the 3.7 s it would save
    costs = FakeCosts(**{**slow_compile, "step": lambda k: 8 * 0.78e-3 / 2.5}, timed=1000, seq_timed=1000)
    choice, _ = costs.choose(8, 1000, **accelerator)
    assert choice.k == 8 and costs.measured == [8] and "at least 2x: taken" in choice.reason
    # ... and without the margin (the CPU's rule: one timing each does not decide), the two rounds
    # that confirm it cost 3.5 ms against the 6.1 s it promises: they run, and it is taken
    costs = FakeCosts(**slow_compile)
    choice, _ = costs.choose(8, 1000, fraction=0.5, largest_first=True)
    assert choice.k == 8 and choice.runner == "population" and costs.measured == [8, 8, 8]
    assert "unconfirmed" not in choice.reason
    # a compile that overran the budget and a timing that promises nothing: no round, the sequential path
    costs = FakeCosts(**{**slow_compile, "step": lambda k: 8 * 0.78e-3})
    choice, _ = costs.choose(8, 1000, fraction=0.5, largest_first=True)
    assert choice.runner == "sequential" and costs.measured == [8]


def test_largest_first_skips_what_does_not_fit_and_falls_back_when_vmap_does_not_pay():
    timed = []

    def measure(k):  # 100 bytes per trial; a chunk of k steps in 1.5 k sequential steps (no gain)
        if 100 * k > 1000:
            return float("inf"), 100 * k  # over the limit: reported, never run
        timed.append(k)
        return 1.5 * k, 100 * k

    choice = choose_k(32, measure, memory_limit=1000, sequential=lambda: 1.0, largest_first=True, accept_margin=2.0)
    assert timed[0] == 8 and set(timed) == {8}  # 32 and 16 do not fit; 8 timed, then its confirmation rounds
    assert "K=32 needs 3,200 bytes" in choice.reason and "K=16 needs 1,600 bytes" in choice.reason
    assert choice.runner == "sequential" and choice.k == 1  # 8 trials in 12 s: slower than 8 sequential steps
    with pytest.raises(MemoryError, match="one trial"):
        choose_k(2, lambda k: (1.0, 10**6), memory_limit=10, sequential=lambda: 1.0, largest_first=True)


def test_the_executor_searches_largest_first_on_accelerators(config_file, tmp_path):
    class Gpu:  # what the executor reads of a device before it trains
        platform, device_kind = "gpu", "fake GPU"

    gpu = pop_executor.PopulationExecutor(devices=[Gpu()])
    assert gpu.largest_first and gpu.measure_budget == pop_executor.ACCELERATOR_MEASURE_BUDGET
    cpu = pop_executor.PopulationExecutor()
    assert cpu.largest_first is None and cpu.measure_budget == pop_executor.CPU_MEASURE_BUDGET
    # on a CPU decided per population: largest first where the step has convolutions (single-step
    # blocks, vmap's gain grows with K), ascending for the others; asked for, as asked
    conv, mlp = SimpleNamespace(unlooped=True), SimpleNamespace(unlooped=False)
    assert cpu._largest_first(conv) and not cpu._largest_first(mlp)
    assert gpu._largest_first(mlp) and gpu._largest_first(conv)
    assert not pop_executor.PopulationExecutor(largest_first=False)._largest_first(conv)
    assert pop_executor.PopulationExecutor(largest_first=True)._largest_first(mlp)
    assert pop_executor.PopulationExecutor(measure_budget=None, largest_first=False).measure_budget is None
    with pytest.raises(ValueError, match="measure_budget=-1"):
        pop_executor.PopulationExecutor(measure_budget=-1)
    # on this CPU, asked for: only the largest K (4) is compiled and timed, and its trials train as one chunk
    base = C.load_config(config_file)
    grid = {"stages.train.learning_rate": [1e-3, 2e-3, 3e-3, 4e-3]}
    executor = make_executor("population", timer=favour(4), largest_first=True)
    report = sweep_lib.sweep(base, grid, str(tmp_path / "pop"), progress=False, executor=executor)
    (population,) = report.executor["populations"]
    assert population["k"] == 4 and [c["k"] for c in population["choice"]["candidates"]] == [4]
    assert "largest first" in population["choice"]["reason"] and not report.failed


def test_population_falls_back_to_the_sequential_executor_when_its_step_is_faster(config_file, tmp_path):
    """Fake timer: every population program is slower than the sequential step; the trials then
    run as the sequential executor runs them, with its results, and the report says why."""
    base = C.load_config(config_file)
    grid = {"stages.train.learning_rate": [1e-3, 2e-3]}
    timed = []

    def timer(k, fn):
        timed.append(k)
        return 0.5 if k == SEQUENTIAL_K else 1.0 * k

    pop = sweep_lib.sweep(
        base, grid, str(tmp_path / "pop"), progress=False, executor=make_executor("population", timer=timer, max_k=1)
    )
    (population,) = pop.executor["populations"]
    assert population["k"] == 1 and population["choice"]["runner"] == "sequential"
    assert population["choice"]["sequential_step_seconds"] == pytest.approx(0.5 / 6)  # a block of 6 steps
    assert population["choice"]["measuring_seconds"] > 0  # what choosing took, in the report
    assert SEQUENTIAL_K in timed and "sequential executor" in population["why"]
    assert all("as the sequential executor trains" in p.note for p in pop.points)
    seq = sweep_lib.sweep(base, grid, str(tmp_path / "seq"), progress=False)
    for a, b in zip(seq.points, pop.points, strict=True):
        assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]
        assert _close(_params(a.run_dir), _params(b.run_dir), atol=0)
        assert "population_k" not in b.metrics  # trained by the train stage itself


def test_killed_population_sweep_resumes_without_losing_finished_chunks(config_file, tmp_path, monkeypatch):
    base = C.load_config(config_file)
    grid = {"stages.train.learning_rate": [1e-3, 2e-3, 3e-3]}
    real = PopulationTrainer.train
    calls = []

    def dies_on_second_chunk(self, indices, k=None, **kw):
        calls.append(list(indices))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while the second chunk trains
        return real(self, indices, k, **kw)

    monkeypatch.setattr(PopulationTrainer, "train", dies_on_second_chunk)
    executor = make_executor("population", chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        sweep_lib.sweep(base, grid, str(tmp_path), progress=False, executor=executor)
    saved = json.load(open(tmp_path / "sweep.json"))
    assert [p["status"] for p in saved["points"]] == ["done", "done", "pending"]
    report = sweep_lib.sweep(base, grid, str(tmp_path), progress=False, executor=make_executor("population"))
    assert [p.status for p in report.points] == ["done"] * 3
    assert [p.reused for p in report.points] == [True, True, False]
    assert len(calls) == 2  # the finished chunk was not trained again; the unfinished trial ran alone
    assert report.points[2].note == "one after another: a single trial"


def _cond_depth(jaxpr) -> int:
    """How deep ``cond`` equations nest in a jaxpr."""
    from jax.extend.core import jaxprs_in_params

    depth = 0
    for eqn in jaxpr.eqns:
        inner = max((_cond_depth(sub) for sub in jaxprs_in_params(eqn.params)), default=0)
        depth = max(depth, inner + (eqn.primitive.name == "cond"))
    return depth


def test_time_call_stops_timing_when_the_budget_cannot_pay_another_call():
    """With a budget that affords nothing, the warm-up and one timed call are made and that call is
    the figure (a first call can take many times the steady step); with room for one more call,
    the faster of two; without a budget, the fastest of the repeats."""
    from research.population.trainer import time_call

    durations = iter([5.0, 2.0, 1.5, 3.0])  # warm-up, then the timed calls
    now = [0.0]
    calls = []

    def clock():
        return now[0]

    def fn():
        calls.append(1)
        now[0] += next(durations)

    asked = []

    def never(seconds):
        asked.append(seconds)
        return False

    assert time_call(8, fn, repeats=3, afford=never, clock=clock) == 2.0
    assert len(calls) == 2 and asked == [2.0]  # asked with the last call's seconds
    durations, calls[:] = iter([5.0, 2.0, 1.5, 3.0]), []
    budget = iter([True, False])
    assert time_call(8, fn, repeats=3, afford=lambda s: next(budget), clock=clock) == 1.5
    assert len(calls) == 3
    durations, calls[:] = iter([5.0, 2.0, 1.5, 3.0]), []
    assert time_call(8, fn, repeats=3, clock=clock) == 1.5
    assert len(calls) == 4


def test_lockstep_counters_keep_a_mask_update_a_branch_and_give_the_same_step():
    """A population's step counters go to the step unbatched: the pruning wrapper's update every
    `frequency` steps stays a `cond` (a batched counter makes it a select that recomputes every
    trial's masks at every step), with the same new state as vmapping over everything."""
    import jax.numpy as jnp
    import optax

    from methods.pruning import masked
    from methods.pruning import polynomial_schedule
    from research.population.trainer import _vmap_lockstep

    tx = masked(optax.adam(1e-2), polynomial_schedule(0.5, end_step=8, frequency=4))

    def step(state, batch):
        grads = jax.tree.map(lambda p: p * batch, state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}, {}

    rng = np.random.default_rng(0)
    stacked = []
    for _ in range(3):
        params = {"kernel": jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32))}
        stacked.append({"params": params, "opt": tx.init(params), "step": jnp.int32(0)})
    state = jax.tree.map(lambda *a: jnp.stack(a), *stacked)
    batch = jnp.float32(0.5)
    lockstep = _vmap_lockstep(step, (None,))
    # the update's cond around the mask selection's platform switch, against the switch alone (the
    # selection evaluated at every step, its result selected)
    assert _cond_depth(jax.make_jaxpr(lockstep)(state, batch).jaxpr) == 2
    assert _cond_depth(jax.make_jaxpr(jax.vmap(step, in_axes=(0, None)))(state, batch).jaxpr) == 1
    a = b = state
    for _ in range(6):  # through two mask updates (steps 0 and 4)
        a, _ = jax.jit(lockstep)(a, batch)
        b, _ = jax.jit(jax.vmap(step, in_axes=(0, None)))(b, batch)
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert int(a["opt"].count[0]) == 6 and a["opt"].count.shape == (3,)


def test_a_counter_that_differs_between_trials_is_vmapped_with_the_state():
    import jax.numpy as jnp

    from research.population.trainer import _vmap_lockstep

    def step(state, x):  # a "count" that advances by each trial's own data
        return {"count": state["count"] + (x > 0).astype(jnp.int32), "x": state["x"] + x}, {}

    state = {"count": jnp.zeros(3, jnp.int32), "x": jnp.zeros(3)}
    xs = jnp.array([1.0, -1.0, 2.0])
    new, _ = _vmap_lockstep(step, (0,))(state, xs)
    np.testing.assert_array_equal(np.asarray(new["count"]), [1, 0, 1])
    np.testing.assert_array_equal(np.asarray(new["x"]), [1.0, -1.0, 2.0])


def test_block_length_ends_blocks_on_checkpoint_steps():
    assert _block_length(50, 300, [100, 0]) == 50  # 100 is a multiple of 50
    assert _block_length(50, 300, [30]) == 30  # the largest divisor of 30 up to 50
    assert _block_length(4, 6, [5]) == 4  # 5's divisors below 4 waste too much: blocks are cut at 5
    assert _block_length(50, 20, [100]) == 20  # no checkpoint before the last step


def test_killed_population_chunk_resumes_from_checkpoints_like_a_sequential_run(config_file, tmp_path, monkeypatch):
    """checkpoint_every=2 of 6 steps: the population saves steps 2 and 4 (a chunk killed after
    step 4 keeps them, as a killed sequential run would), resumes its chunk from step 4, and ends
    with a sequential run's checkpoints, metrics (a validation row at step 3 too) and parameters."""
    base = C.load_config(config_file)
    base = dataclasses.replace(base, stages=(dataclasses.replace(base.stages[0], checkpoint_every=2, eval_every=3),))
    grid = {"stages.train.learning_rate": [1e-3, 2e-3]}
    seq = sweep_lib.sweep(base, grid, str(tmp_path / "seq"), progress=False)
    saved, real_save = [], pop_executor.save_progress

    def killed_after_step_4(workdir, step, state, metrics, start=0, val_rows=()):
        real_save(workdir, step, state, metrics, start, val_rows)
        saved.append(step)
        if saved.count(4) == 2:
            raise KeyboardInterrupt  # the process dies before step 6

    monkeypatch.setattr(pop_executor, "save_progress", killed_after_step_4)
    pop_dir = str(tmp_path / "pop")
    with pytest.raises(KeyboardInterrupt):
        sweep_lib.sweep(
            base, grid, pop_dir, progress=False, executor=make_executor("population", chunk_size=2, block_steps=4)
        )
    stage_dirs = [os.path.join(pop_dir, "runs", os.path.basename(p.run_dir), "stages", "0_train") for p in seq.points]
    assert saved == [2, 2, 4, 4] and all(_steps(d) == [2, 4] for d in stage_dirs)
    monkeypatch.setattr(pop_executor, "save_progress", real_save)
    starts, real_train = [], PopulationTrainer.train

    def spy(self, indices, k=None, **kw):
        starts.append(kw.get("start", 0))
        return real_train(self, indices, k, **kw)

    monkeypatch.setattr(PopulationTrainer, "train", spy)
    pop = sweep_lib.sweep(
        base, grid, pop_dir, progress=False, executor=make_executor("population", chunk_size=2, block_steps=4)
    )
    assert starts == [4] and [p.status for p in pop.points] == ["done", "done"]
    for a, b, d in zip(seq.points, pop.points, stage_dirs, strict=True):
        seq_stage = os.path.join(a.run_dir, "stages", "0_train")
        assert _steps(d) == _steps(seq_stage) == [4, 6]
        assert _close(_params(a.run_dir), _params(b.run_dir))
        rows = [[r["step"], r["loss"]] for r in read_metrics(d) if r["split"] == "train"]
        seq_rows = [[r["step"], r["loss"]] for r in read_metrics(seq_stage) if r["split"] == "train"]
        assert [r[0] for r in rows] == list(range(1, 7)) and _close(rows, seq_rows)
        val, seq_val = (
            [[r["step"], r["loss"], r["accuracy"]] for r in read_metrics(x) if r["split"] == "val"]
            for x in (d, seq_stage)
        )
        assert [r[0] for r in val] == [3, 6] and _close(val, seq_val)


def test_cli_sweep_executor_flag(config_file, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    rc = cli.main(
        ["sweep", config_file, "--grid", "seed=5", "--executor", "population", "--workdir", workdir, "--no-progress"]
    )
    assert rc == 0
    saved = json.load(open(os.path.join(workdir, "sweep.json")))
    assert saved["executor"]["executor"] == "population"
    assert saved["executor"]["populations"][0]["why"] == "a single trial"
    with pytest.raises(SystemExit):
        cli.main(["sweep", config_file, "--grid", "seed=5", "--executor", "threads"])
    assert "invalid choice: 'threads'" in capsys.readouterr().err


def test_cli_population_chunk_and_measure_budget(config_file, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    args = ["sweep", config_file, "--grid", "seed=5,6", "--executor", "population", "--no-progress"]
    assert cli.main([*args, "--population-chunk", "2", "--workdir", workdir]) == 0
    (population,) = json.load(open(os.path.join(workdir, "sweep.json")))["executor"]["populations"]
    assert population["k"] == 2 and population["choice"]["reason"] == "chunk_size=2 given"

    def executor(*flags, command="sweep"):
        parser = argparse.ArgumentParser()
        cli._add_executor_flag(parser)  # pylint: disable=protected-access
        parsed = parser.parse_args(["--executor", "population", *flags])
        parsed.command = command
        return cli._executor(parsed)  # pylint: disable=protected-access

    assert executor() == "population"
    assert executor("--measure-budget", "none").measure_budget is None
    assert executor("--measure-budget", "0.5").measure_budget == 0.5
    assert executor("--population-chunk", "4").chunk_size == 4
    assert executor("--overlap").overlap and not executor("--measure-budget", "0.5").overlap
    assert executor("--overlap", "--measure-budget", "0.2").measure_budget == 0.2
    with pytest.raises(C.ConfigError, match="--overlap compiles the program of a measured K"):
        executor("--population-chunk", "4", "--overlap")
    with pytest.raises(C.ConfigError, match="--overlap applies to sweep"):
        executor("--overlap", command="tune")
    with pytest.raises(C.ConfigError, match="not both"):
        executor("--population-chunk", "4", "--measure-budget", "none")
    with pytest.raises(SystemExit):
        executor("--measure-budget", "-1")
    assert "'-1' is not a fraction >= 0" in capsys.readouterr().err
    rc = cli.main(["sweep", config_file, "--grid", "seed=5", "--measure-budget", "0.5", "--workdir", workdir + "2"])
    assert rc == 2 and "--measure-budget applies only to --executor population" in capsys.readouterr().err
    rc = cli.main(["sweep", config_file, "--grid", "seed=5", "--population-chunk", "2", "--workdir", workdir + "2"])
    assert rc == 2 and "--population-chunk applies only to --executor population or ray" in capsys.readouterr().err
    rc = cli.main(["sweep", config_file, "--grid", "seed=5", "--overlap", "--workdir", workdir + "2"])
    assert rc == 2 and "--overlap applies only to --executor population" in capsys.readouterr().err


def test_nonfinite_trial_fails_alone(config_file, tmp_path):
    base = C.load_config(config_file)
    grid = {"stages.train.learning_rate": [1e-3, 1e30]}
    report = sweep_lib.sweep(
        base, grid, str(tmp_path), progress=False, executor=make_executor("population", chunk_size=2)
    )
    assert report.points[0].status == "done"
    assert report.points[1].status == "failed" and "NonFiniteLossError" in report.points[1].error


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from research import config as C
    from research.config import register_all_stages
    register_all_stages()
    from research.stages import TrainStage
    from research.population.trainer import PopulationTrainer
    from research.train import split_model
    assert jax.device_count() == 4, jax.devices()
    base = C.Config(model=C.ModelConfig(name="mlp", options={"widths": (16,)}), data=C.DataConfig(name="digits", limit=200),
                    stages=(TrainStage(steps=3, batch_size=16, checkpoint_every=0, eval_every=0),))
    configs = [C.apply_overrides(base, [f"stages.0.learning_rate={lr}", f"seed={s}"])
               for lr, s in ((1e-3, 0), (3e-3, 1), (1e-2, 0), (3e-2, 1))]
    one = PopulationTrainer(configs, block_steps=2, devices=jax.devices()[:1]).train(range(4))
    sharded = PopulationTrainer(configs, block_steps=2, devices=jax.devices())
    two = sharded.train(range(4))
    for a, b in zip(one, two):
        for x, y in zip(jax.tree.leaves(split_model(a.model)[1]), jax.tree.leaves(split_model(b.model)[1])):
            np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
    # a single run, data-parallel over the 4 devices == on one device
    import pathlib, tempfile
    from research.train.data_parallel import data_parallel_step
    from research.run import build_bundle
    from research.stages import StageContext, finetune, train_kwargs
    bundle = build_bundle(configs[1])
    runs = []
    for dp in (False, True):
        ctx = StageContext(index=0, label="0_train", workdir=pathlib.Path(tempfile.mkdtemp()), seed=1, progress=False)
        model, _ = finetune(bundle.model, bundle.dataset, ctx, **{**train_kwargs(configs[1].stages[0]), "data_parallel": dp})
        runs.append(jax.tree.leaves(split_model(model)[1]))
    for x, y in zip(*runs):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)
    _, placed = data_parallel_step(lambda s, b: (s, b["x"]), 16)({"w": np.ones(2)}, {"x": np.ones((16, 3))})
    assert len(placed.sharding.device_set) == 4 and placed.addressable_shards[0].data.shape == (4, 3)
    leaf = jax.tree.leaves(sharded.initial_state(list(range(4))))[1]
    assert len(leaf.sharding.device_set) == 4 and leaf.addressable_shards[0].data.shape[0] == 1, leaf.sharding
    print("SHARDED-OK")
    """
)


def test_data_parallel_batch_size_must_split_over_the_devices():
    from research.train.data_parallel import data_parallel_step

    with pytest.raises(
        ValueError, match="batch_size=6 does not split over 4 devices; use a multiple of 4 \\(e.g. 8\\)"
    ):
        data_parallel_step(lambda s, b: (s, b), 6, devices=jax.devices() * 4)


def test_sharded_population_and_data_parallel_run_equal_one_device_on_four_host_devices(xla_flags_for):
    env = {**os.environ, "XLA_FLAGS": xla_flags_for(4), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED-OK" in out.stdout


def test_tune_asks_batches_of_the_chunk_size_and_trains_them_as_a_population(config_file, tmp_path):
    from research import tune as tune_lib
    from research.automl import Float
    from research.automl import Space

    base = C.load_config(config_file)
    space = Space({"stages.train.learning_rate": Float(1e-3, 1e-2, log=True)})
    executor = make_executor("population", timer=favour(2))
    result = tune_lib.tune(
        base, space, str(tmp_path), trials=3, sampler="random", executor=executor, echo=False, plot_every=0
    )
    assert [t["state"] for t in result.trials] == ["COMPLETE"] * 3
    notes = [json.load(open(tmp_path / "trials" / f"{n:04d}" / "trial.json"))["executor"] for n in range(3)]
    # the last trial, alone in its batch, trains as its program's measured choice says (the population's)
    assert notes == ["population 0, chunk of 2"] * 2 + ["population 0, one at a time (K=1)"]
    assert result.summary["executor"]["populations"][0]["k"] == 2
    with pytest.raises(C.ConfigError, match="the population is the parallelism"):
        tune_lib.tune(
            base, space, str(tmp_path / "w"), trials=2, executor="population", workers=2, config_spec=config_file
        )


def test_vmapped_evaluation_equals_one_model_at_a_time():
    from flax import nnx

    from research.data import load_dataset
    from research.nn import build_model
    from research.population.measure import evaluate_many
    from research.train import evaluate

    ds = load_dataset("digits", seed=0, limit=300)
    models = [
        build_model("mlp", input_shape=ds.input_shape, num_classes=ds.num_classes, widths=(16,), rngs=nnx.Rngs(s))
        for s in (0, 1, 2)
    ]
    # batches of 128 with a padded last one; 3 models padded to 4
    together = evaluate_many(models, ds.x_train, ds.y_train, batch_size=128, pad_to=4)
    for model, row in zip(models, together, strict=True):
        alone = evaluate(*split_model(nnx.clone(model)), ds.x_train, ds.y_train, batch_size=128)
        assert row["count"] == alone["count"] and row["accuracy"] == alone["accuracy"]
        assert row["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert len({r["accuracy"] for r in together}) > 1  # three different models


def test_later_fine_tunings_share_a_program_only_when_they_compile_to_one(tmp_path):
    from flax import nnx

    from research.data import load_dataset
    from research.nn import build_model
    from research.population.later import request_key
    from research.stages import FineTuneRequest

    ds = load_dataset("digits", seed=0, limit=300)
    model = build_model("mlp", input_shape=ds.input_shape, num_classes=ds.num_classes, widths=(16,), rngs=nnx.Rngs(0))
    base = {"workdir": tmp_path / "a", "seed": 0, "steps": 10, "learning_rate": 1e-3, "batch_size": 32}
    base.update(optimizer="adamw", weight_decay=0.1, eval_every=0, step_key=("wrapper", 0.9))

    def key(**kw):
        return request_key(FineTuneRequest(stage=1, model=model, dataset=ds, kwargs={**base, **kw}, wrap_tx=None))

    # values in the optimizer state may differ
    assert key() == key(learning_rate=1e-2, weight_decay=0.5, workdir=tmp_path / "b")
    # constants of the program may not
    assert key() != key(steps=20) and key() != key(step_key=("wrapper", 0.8)) and key() != key(batch_size=16)
    assert key(optimizer="sgd", weight_decay=0.1) != key(optimizer="sgd", weight_decay=0.5)
    # trains alone: validation rows during training, data parallel, a checkpoint to resume from
    assert key(eval_every=5) is None and key(data_parallel=True) is None
    (tmp_path / "c" / "checkpoints" / "4").mkdir(parents=True)
    assert key(workdir=tmp_path / "c") is None


def test_later_fine_tunings_in_a_population_checkpoint_as_finetune_does(tmp_path):
    """A later stage's fine-tuning trained as a population with checkpoint_every=4 of 10 steps keeps
    the checkpoints and parameters that research.train.finetune leaves for the same request."""
    from flax import nnx

    from research.data import load_dataset
    from research.nn import build_model
    from research.population.later import request_key
    from research.population.later import train_requests
    from research.population.later import write_trial
    from research.stages import FineTuneRequest
    from research.train import finetune

    ds = load_dataset("digits", seed=0, limit=300)
    model = build_model("mlp", input_shape=ds.input_shape, num_classes=ds.num_classes, widths=(16,), rngs=nnx.Rngs(0))
    kw = {"seed": 0, "steps": 10, "learning_rate": 1e-2, "batch_size": 32, "optimizer": "adam"}
    kw.update(eval_every=0, log_every=5, checkpoint_every=4, step_key=None, progress=False)
    requests = [
        FineTuneRequest(stage=1, model=model, dataset=ds, kwargs={**kw, "workdir": tmp_path / n}, wrap_tx=None)
        for n in ("a", "b")
    ]
    results = train_requests(
        requests, request_key(requests[0]), 2, block_steps=3, devices=jax.devices()[:1], cache={}
    ).results
    assert [_steps(tmp_path / n) for n in ("a", "b")] == [[4, 8], [4, 8]]  # before the last step's
    write_trial(tmp_path / "a", results[0], None)
    alone, _ = finetune(model, ds, **{**kw, "workdir": tmp_path / "alone"})
    assert _steps(tmp_path / "a") == _steps(tmp_path / "alone") == [8, 10]
    assert _close(jax.tree.leaves(split_model(results[0].model)[1]), jax.tree.leaves(split_model(alone)[1]))
    rows = [r["loss"] for r in read_metrics(tmp_path / "a")]
    assert _close(rows, [r["loss"] for r in read_metrics(tmp_path / "alone") if r["split"] == "train"])


def test_the_sequential_probe_times_the_step_as_fit_calls_it(config_file, monkeypatch):
    """On a CPU one call per step; where finetune scans blocks (a GPU/TPU), the probe scans too."""
    from research.train import loop

    base = C.load_config(config_file)
    configs = [C.apply_overrides(base, [f"stages.train.learning_rate={lr}"]) for lr in (1e-3, 2e-3)]
    calls = []
    real = loop.scanned
    monkeypatch.setattr(loop, "scanned", lambda fn: (calls.append(fn), real(fn))[1])
    timer = lambda k, fn: (fn(), 1.0)[1]  # noqa: E731 (runs the call once, a fake second)
    trainer = PopulationTrainer(configs, block_steps=4)
    assert not trainer.unlooped and trainer.block_steps == 4  # an MLP has no convolution: its blocks loop
    assert trainer.sequential_step_seconds(timer) == pytest.approx(1 / 4)
    assert calls == []  # this CPU: one call per step
    monkeypatch.setattr(loop, "default_block_steps", lambda: 50)
    PopulationTrainer(configs, block_steps=4).sequential_step_seconds(timer)
    assert len(calls) == 1  # one scanned call of the 4 steps
