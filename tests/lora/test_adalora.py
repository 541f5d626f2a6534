"""engine.lora.adalora against PEFT 0.21.2 directly: the budget schedule, RankAllocator's EMAs and masking, the
orthogonality regulariser and its gradient (autograd), the chain rule through A_eff = c·(E ⊙ A)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.lora import adalora
from engine.lora.adalora import AdaLoraSettings, RankAllocator, budget_schedule
from engine.lora.config import peft_key
from engine.model.spec import load_model_spec
from tests.adalora_oracle import peft_adalora_model, peft_kept

TARGETS = ("q_proj", "k_proj", "up_proj")


@pytest.mark.parametrize("settings", [
    AdaLoraSettings(init_r=5, target_r=2, tinit=3, tfinal=4, deltaT=2, total_step=20),
    AdaLoraSettings(init_r=12, target_r=8, tinit=0, tfinal=0, deltaT=1, total_step=7),
    AdaLoraSettings(init_r=3, target_r=1, tinit=10, tfinal=1, deltaT=5, total_step=40),
])
def test_budget_schedule_is_peft_s(settings):
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    peft = PeftAllocator.__new__(PeftAllocator)        # only the schedule: no model needed
    peft.peft_config = type("C", (), dict(settings.to_dict()))()
    peft.init_bgt, peft.target_bgt = 17 * settings.init_r, 17 * settings.target_r
    for step in range(settings.total_step + 3):
        assert budget_schedule(step, settings, peft.init_bgt, peft.target_bgt) == peft.budget_schedule(step), step


def test_allocator_emas_and_masks_are_peft_s(tiny_llama_dir):
    """Random parameters and gradients through a whole schedule: PEFT's RankAllocator (via AdaLoraModel.
    update_and_allocate) and ours keep the same EMAs, mask the same triplets and zero the same E."""
    import torch

    spec = load_model_spec(tiny_llama_dir)
    settings = AdaLoraSettings(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=9)
    ours = adalora.init_adalora_params(spec, TARGETS, settings.init_r, seed=1)
    rng = np.random.default_rng(7)
    ours.flat[...] = rng.standard_normal(ours.flat.size).astype(np.float32)
    model = peft_adalora_model(tiny_llama_dir, settings, 8.0, TARGETS, ours.peft_tensors())
    allocator = RankAllocator(settings, ours)
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".lora_" in n}
    for step in range(1, settings.total_step + 1):
        grads = ours.like(rng.standard_normal(ours.flat.size).astype(np.float32))
        # An "optimizer step" both sides: the same new values, then the allocator with the same gradients.
        ours.flat[...] += np.float32(0.01) * grads.flat
        with torch.no_grad():
            for key, value in ours.peft_tensors().items():
                params[key].copy_(torch.from_numpy(value))
                params[key].grad = torch.from_numpy(grads.peft_tensors()[key])
        model.base_model.update_and_allocate(step)
        allocator.update_and_allocate(step, grads.flat)
        kept = peft_kept(model, ours.modules)
        assert (kept is None) == (not allocator.has_pattern), step
        if kept is not None:
            assert np.array_equal(kept, allocator.kept), step
        theirs = {k: p.detach().numpy() for k, p in params.items()}
        for key, value in ours.peft_tensors().items():
            np.testing.assert_array_equal(value == 0, theirs[key] == 0, err_msg=f"step {step} {key}")
        ema = model.base_model.rankallocator.exp_avg_ipt
        if step < settings.total_step - settings.tfinal:
            name = next(iter(ema))
            key = "base_model.model." + name.replace(".default", "")
            np.testing.assert_allclose(ours.like(allocator.exp_avg_ipt).peft_tensors()[key],
                                       ema[name].numpy(), rtol=1e-5)
    assert allocator.final and int(allocator.ranks().sum()) == settings.target_r * len(ours.modules)


def test_orth_regulariser_and_its_gradient_are_autograd_s(tiny_llama_dir):
    import torch

    spec = load_model_spec(tiny_llama_dir)
    params = adalora.init_adalora_params(spec, TARGETS, 3, seed=2)
    params.flat[...] *= np.float32(20.0)               # far from orthogonal, so every term counts
    grads = params.like(np.zeros_like(params.flat))
    value = adalora.orth_regulariser(params, 0.7, grads)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.peft_tensors().items()}
    total, count = 0, 0
    for key, p in tensors.items():
        if key.endswith(("lora_A", "lora_B")):
            cov = p @ p.T if key.endswith("lora_A") else p.T @ p
            total = total + torch.norm(cov - torch.eye(cov.shape[0]), p="fro")
            count += 1
    reference = 0.7 * total / count
    reference.backward()
    assert value == pytest.approx(float(reference.detach()), rel=1e-5)
    for key, g in grads.peft_tensors().items():
        expected = tensors[key].grad.numpy() if tensors[key].grad is not None else np.zeros_like(g)
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7, err_msg=key)


def test_chain_rule_through_the_effective_lora(tiny_llama_dir):
    """dA, dE, dB from the backend's dA_eff, dB equal autograd through A_eff = c·(E ⊙ A)."""
    import torch

    spec = load_model_spec(tiny_llama_dir)
    params = adalora.init_adalora_params(spec, TARGETS, 3, seed=4)
    rng = np.random.default_rng(3)
    params.flat[...] = rng.standard_normal(params.flat.size).astype(np.float32)
    c = adalora.adalora_scaling(8.0, 3) / (8.0 / 3)
    upstream = {k: rng.standard_normal(v.shape).astype(np.float32)
                for k, v in adalora.effective_lora(params, c, peft_key).items()}
    grads = params.like(np.zeros_like(params.flat))
    adalora.chain_gradients(params, grads, c, upstream, peft_key)
    for i, m in enumerate(params.modules):
        a, e = (torch.tensor(x, requires_grad=True) for x in (params.A[i], params.E[i]))
        (c * (e * a) * torch.from_numpy(upstream[peft_key(m.layer, m.target, "A")])).sum().backward()
        np.testing.assert_allclose(grads.A[i], a.grad.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads.E[i], e.grad.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(grads.B[i], upstream[peft_key(m.layer, m.target, "B")])


def test_init_is_peft_s_distribution_and_settings_round_trip(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    params = adalora.init_adalora_params(spec, TARGETS, 6, seed=0)
    assert not any(e.any() for e in params.E)
    values = np.concatenate([x.ravel() for x in params.A + params.B])
    assert abs(values.std() - 0.02) < 0.002 and abs(values.mean()) < 0.002
    assert np.array_equal(adalora.init_adalora_params(spec, TARGETS, 6, seed=0).flat, params.flat)
    settings = AdaLoraSettings(init_r=6, target_r=3, total_step=10)
    assert AdaLoraSettings(**settings.to_dict()) == settings
    with pytest.raises(ValueError, match="total_step is 0"):
        RankAllocator(replace(settings, total_step=0), params)
