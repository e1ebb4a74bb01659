import numpy as np
import pytest

from research import data


@pytest.mark.parametrize(
    "name,shape", [("digits", (8, 8, 1)), ("mnist5k", (28, 28, 1)), ("mnist1d", (40,)), ("synthetic", (8, 8, 1))]
)
def test_shipped_datasets_load_without_network(name, shape):
    ds = data.load_dataset(name, seed=0)
    assert ds.input_shape == shape and ds.num_classes == 10
    sizes = ds.sizes()
    assert min(sizes.values()) > 0
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    if name != "synthetic":
        assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 + 1e-6 or name == "mnist1d"


def test_official_sizes():
    assert sum(data.load_dataset("mnist5k").sizes().values()) == 5000
    assert data.load_dataset("mnist1d").sizes()["test"] == 1000  # the package's official test split
    assert sum(data.load_dataset("digits").sizes().values()) == 1797


def test_mnist1d_is_generated_once_per_process_and_size():
    from research.data import datasets

    first = data.load_dataset("mnist1d", seed=0)
    again = data.load_dataset("mnist1d", seed=1)  # another validation split of the same arrays
    assert datasets._mnist1d_arrays.cache_info().hits >= 1
    arrays = datasets._mnist1d_arrays(5000)
    assert all(not a.flags.writeable for a in arrays)  # shared: nobody may change them in place
    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert sorted(map(len, (first.x_train, first.x_val))) == sorted(map(len, (again.x_train, again.x_val)))
    small = data.load_dataset("mnist1d", seed=0, num_samples=500)
    assert sum(small.sizes().values()) < sum(first.sizes().values())


def test_digits_read_from_the_shipped_file_equal_scikit_learns_loader(monkeypatch):
    from sklearn.datasets import load_digits

    from research.data import datasets

    d = load_digits()
    x, y = datasets._digits_arrays()
    np.testing.assert_array_equal(x.reshape(len(x), -1) * 16.0, d.data)
    np.testing.assert_array_equal(y, d.target)
    # Where the file is not found, scikit-learn's loader gives the same arrays.
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    datasets._digits_arrays.cache_clear()
    try:
        x2, y2 = datasets._digits_arrays()
    finally:
        datasets._digits_arrays.cache_clear()
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_splits_are_deterministic_by_seed_and_disjoint():
    a, b, c = (data.load_dataset("digits", seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}  # noqa: E731
    assert not rows(a.x_test) & rows(a.x_val)


def test_bad_dataset_arguments():
    with pytest.raises(KeyError, match=r"unknown dataset 'imagenet'; registered: \['digits'"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_dataset("digits", val_fraction=1.5)


def test_batch_sampler_is_a_pure_function_of_step():
    x = np.arange(100).reshape(100, 1).astype(np.float32)
    y = np.arange(100).astype(np.int32)
    s1 = data.BatchSampler(x, y, batch_size=32, seed=3)
    s2 = data.BatchSampler(x, y, batch_size=32, seed=3)
    seq = [s1.batch(i)["y"] for i in range(7)]
    np.testing.assert_array_equal(s2.batch(5)["y"], seq[5])  # random access equals sequential
    epoch0 = np.concatenate(seq[:3])
    assert len(set(epoch0.tolist())) == 96  # no repeats inside an epoch
    assert not np.array_equal(seq[0], seq[3])  # reshuffled next epoch
    assert [b["y"].shape for b in s1.iterate(0, 2)] == [(32,), (32,)]
    with pytest.raises(ValueError, match="larger than"):
        data.BatchSampler(x, y, batch_size=1000)


def test_eval_batches_pad_and_mask():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    bs = list(data.eval_batches(x, y, 4))
    assert [b["x"].shape for b in bs] == [(4, 1)] * 3
    assert bs[-1]["mask"].tolist() == [True, True, False, False]
    assert sum(b["mask"].sum() for b in bs) == 10


def test_calibration_subset():
    ds = data.load_dataset("digits")
    cal = data.calibration_subset(ds, 50, seed=1)
    assert cal.shape == (50, 8, 8, 1)
    np.testing.assert_array_equal(cal, data.calibration_subset(ds, 50, seed=1))
    with pytest.raises(ValueError):
        data.calibration_subset(ds, 0)


def test_tfds_adapter_gives_clear_error_without_package_or_data(tmp_path):
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
            data.from_tfds("mnist", data_dir=str(tmp_path))
    else:
        with pytest.raises(FileNotFoundError, match="not prepared"):
            data.from_tfds("mnist", data_dir=str(tmp_path))


def test_grain_adapter_reads_random_access_sources():
    class Source:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"image": np.full((4, 4), i % 255, np.uint8), "label": i % 3}

    try:
        import grain  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install grain"):
            data.from_grain(Source(20), Source(5))
    else:
        ds = data.from_grain(Source(20), Source(5), val_fraction=0.2)
        assert ds.input_shape == (4, 4, 1) and ds.sizes() == {"train": 16, "val": 4, "test": 5}
