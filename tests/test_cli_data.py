"""`dfa-fast prepare` and `dfa-fast data info` from the command line: output, errors, exit codes."""
import subprocess
import sys

from test_builders import make_published_tree


def dfa(*args):
    return subprocess.run([sys.executable, "-m", "dfa_fast", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_prepare_folder_then_info_prints_counts(tmp_path):
    make_published_tree(tmp_path / "src", n_per_class=10, conflict_every=5)
    done = dfa("prepare", "folder", "--dataset", "cmnist", "--src", tmp_path / "src",
               "--out", tmp_path / "out", "--ratios", "5", "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'out' / '5pct'}" in done.stdout
    info = dfa("data", "info", tmp_path / "out" / "5pct", "--verify")
    assert info.returncode == 0, info.stderr
    assert "split train" in info.stdout and "sha256 verified" in info.stdout
    assert "aligned 80 (80.00%), conflicting 20 (20.00%)" in info.stdout
    assert "label\\bias" in info.stdout


def test_user_errors_are_one_line_with_status_2(tmp_path):
    for args, expected in [
        (("prepare", "cmnist", "--src", tmp_path / "nope", "--out", tmp_path / "o"),
         "MNIST folder not found"),
        (("prepare", "cmnist", "--src", "data/mnist", "--out", tmp_path / "o", "--ratios", "0"),
         "outside (0%, 100%)"),
        (("data", "info", tmp_path / "missing.beton"), "no such .beton"),
    ]:
        done = dfa(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dfa-fast: error:") and expected in lines[0]
