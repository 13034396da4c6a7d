"""How to add a method (docs/design.md, "Where to add a method"), as a worked example: a toy
method, Vanilla with a focal loss, registered in one call, trained for a few steps through the
command line on real Colored MNIST, and reported."""
import json

import pytest
import torch

from dfa_fast import config, methods, ops
from dfa_fast.cli import main
from dfa_fast.errors import DfaError


class Focal(methods.Method):
    """One network; the cross-entropy of each sample scaled by (1 - p_y) ** gamma."""

    name = "focal"

    def build_model(self):
        from dfa_fast.models import Classifier
        return Classifier(self.cfg.model, self.num_classes)

    def step(self, batch, step):
        ce = ops.cross_entropy(self.run_net(self.model, batch.image), batch.label)
        loss = ((1 - torch.exp(-ce.detach())) ** 2 * ce).mean()
        return loss, {"ce": ce.detach().mean()}


@pytest.fixture
def focal():
    methods.register(Focal, {"model": {"input_scale": 1.0}})
    yield Focal
    methods.METHODS.pop("focal")
    config.METHODS.remove("focal")
    config.EXTRA_METHODS.pop("focal")


def test_a_registered_method_trains_and_reports(focal, cmnist_full, tmp_path, capsys):
    run = tmp_path / "focal"
    assert main(["train", "--preset", "cmnist", "--ratio", "1", "--method", "focal", "--data",
                 str(cmnist_full), "--out", str(run), "--steps", "300",
                 "--set", "train.eval_every=150", "--set", "train.log_every=50",
                 "--set", "train.progress=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "focal"
    valid = summary["final"]["valid"]
    assert valid["aligned"] > 90 and valid["accuracy"] > 20, valid  # learnt, well above chance
    assert config.load(run / "config.yaml").model.input_scale == 1.0  # its preset settings
    assert main(["report", str(run)]) == 0
    assert "| cmnist | 1% | focal | train.steps=300, train.eval_every=150 | 1 | " in \
        capsys.readouterr().out


def test_register_refuses_what_is_not_a_method():
    with pytest.raises(TypeError, match="Method subclass"):
        methods.register(int)
    with pytest.raises(DfaError, match="has no method 'focal'"):
        config.resolve("cmnist", 1, "focal")
