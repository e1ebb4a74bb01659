"""The wider benchmark suite's test functions reach their stated minima where the literature puts them."""

import numpy as np
import pytest

from experiments.benchmarks.automl_suite import problems

PROBLEMS = problems(bbob_dim=5)

# Where each fixed problem's global minimum lies (one of them when there are several).
ARGMIN = {
    "six_hump_camel": {"x0": 0.0898, "x1": -0.7126},
    "goldstein_price": {"x0": 0.0, "x1": -1.0},
    "branin": {"x1": np.pi, "x2": 2.275},
    "hartmann3": {"x0": 0.114614, "x1": 0.555649, "x2": 0.852547},
    "hartmann6": {f"x{i}": v for i, v in enumerate([0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573])},
    "levy_4d": {f"x{i}": 1.0 for i in range(4)},
    "ackley_5d": {f"x{i}": 0.0 for i in range(5)},
    "styblinski_tang_4d": {f"x{i}": -2.903534 for i in range(4)},
}


@pytest.mark.parametrize("name", sorted(ARGMIN))
def test_classic_functions_reach_their_minimum_at_the_known_point(name):
    space, f, fmin = PROBLEMS[name](0)
    space.validate(ARGMIN[name])
    assert f(ARGMIN[name]) == pytest.approx(fmin, abs=1e-4)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_no_point_of_the_space_beats_the_stated_minimum(name):
    for seed in (0, 1):
        space, f, fmin = PROBLEMS[name](seed)
        for params in space.sample(np.random.default_rng(seed), 300):
            assert f(params) >= fmin - 1e-9


@pytest.mark.parametrize("name", [n for n in sorted(PROBLEMS) if n.endswith("_5d") and n not in ARGMIN])
def test_bbob_instances_put_the_optimum_at_a_seeded_shift(name):
    values = []
    for seed in (0, 1):
        space, f, fmin = PROBLEMS[name](seed)
        shift = np.random.default_rng([17, seed]).uniform(-4.0, 4.0, 5)
        at = {f"x{i}": float(v) for i, v in enumerate(shift)}
        assert f(at) == pytest.approx(fmin, abs=1e-9)
        values.append(f({f"x{i}": 0.0 for i in range(5)}))
    assert values[0] != values[1]  # two instances, two landscapes


def test_integer_heavy_minimum_is_at_its_seeded_integers():
    space, f, fmin = PROBLEMS["integer_heavy"](3)
    target = np.random.default_rng([23, 3]).integers(-8, 9, 5)
    best = {**{f"k{i}": int(t) for i, t in enumerate(target)}, "x": 0.3}
    space.validate(best)
    assert f(best) == pytest.approx(fmin)


def test_sampler_options_parse_and_reject_bad_json():
    from experiments.benchmarks.automl_suite import sampler_options

    assert sampler_options("gp") == ("gp", {})
    assert sampler_options('gp{"output_warping": "auto"}') == ("gp", {"output_warping": "auto"})
    with pytest.raises(SystemExit, match="must be a JSON object"):
        sampler_options("gp{output_warping: auto}")
