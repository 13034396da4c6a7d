"""Builders: counts per (label, bias), determinism, colour, corruptions, faces, folder import, errors."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import MNIST_DIR
from dfa_fast.data import beton, cifar10c, cmnist, corruptions, faces, folder
from dfa_fast.data.sources import load_mnist
from dfa_fast.data.splits import count_matrix, rng_for
from dfa_fast.errors import DfaError
from test_sources import _cifar_subset, write_cifar_batches


def read_split(path):
    """Return (images NHWC, labels, biases, index) of a `.beton` in file order."""
    from dfa_fast.data.loaders import make_eval_loader
    parts = list(zip(*[(b.image, b.label, b.bias, b.index)
                       for b in make_eval_loader(path, 2000, num_workers=1)]))
    return [np.concatenate([t.numpy() for t in part]) for part in parts]


def assert_ratio(counts, ratio):
    counts = np.asarray(counts)
    for y, row in enumerate(counts):
        conflicting = row.sum() - row[y]
        assert abs(conflicting - ratio * row.sum()) <= 1, (y, conflicting, row.sum())


@pytest.mark.parametrize("tag, ratio", [("1pct", 0.01), ("5pct", 0.05)])
def test_cmnist_counts_match_ratio_and_test_is_uniform(cmnist_full, tag, ratio):
    train = beton.load_sidecar(cmnist_full / tag / "train.beton")
    assert train["num_samples"] == 55000
    assert_ratio(train["counts"], ratio)
    test = np.asarray(beton.load_sidecar(cmnist_full / tag / "test.beton")["counts"])
    assert test.sum() == 10000
    assert (test.max(1) - test.min(1) <= 1).all()  # bias uniform within every class
    valid = np.asarray(beton.load_sidecar(cmnist_full / tag / "valid.beton")["counts"])
    assert valid.sum() == 5000 and (valid.max(1) - valid.min(1) <= 1).all()


def test_cmnist_counts_in_file_match_sidecar(cmnist_full):
    images, labels, biases, index = read_split(cmnist_full / "1pct" / "train.beton")
    side = beton.load_sidecar(cmnist_full / "1pct" / "train.beton")
    assert np.array_equal(count_matrix(labels, biases, 10, 10), np.asarray(side["counts"]))
    assert np.array_equal(index, np.arange(55000))
    assert images.shape == (55000, 28, 28, 3) and images.dtype == np.uint8


def test_cmnist_colour_only_on_the_foreground(cmnist_full):
    images, labels, biases, _ = read_split(cmnist_full / "1pct" / "test.beton")
    gray = load_mnist(MNIST_DIR).splits["test"].images
    assert np.array_equal(labels, load_mnist(MNIST_DIR).splits["test"].labels)
    background = gray == 0
    assert (images[background] == 0).all()
    # Bright foreground pixels carry the palette colour of the bias class (jitter std 0.005).
    for k in range(10):
        rows = np.flatnonzero(biases == k)[:50]
        bright = gray[rows] == 255
        colour = images[rows][bright].mean(0) / 255
        assert np.allclose(colour, cmnist.LFF_PALETTE[k], atol=0.01), (k, colour)


def test_cmnist_same_seed_identical_bytes_other_seed_differs(tmp_path, mnist_small):
    def build(name, seed):
        cmnist.build_cmnist(mnist_small, tmp_path / name, [0.05], seed=seed, valid_size=500,
                            progress=False)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name / "5pct").iterdir())}
    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert first.keys() == again.keys() == other.keys()
    assert all(first[k] == again[k] for k in first)
    assert first["train.beton"] != other["train.beton"]
    assert first["test.beton"] != other["test.beton"]


def test_cmnist_hue_palette_and_published_valid_ratio(tmp_path, mnist_small):
    cmnist.build_cmnist(mnist_small, tmp_path, [0.05], valid_size=1000, valid_bias="ratio",
                        palette="hue", jitter_std=0.0, progress=False)
    valid = beton.load_sidecar(tmp_path / "5pct" / "valid.beton")
    assert_ratio(valid["counts"], 0.05)
    images, _, biases, _ = read_split(tmp_path / "5pct" / "train.beton")
    red = images[biases == 0]  # hue 0 is pure red: only the red channel lights up
    assert (red[..., 1:] == 0).all() and red[..., 0].max() == 255


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_ratio_outside_unit_interval_is_refused(tmp_path, mnist_small, ratio):
    with pytest.raises(DfaError, match="outside"):
        from dfa_fast.data.splits import parse_ratios
        parse_ratios([ratio * 100])


def test_ratio_leaving_a_class_without_conflicts_is_refused(tmp_path, mnist_small):
    with pytest.raises(DfaError, match="without bias-conflicting samples"):
        cmnist.build_cmnist(mnist_small, tmp_path, [0.0005], progress=False)
    assert not any(tmp_path.iterdir())


def test_existing_output_is_refused_without_overwrite(tmp_path, mnist_small):
    cmnist.build_cmnist(mnist_small, tmp_path, [0.05], valid_size=500, progress=False)
    before = (tmp_path / "5pct" / "train.beton").read_bytes()
    with pytest.raises(DfaError, match="--overwrite"):
        cmnist.build_cmnist(mnist_small, tmp_path, [0.05], valid_size=500, seed=1,
                            progress=False)
    assert (tmp_path / "5pct" / "train.beton").read_bytes() == before
    cmnist.build_cmnist(mnist_small, tmp_path, [0.05], valid_size=500, seed=1, overwrite=True,
                        progress=False)
    assert (tmp_path / "5pct" / "train.beton").read_bytes() != before


def test_interrupted_build_leaves_no_beton_and_keeps_old_data(tmp_path, mnist_small, monkeypatch):
    cmnist.build_cmnist(mnist_small, tmp_path, [0.05], valid_size=500, progress=False)
    old = (tmp_path / "5pct" / "train.beton").read_bytes()
    real_write = beton.write_split
    calls = []

    def crash_on_second_split(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while writing "valid"
        return real_write(*args, **kwargs)
    monkeypatch.setattr(beton, "write_split", crash_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        cmnist.build_cmnist(mnist_small, tmp_path, [0.05], valid_size=500, seed=3,
                            overwrite=True, progress=False)
    assert calls == ["train", "valid"]
    betons = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.beton*"))
    assert betons == ["5pct/test.beton", "5pct/train.beton", "5pct/valid.beton"]
    assert (tmp_path / "5pct" / "train.beton").read_bytes() == old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sidecar_mismatch_is_refused(tmp_path, mnist_small):
    cmnist.build_cmnist(mnist_small, tmp_path, [0.05], valid_size=500, progress=False)
    train = tmp_path / "5pct" / "train.beton"
    side = json.loads((tmp_path / "5pct" / "train.json").read_text())
    side["beton_bytes"] += 1
    (tmp_path / "5pct" / "train.json").write_text(json.dumps(side))
    with pytest.raises(DfaError, match="does not match its sidecar"):
        beton.load_sidecar(train)
    (tmp_path / "5pct" / "train.json").unlink()
    with pytest.raises(DfaError, match="sidecar train.json is missing"):
        beton.load_sidecar(train)


# ------------------------------------------------------------------------- Corrupted CIFAR-10
@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory, data_root):
    """Real CIFAR-10 images (30 a class of train, 6 of test) in the official pickle layout."""
    root = tmp_path_factory.mktemp("cifar_small")
    write_cifar_batches(root / "cifar-10-batches-py", _cifar_subset(data_root, per_class=30))
    return root


PUBLISHED_TYPES = {
    "type0": ("snow", "frost", "fog", "brightness", "contrast", "spatter", "elastic", "jpeg",
              "pixelate", "saturate"),
    "type1": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
              "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "original"),
}


@pytest.mark.parametrize("kind", ["type0", "type1"])
def test_cifar10c_class_to_corruption_mapping(tmp_path, cifar_small, kind):
    assert corruptions.CORRUPTION_TYPES[kind] == PUBLISHED_TYPES[kind]
    cifar10c.build_cifar10c(cifar_small, tmp_path, [0.1], corruption_type=kind, valid_size=50,
                            seed=5, workers=2, progress=False)
    images, labels, biases, _ = read_split(tmp_path / "10pct" / "test.beton")
    clean = cifar10c.load_cifar10(cifar_small).splits["test"].images
    assert np.array_equal(labels, cifar10c.load_cifar10(cifar_small).splits["test"].labels)
    for row in range(len(images)):
        name = PUBLISHED_TYPES[kind][biases[row]]
        expected = corruptions.corrupt(clean[row], name, 5,
                                       rng_for(5, cifar10c._CORRUPT, cifar10c._SOURCE_TEST, row,
                                               biases[row]))
        assert np.array_equal(images[row], expected), (row, name)
    if kind == "type1":  # bias 9 is the uncorrupted image
        assert np.array_equal(images[biases == 9], clean[biases == 9])
    else:  # bias 4 is contrast (factor 0.15 around each channel's mean at level 5)
        spread = lambda x: x.reshape(len(x), -1, 3).std(1)  # noqa: E731
        ratio = spread(images[biases == 4]) / spread(clean[biases == 4])
        assert np.allclose(ratio, 0.15, atol=0.03)
    side = beton.load_sidecar(tmp_path / "10pct" / "train.beton")
    assert_ratio(side["counts"], 0.1)
    assert side["builder"]["corruptions"] == list(PUBLISHED_TYPES[kind])


def test_cifar10c_same_seed_identical_with_any_worker_count(tmp_path, cifar_small):
    for name, workers in (("one", 1), ("two", 2)):
        cifar10c.build_cifar10c(cifar_small, tmp_path / name, [0.1], valid_size=50, seed=1,
                                workers=workers, progress=False)
    for split in ("train", "valid", "test"):
        assert ((tmp_path / "one" / "10pct" / f"{split}.beton").read_bytes()
                == (tmp_path / "two" / "10pct" / f"{split}.beton").read_bytes())


def test_cifar10c_bad_level_and_type(tmp_path, cifar_small):
    with pytest.raises(DfaError, match="level 6"):
        cifar10c.build_cifar10c(cifar_small, tmp_path, [0.1], level=6, progress=False)
    with pytest.raises(DfaError, match="type2"):
        cifar10c.build_cifar10c(cifar_small, tmp_path, [0.1], corruption_type="type2",
                                progress=False)


# ----------------------------------------------------------------------------------------- faces
def test_faces_group_counts(faces_built):
    tmp_path = faces_built
    for tag, ratio in (("0.5pct", 0.005), ("2pct", 0.02)):
        train = np.asarray(beton.load_sidecar(tmp_path / tag / "train.beton")["counts"])
        # Every aligned face left after valid/test: young women 5132 - 300, old men 3177 - 300.
        assert train[0, 0] == 5132 - 300 and train[1, 1] == 3177 - 300
        assert_ratio(train, ratio)
        test = np.asarray(beton.load_sidecar(tmp_path / tag / "test.beton")["counts"])
        assert test.tolist() == [[200, 200], [200, 200]]
        valid = np.asarray(beton.load_sidecar(tmp_path / tag / "valid.beton")["counts"])
        assert valid.tolist() == [[100, 100], [100, 100]]
        conflict = beton.load_sidecar(tmp_path / tag / "test_conflict.beton")
        assert conflict["counts"] == [[0, 200], [200, 0]]
    images, labels, biases, _ = read_split(tmp_path / "0.5pct" / "test_conflict.beton")
    assert images.shape == (400, 64, 64, 3) and (labels != biases).all()


def test_faces_ratio_too_large_is_refused(tmp_path, data_root):
    with pytest.raises(DfaError, match="conflicting young faces but only"):
        faces.build_faces(data_root / "utkface-10-29_40-59.zip", tmp_path, [0.9],
                          progress=False)


# ------------------------------------------------------------------------- published folder
def make_published_tree(root, n_per_class=20, conflict_every=10, size=28):
    """Write a tiny data set in the published DisEnt layout (1pct and 5pct share valid/test)."""
    rng = np.random.default_rng(0)
    expected = {}
    for tag in ("1pct", "5pct"):
        rows = []
        for y in range(10):
            for i in range(n_per_class):
                b = (y + 1 + i % 9) % 10 if i % conflict_every == 0 else y
                part = "align" if b == y else "conflict"
                path = root / tag / part / str(y) / f"{y}{i:03d}_{y}_{b}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
                rows.append((y, b))
        expected[tag] = rows
    for split in ("valid", "test"):
        for y in range(10):
            path = root / split / str(y) / f"{split}{y}_{y}_{(y + 3) % 10}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return expected


def test_folder_import_parses_names(tmp_path):
    expected = make_published_tree(tmp_path / "cmnist")
    folder.import_folder(tmp_path / "cmnist", tmp_path / "out", "cmnist", progress=False)
    for tag in ("1pct", "5pct"):
        images, labels, biases, _ = read_split(tmp_path / "out" / tag / "train.beton")
        assert sorted(zip(labels.tolist(), biases.tolist())) == sorted(expected[tag])
        _, labels, biases, _ = read_split(tmp_path / "out" / tag / "test.beton")
        assert ((labels + 3) % 10 == biases).all() and len(labels) == 10
    # The pixels survive: the first train file (sorted names) is 1pct/align/0/0001_0_0.png.
    images, *_ = read_split(tmp_path / "out" / "1pct" / "train.beton")
    first = np.asarray(Image.open(tmp_path / "cmnist" / "1pct" / "align" / "0" / "0001_0_0.png"))
    assert np.array_equal(images[0], first)


@pytest.mark.parametrize("bad_name, message", [
    ("1pct/align/3/img_3.png", "does not end in _<label>_<bias>"),
    ("1pct/align/3/img_3_x.png", "does not end in _<label>_<bias>"),
    ("1pct/align/3/img_3_4.png", "in align/ but label 3 and bias 4 differ"),
    ("1pct/conflict/3/img_3_3.png", "in conflict/ but label 3 and bias 3 agree"),
    ("1pct/align/3/img_12_12.png", "out of range"),
])
def test_folder_import_refuses_malformed_names(tmp_path, bad_name, message):
    make_published_tree(tmp_path / "src", n_per_class=2)
    path = tmp_path / "src" / bad_name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(path)
    with pytest.raises(DfaError, match=message):
        folder.import_folder(tmp_path / "src", tmp_path / "out", "cmnist", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.beton"))


def test_folder_wrong_layout_shows_expected_tree(tmp_path):
    (tmp_path / "src" / "train" / "0").mkdir(parents=True)
    with pytest.raises(DfaError) as err:
        folder.import_folder(tmp_path / "src", tmp_path / "out", "cmnist", progress=False)
    assert "ROOT/<pct>/align/<k>/<id>_<label>_<bias>.<ext>" in str(err.value)
    assert "ROOT/test/" in str(err.value)


def test_folder_undecodable_image_is_named_and_nothing_written(tmp_path):
    make_published_tree(tmp_path / "src", n_per_class=2)
    bad = tmp_path / "src" / "1pct" / "align" / "4" / "zz_4_4.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DfaError, match="zz_4_4.png: cannot decode image"):
        folder.import_folder(tmp_path / "src", tmp_path / "out", "cmnist", progress=False)
    assert not list((tmp_path / "out").rglob("*.beton")) if (tmp_path / "out").exists() else True
    shutil.rmtree(tmp_path / "src")
