"""The local execution backend: the step contract (accumulate, clip, AdamW, zero, schedule), EMA with
warm-up, the single-process checkpoint layout of the optimizer state, and ``build_backend`` by name."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from geomerase.core.backend import LocalBackend, LocalEma, TrainBackend, build_backend
from geomerase.core.trainer import TrainConfig, lr_lambda

CPU = torch.device("cpu")


class Toy(nn.Module):
    """Two parameter tensors; ``forward(c1, c2)`` is the scalar loss ``<w, c1> + <b, c2>`` (gradients c1, c2)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3, 4, generator=g))
        self.b = nn.Parameter(torch.randn(5, generator=g))

    def forward(self, c1, c2):
        return (self.w * c1).sum() + (self.b * c2).sum()


def _setup(tc=None, groups=None, schedule=lambda step: 1.0, seed=0):
    module = Toy(seed)
    params = [module.w, module.b]
    tc = tc or TrainConfig(lr=0.01, grad_clip=0.0)
    backend = build_backend("local", CPU, None)
    backend.setup(module, groups(params) if groups else [{"params": params}], params, tc, schedule)
    return backend, module, params


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, generator=g), torch.randn(5, generator=g)


def test_build_backend_by_name():
    backend = build_backend("local", CPU, None)
    assert isinstance(backend, LocalBackend) and backend.name == "local"
    assert (backend.rank, backend.world_size, backend.device, backend.is_main) == (0, 1, CPU, True)
    with pytest.raises(ValueError, match="unknown train.backend 'ray'"):
        build_backend("ray", CPU, None)


def test_deepspeed_backend_unregistered_says_what_to_import_and_install(monkeypatch):
    import geomerase.core.backend as backend_mod

    monkeypatch.delitem(backend_mod._BACKENDS, "deepspeed", raising=False)
    with pytest.raises(RuntimeError, match=r"import geomerase.distributed.deepspeed_engine.*pip install -e \.\[distributed\]"):
        build_backend("deepspeed", CPU, None)


def test_backends_register_by_name(monkeypatch):
    import geomerase.core.backend as backend_mod

    made = []
    monkeypatch.setitem(backend_mod._BACKENDS, "probe", lambda device, run_cfg: made.append((device, run_cfg)) or
                        LocalBackend(device))
    assert isinstance(build_backend("probe", CPU, "cfg"), LocalBackend) and made == [(CPU, "cfg")]


def test_abstract_backend_defaults_are_single_process():
    base = TrainBackend()
    t = torch.ones(2)
    assert base.all_reduce_mean(t) is t
    assert base.all_gather_object({"a": 1}) == [{"a": 1}] and base.broadcast_object("x") == "x"
    assert base.is_main
    base.rank = 1
    assert not base.is_main
    for call in (lambda: base.setup(None, [], [], None, None), lambda: base.forward(), lambda: base.step(),
                 lambda: base.make_ema(0.9)):
        with pytest.raises(NotImplementedError):
            call()


def test_forward_and_backward_accumulate_the_mean_of_micro_batches():
    backend, module, params = _setup()
    (a1, a2), (b1, b2) = _grads(1), _grads(2)
    loss = backend.forward(a1, a2)
    torch.testing.assert_close(loss, (module.w * a1).sum() + (module.b * a2).sum())
    backend.backward(loss, 2)
    backend.backward(backend.forward(b1, b2), 2)
    torch.testing.assert_close(module.w.grad, (a1 + b1) / 2)
    torch.testing.assert_close(module.b.grad, (a2 + b2) / 2)
    backend.step()
    assert all(p.grad is None for p in params)  # zeroed (set to None) for the next step
    backend.backward(backend.forward(a1, a2), 1)  # one micro-batch: the gradient itself
    torch.testing.assert_close(module.w.grad, a1)


@pytest.mark.parametrize("clip", [0.0, 0.5, 100.0])
def test_step_returns_the_pre_clip_norm_and_clips_to_grad_clip(clip):
    backend, module, params = _setup(TrainConfig(lr=0.01, grad_clip=clip))
    c1 = torch.zeros(3, 4)
    c1[0, :2] = torch.tensor([3.0, 4.0])  # ||grad|| = 5
    loss = backend.forward(c1, torch.zeros(5))
    backend.backward(loss, 1)
    norm = backend.step()
    assert norm.dim() == 0 and not norm.requires_grad
    torch.testing.assert_close(norm, torch.tensor(5.0))
    # Adam's first moment after one step is (1 - beta1) * (clipped gradient): it shows what was applied.
    scale = clip / 5.0 if 0 < clip < 5.0 else 1.0
    exp_avg = backend.optimizer.state[module.w]["exp_avg"]
    torch.testing.assert_close(exp_avg, 0.1 * c1 * scale, rtol=1e-5, atol=1e-7)


def test_step_is_adamw_with_the_configured_hyperparameters():
    tc = TrainConfig(lr=0.05, weight_decay=0.1, grad_clip=0.0)
    backend, module, params = _setup(tc)
    ref_module = Toy(0)
    ref = torch.optim.AdamW(ref_module.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                            foreach=False)
    for step in range(3):
        c1, c2 = _grads(10 + step)
        backend.backward(backend.forward(c1, c2), 1)
        backend.step()
        ref_module(c1, c2).backward()
        ref.step()
        ref.zero_grad()
    torch.testing.assert_close(module.w, ref_module.w)
    torch.testing.assert_close(module.b, ref_module.b)
    assert not torch.equal(module.w, Toy(0).w)


