"""Schedules equal transformers' own schedulers step by step."""
import pytest

from engine.train.schedule import Schedule


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_transformers(kind, warmup):
    import torch
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    total, lr = 17, 3e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = {"constant": lambda: get_constant_schedule_with_warmup(opt, warmup),
          "linear": lambda: get_linear_schedule_with_warmup(opt, warmup, total),
          "cosine": lambda: get_cosine_schedule_with_warmup(opt, warmup, total)}[kind]()
    ours = Schedule(lr=lr, total_steps=total, kind=kind, warmup_steps=warmup)
    for step in range(total):
        assert ours.lr_at(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        hf.step()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=1e-3, total_steps=10, kind="exp"), "unknown"),
    (dict(lr=0.0, total_steps=10), "positive"),
    (dict(lr=1e-3, total_steps=0), "at least 1"),
    (dict(lr=1e-3, total_steps=5, warmup_steps=6), "warmup"),
])
def test_schedule_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)
