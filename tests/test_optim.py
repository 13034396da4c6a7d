"""`dfa_fast.optim.Adam`: the same updates, state and checkpoints as `torch.optim.Adam(fused=True)`,
on its short path and on every case it hands to torch."""
import pytest
import torch

from dfa_fast import optim


def make_params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=gen).requires_grad_(),
            torch.randn(5, generator=gen).requires_grad_(),
            torch.randn(3, 4, generator=gen).requires_grad_()]


def set_grads(params, step: int, skip=()):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen)


def pair(weight_decay=0.0, groups=False, **kwargs):
    """A torch Adam and an `optim.Adam` over equal copies of the same parameters."""
    a, b = make_params(), make_params()
    if groups:  # two groups with their own learning rates
        a = [{"params": a[:2]}, {"params": a[2:], "lr": 3e-2}]
        b = [{"params": b[:2]}, {"params": b[2:], "lr": 3e-2}]
    return (torch.optim.Adam(a, lr=1e-2, weight_decay=weight_decay, fused=True, **kwargs),
            optim.Adam(b, lr=1e-2, weight_decay=weight_decay, **kwargs))


def params_of(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def assert_same(ref, lean):
    for p, q in zip(params_of(ref), params_of(lean)):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if ref.state.get(p):
                assert torch.equal(ref.state[p][key], lean.state[q][key]), key


def run(ref, lean, steps, start=0, skip_at=None, schedule=None):
    for step in range(start, start + steps):
        skip = (1,) if step == skip_at else ()
        for opt in (ref, lean):
            set_grads(params_of(opt), step, skip)
            opt.step()
            if schedule:
                schedule[opt].step()
        assert_same(ref, lean)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("groups", [False, True])
def test_updates_and_state_equal_torch_fused_adam_bit_for_bit(weight_decay, groups):
    ref, lean = pair(weight_decay, groups)
    run(ref, lean, 6, skip_at=3)  # a parameter without a gradient in one step keeps its state


def test_the_short_path_is_taken_after_the_first_step(monkeypatch):
    ref, lean = pair()
    run(ref, lean, 1)  # the first step creates the state through torch

    def refuse(self, closure=None):
        raise AssertionError("torch.optim.Adam.step ran")
    monkeypatch.setattr(torch.optim.Adam, "step", refuse)
    set_grads(params_of(lean), 1)
    lean.step()
    assert float(lean.state[params_of(lean)[0]]["step"]) == 2


def test_learning_rate_changes_of_a_schedule_are_followed():
    ref, lean = pair()
    schedule = {opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 2))
                for opt in (ref, lean)}
    run(ref, lean, 6, schedule=schedule)
    assert lean.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < 1e-2


def test_checkpoints_load_across_torch_adam_and_this_adam():
    ref, lean = pair()
    run(ref, lean, 3)
    # Each loads the other's state and both continue alike.
    ref_state, lean_state = ref.state_dict(), lean.state_dict()
    ref.load_state_dict(lean_state)
    lean.load_state_dict(ref_state)
    run(ref, lean, 3, start=3)


@pytest.mark.parametrize("kwargs", [{"amsgrad": True}, {"maximize": True}])
def test_options_outside_the_short_path_are_torch_adam(kwargs):
    ref, lean = pair(**kwargs)
    run(ref, lean, 4)


def test_closure_hooks_and_the_profiler_still_work():
    ref, lean = pair()
    run(ref, lean, 1)
    calls = []
    handle = lean.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    set_grads(params_of(lean), 1)
    assert lean.step(lambda: torch.tensor(2.5)) == 2.5
    assert calls == ["pre"]
    handle.remove()
    with torch.profiler.profile() as prof:
        set_grads(params_of(lean), 2)
        lean.step()
    assert any("Optimizer.step#" in event.name for event in prof.events())


def test_the_engine_uses_it_and_clears_the_gradients_after_a_step(tmp_path):
    from dfa_fast import config
    from dfa_fast.engine import build_ds_config, initialize, prepare_environment
    from dfa_fast.models import DisEntModel
    cfg = config.resolve("cmnist", 1, "disent", {"compute": {"device": "cpu"}})
    prepare_environment(torch.device("cpu"))
    engine = initialize(DisEntModel(cfg.model, 10), cfg, {
        "train_batch_size": 256, "train_micro_batch_size_per_gpu": 256,
        "gradient_accumulation_steps": 1})
    assert isinstance(engine.optimizer, optim.Adam)
    assert engine.optimizer.param_groups[0]["weight_decay"] == cfg.optim.weight_decay
    # A step updates every parameter and leaves no gradient behind (the engine's zero_grad).
    before = [p.detach().clone() for p in engine.module.parameters()]
    z_i, z_b = engine.module.features(torch.rand(4, 3, 28, 28))
    engine.backward(engine.module.fc_i(torch.cat([z_i, z_b], 1)).square().sum()
                    + engine.module.fc_b(torch.cat([z_i, z_b], 1)).square().sum())
    engine.step()
    for old, p in zip(before, engine.module.parameters()):
        assert p.grad is None and not torch.equal(old, p)
    # Under ZeRO (listed optimizer types only) the engine gets torch.optim.Adam itself.
    cfg = config.resolve("cmnist", 1, "disent", {"compute": {"device": "cpu"},
                                                 "parallel": {"zero_stage": 1}})
    engine = initialize(DisEntModel(cfg.model, 10), cfg, build_ds_config(cfg, 1))
    assert type(engine.basic_optimizer) is torch.optim.Adam