def test_group_weight_decay_override_leaves_that_group_undecayed():
    """The location rows' group carries ``weight_decay: 0.0``; ``train.weight_decay`` applies to the others."""
    tc = TrainConfig(lr=0.1, weight_decay=0.5, grad_clip=0.0)
    groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa: E731
    backend, module, params = _setup(tc, groups=groups)
    w0, b0 = module.w.detach().clone(), module.b.detach().clone()
    backend.backward(backend.forward(torch.zeros(3, 4), torch.zeros(5)), 1)  # zero gradient: only decay moves
    backend.step()
    torch.testing.assert_close(module.w.detach(), w0 * (1 - 0.1 * 0.5))
    assert torch.equal(module.b.detach(), b0)


def test_lr_schedule_warms_up_then_decays_by_cosine_to_the_floor():
    tc = TrainConfig(lr=0.2, grad_clip=0.0, warmup_steps=2, max_steps=6, min_lr_ratio=0.1)
    backend, module, params = _setup(tc, groups=lambda ps: [{"params": [ps[0]], "lr": 0.2},
                                                            {"params": [ps[1]], "lr": 0.02}], schedule=lr_lambda(tc))
    # warm-up (1/2, 2/2), then 0.1 + 0.9 * (1 + cos(pi * k/4)) / 2 for k = 0..4, then the floor
    factors = [0.5, 1.0, 1.0, 0.8681981, 0.55, 0.2318019, 0.1, 0.1]
    w_before = module.w.detach().clone()
    for step, f in enumerate(factors):
        assert backend.last_lr() == pytest.approx(0.2 * f, rel=1e-6)
        assert [g["lr"] for g in backend.optimizer.param_groups] == pytest.approx([0.2 * f, 0.02 * f], rel=1e-6)
        backend.backward(backend.forward(torch.ones(3, 4), torch.ones(5)), 1)
        backend.step()
        if step == 0:
            # Adam's first step moves each weight by ~lr: the step used the warm-up lr of step 0
            torch.testing.assert_close(w_before - module.w.detach(), torch.full((3, 4), 0.1), rtol=1e-4, atol=0)


def test_ema_warms_up_then_is_capped_at_decay():
    backend, module, params = _setup()
    for decay in (0.999, 0.2):
        ema = LocalEma(params, decay)
        c1, c2 = _grads(3)
        backend.backward(backend.forward(c1, c2), 1)
        backend.step()
        ema.step()  # first update: decay 0, the average is the weights
        torch.testing.assert_close(ema.tensors()[0], module.w.detach())
        prev = [t.clone() for t in ema.tensors()]
        backend.backward(backend.forward(*_grads(4)), 1)
        backend.step()
        ema.step()
        d = min(decay, 1 - 2 ** (-2 / 3))  # warm-up decay 1 - (1 + 1)^(-2/3) at the second update
        for t, p, old in zip(ema.tensors(), params, prev):
            torch.testing.assert_close(t, d * old + (1 - d) * p.detach())
        assert [t.shape for t in ema.tensors()] == [p.shape for p in params]


def test_ema_state_round_trips_through_json_and_tensors():
    backend, module, params = _setup()
    ema = backend.make_ema(0.9)
    assert isinstance(ema, LocalEma)
    for step in range(3):
        backend.backward(backend.forward(*_grads(step)), 1)
        backend.step()
        ema.step()
    state = ema.state_json()
    assert "shadow_params" not in state and json.loads(json.dumps(state)) == state
    restored = LocalEma(params, 0.5)  # decay and step count come from the state
    restored.load(state, [t.clone() for t in ema.tensors()])
    backend.backward(backend.forward(*_grads(7)), 1)
    backend.step()
    ema.step()
    restored.step()
    for a, b in zip(ema.tensors(), restored.tensors()):
        assert torch.equal(a, b)


def test_optimizer_state_uses_flat_parameter_indices_and_resumes_exactly():
    groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.003}]  # noqa: E731
    backend, module, params = _setup(groups=groups)
    for step in range(2):
        backend.backward(backend.forward(*_grads(step)), 1)
        backend.step()
    tensors, rest = backend.optimizer_state()
    assert set(tensors) == {f"{i}.{k}" for i in range(2) for k in ("exp_avg", "exp_avg_sq", "step")}
    assert tensors["0.exp_avg"].shape == (3, 4) and tensors["1.exp_avg"].shape == (5,)
    assert torch.equal(tensors["1.exp_avg_sq"], backend.optimizer.state[module.b]["exp_avg_sq"])
    json.dumps(rest)  # the non-tensor part goes into trainer.json

    other, other_module, _ = _setup(groups=groups, seed=1)
    with torch.no_grad():
        other_module.w.copy_(module.w)
        other_module.b.copy_(module.b)
    other.load_optimizer_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(rest)))
    assert [g["lr"] for g in other.optimizer.param_groups] == [0.01, 0.003]
    for b in (backend, other):
        b.backward(b.forward(*_grads(5)), 1)
        b.step()
    assert torch.equal(module.w, other_module.w) and torch.equal(module.b, other_module.b)


def test_full_weights_swaps_values_in_and_restores_them():
    backend, module, params = _setup()
    orig = [p.detach().clone() for p in params]
    values = [torch.full_like(p, 7.0) for p in params]
    with backend.full_weights():  # no values: the weights as they are
        assert all(torch.equal(p, o) for p, o in zip(params, orig))
    with pytest.raises(KeyError):
        with backend.full_weights(values):
            assert all(torch.equal(p, v) for p, v in zip(params, values))
            raise KeyError("restored even on error")
    assert all(torch.equal(p, o) for p, o in zip(params, orig))
    with backend.full_weights(values, restore=False):
        pass
    assert all(torch.equal(p, v) for p, v in zip(params, values))
