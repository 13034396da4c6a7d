"""The valid split a checkpoint is selected on: `data info` and `train` say when a (label, bias)
cell of it holds fewer than 10 images (the published folder layout: one conflicting image per
cell), and say nothing on the default builds; `data info` prints no JPEG quality for raw images,
no seed for imported data and no ratio for the evaluation splits."""
import pytest

from dfa_fast.cli import main
from dfa_fast.data.folder import import_folder
from dfa_fast.data.info import THIN_CELL, describe, thin_cell_note
from test_builders import make_published_tree


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    make_published_tree(root / "src", n_per_class=20, conflict_every=20)
    import_folder(root / "src", root / "out", "cmnist", ratios=[0.05], progress=False)
    return root / "out" / "5pct"


def test_the_note_counts_the_cells_below_the_threshold():
    counts = [[50, 1, 0], [9, 40, 0], [0, 0, 12]]
    assert thin_cell_note(counts) == (
        f"2 of the 5 (label, bias) cells that the unbiased accuracy averages hold fewer than "
        f"{THIN_CELL} images (fewest 1)")
    assert thin_cell_note([[10, 0], [0, 10]]) is None


def test_data_info_of_the_published_layout(imported):
    valid, test, train = (describe(imported / f"{s}.beton") for s in ("valid", "test", "train"))
    assert "selection: 10 of the 10 (label, bias) cells" in valid and "(fewest 1)" in valid
    assert "selection:" not in test and "selection:" not in train
    assert "ratio 5%" in train and "ratio" not in test.splitlines()[1]
    for text in (valid, test, train):
        assert "seed" not in text and " q90" not in text and "jpeg_quality" not in text


def test_data_info_of_a_default_build_has_no_note(cmnist_full):
    valid = describe(cmnist_full / "1pct" / "valid.beton")
    assert "selection:" not in valid and "seed 0" in valid
    assert "ratio" not in valid.splitlines()[1]
    assert "ratio 1%" in describe(cmnist_full / "1pct" / "train.beton")


def train_args(data, out):
    return ["train", "--preset", "cmnist", "--ratio", "{}", "--method", "vanilla",
            "--data", str(data), "--out", str(out), "--steps", "4",
            "--set", "data.batch_size=16", "--set", "train.eval_every=4",
            "--set", "train.progress=false"]


def test_train_warns_in_one_line_on_the_published_layout_only(imported, cmnist_full, tmp_path,
                                                              capsys):
    args = train_args(imported, tmp_path / "published")
    assert main([a.replace("{}", "5") for a in args]) == 0
    warned = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
    assert len(warned) == 1 and "valid.beton: 10 of the 10 (label, bias) cells" in warned[0]
    args = train_args(cmnist_full / "1pct", tmp_path / "default")
    assert main([a.replace("{}", "1") for a in args]) == 0
    assert "warning" not in capsys.readouterr().err
