"""Readers of the raw data sets and their errors on bad input (real MNIST, CIFAR-10 and UTKFace)."""
import gzip
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import MNIST_DIR
from dfa_fast.data import sources
from dfa_fast.errors import DfaError


def test_mnist_real_files_shapes_and_label_counts():
    mnist = sources.load_mnist(MNIST_DIR)
    train, test = mnist.splits["train"], mnist.splits["test"]
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                                  5851, 5949]
    assert mnist.checksums["train-images-idx3-ubyte.gz"].startswith("b09d8b89df4ad239")


def test_idx_uncompressed_equals_gzip(tmp_path):
    raw = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "labels").write_bytes(raw)
    assert np.array_equal(sources.read_idx(tmp_path / "labels"),
                          sources.read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz"))


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x00\x00\x0d\x03" + raw[4:], "bad IDX magic"),
    (lambda raw: raw[:-100], "truncated or corrupt"),
    (lambda raw: raw[:3], "bad IDX magic"),
])
def test_idx_bad_content_names_the_file(tmp_path, damage, message):
    raw = gzip.decompress((MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(damage(raw))
    with pytest.raises(DfaError, match=message) as err:
        sources.read_idx(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_bad_and_truncated_gzip_name_the_file(tmp_path):
    data = (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DfaError, match="corrupt or truncated gzip") as err:
        sources.read_idx(truncated)
    assert "truncated.gz" in str(err.value)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"hello world")
    with pytest.raises(DfaError, match="not a gzip file"):
        sources.read_idx(not_gzip)


def test_missing_mnist_file_is_named(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((MNIST_DIR / name).read_bytes())
    with pytest.raises(DfaError, match="t10k-images-idx3-ubyte"):
        sources.load_mnist(tmp_path)


def _cifar_subset(data_root, per_class=6):
    """Real CIFAR-10 images from the JPEG zip: (train images, labels, test images, labels)."""
    out = {}
    with zipfile.ZipFile(data_root / "cifar10-jpeg.zip") as archive:
        names = sorted(archive.namelist())
        for split in ("train", "test"):
            images, labels = [], []
            for label, cls in enumerate(sources.CIFAR10_CLASSES):
                files = [n for n in names if n.startswith(f"{split}/{cls}/") and n.endswith(".jpg")][
                    :per_class]
                images += [np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB"))
                           for n in files]
                labels += [label] * len(files)
            out[split] = (np.stack(images), np.asarray(labels))
    return out


def write_cifar_batches(folder, subset):
    """Write `subset` in the official python-pickle layout (5 train batches + test_batch)."""
    folder.mkdir(parents=True)
    train_x, train_y = subset["train"]
    parts = np.array_split(np.arange(len(train_y)), 5)
    batches = {f"data_batch_{i + 1}": rows for i, rows in enumerate(parts)}
    for name, (x, y) in list({n: (train_x[r], train_y[r]) for n, r in batches.items()}.items()) + \
            [("test_batch", subset["test"])]:
        payload = {b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1),
                   b"labels": [int(v) for v in y]}
        (folder / name).write_bytes(pickle.dumps(payload))


def test_cifar_pickle_folder_tar_and_image_tree_agree(tmp_path, data_root):
    subset = _cifar_subset(data_root)
    write_cifar_batches(tmp_path / "cifar-10-batches-py", subset)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    tree = tmp_path / "tree"
    for split, (x, y) in subset.items():
        for i, (image, label) in enumerate(zip(x, y)):
            path = tree / split / sources.CIFAR10_CLASSES[label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    loaded = [sources.load_cifar10(tmp_path), sources.load_cifar10(tmp_path / "cifar-10-python.tar.gz"),
              sources.load_cifar10(tree)]
    for source in loaded:
        for split, (x, y) in subset.items():
            assert np.array_equal(source.splits[split].images, x)
            assert np.array_equal(source.splits[split].labels, y)


def test_cifar_real_zip_class_order(data_root):
    cifar = sources.load_cifar10(data_root / "cifar10-jpeg.zip")
    train = cifar.splits["train"]
    assert train.images.shape == (50000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    # Per-channel mean of the JPEG re-encoding, as measured in the data manifest.
    assert np.allclose(train.images.reshape(-1, 3).mean(0) / 255, (0.4913, 0.4821, 0.4465),
                       atol=2e-4)


def test_undecodable_image_names_the_file(tmp_path):
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in sources.CIFAR10_CLASSES:
            (tree / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tree / split / cls / "0.png")
    (tree / "train" / "cat" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DfaError, match="cannot decode image") as err:
        sources.load_cifar10(tree)
    assert "train/cat/1.jpg" in str(err.value)


def test_cifar_wrong_layout_says_what_is_expected(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DfaError, match="cifar-10-batches-py"):
        sources.load_cifar10(tmp_path)


def test_utkface_zip_ages_and_genders(data_root):
    faces = sources.load_utkface(data_root / "utkface-10-29_40-59.zip")
    assert len(faces.names) == 13417
    young = (faces.ages >= 10) & (faces.ages <= 29)
    old = (faces.ages >= 40) & (faces.ages <= 59)
    assert (young | old).all()
    female = faces.genders == 1
    assert [int((young & female).sum()), int((young & ~female).sum()),
            int((old & ~female).sum()), int((old & female).sum())] == [5132, 3742, 3177, 1366]


@pytest.mark.parametrize("name", ["abc_1_2_x.jpg", "25.jpg", "25_7_0_x.jpg"])
def test_utkface_malformed_name_is_refused(name):
    with pytest.raises(DfaError, match=name.split(".")[0]):
        sources.parse_utkface_name(name)
