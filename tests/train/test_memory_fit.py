"""The memory plan: quality first (weight format), then speed (no recompute), then the largest micro-batch."""
import pytest

from bench.memory_plan import spec_of
from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.memory import memory_plan
from engine.lora.config import LoraConfig
from engine.model.weight_formats import WeightFormat
from engine.train.memory_fit import PlanDoesNotFit, fit_plan, parse_bytes, usable_budget

LORA, OPTIM = LoraConfig(rank=16), OptimizerConfig()
GIB = 2 ** 30


@pytest.mark.parametrize("text,value", [("8GB", 8 * GIB), ("7.5 GiB", int(7.5 * GIB)), ("6000MB", 6000 * 2 ** 20),
                                        ("123456", 123456), ("2t", 2 * 2 ** 40)])
def test_sizes_parse(text, value):
    assert parse_bytes(text) == value


def test_a_size_without_a_number_is_refused():
    with pytest.raises(ValueError, match="'eight gigs' is not a number"):
        parse_bytes("eight gigs")


def test_without_a_budget_the_preferred_plan_is_taken_unchecked():
    small, large = spec_of("Qwen3-0.6B"), spec_of("Llama-3.1-8B")
    plan = fit_plan(small, LORA, OPTIM, 8, 512, None)
    assert (plan.weights, plan.recompute, plan.micro_batch, plan.grad_accum) == ("bf16", False, 8, 1)
    assert fit_plan(large, LORA, OPTIM, 1, 512, None).weights == "q8"
    # A GGUF keeps its own quantization.
    stored = {"model.layers.0.mlp.down_proj.weight": WeightFormat.Q4_K}
    assert fit_plan(small, LORA, OPTIM, 1, 512, None, stored=stored).weights == "stored"


def test_each_step_down_is_taken_only_when_the_one_before_does_not_fit():
    spec = spec_of("Qwen3-0.6B")

    def total(weights, recompute, micro):
        return memory_plan(spec, LORA, OPTIM, micro, 512, weights=weights, recompute=recompute).total

    # Just under bf16 without recompute at micro-batch 8: recompute at micro-batch 8 is the next choice.
    budget = total("bf16", False, 8) - 1
    plan = fit_plan(spec, LORA, OPTIM, 8, 512, budget)
    assert (plan.weights, plan.recompute, plan.micro_batch) == ("bf16", False, 4)
    assert plan.memory.total <= budget and plan.grad_accum == 2
    budget = total("bf16", True, 1) - 1          # nothing in bf16 fits: 8 bits, kept activations if they fit
    plan = fit_plan(spec, LORA, OPTIM, 8, 512, budget)
    assert plan.weights == "q8" and plan.memory.total <= budget
    assert plan.micro_batch * plan.grad_accum == 8


def test_a_run_that_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(PlanDoesNotFit, match=r"weights q4, recompute on and micro-batch 1 it needs [0-9.]+ GiB "
                                             r"\(weights [0-9.]+ GiB.*and 2.00 GiB is usable"):
        fit_plan(spec_of("Llama-3.1-8B"), LORA, OPTIM, 4, 512, 2 * GIB)


def test_the_issue_targets_are_planned():
    """4-bit weights with recompute: the Llama-3.2-3B shape at B=1, T=512 in <= 4 GB and Llama-3.1-8B in <= 7.5
    GB (the plan equals what the engine allocates: tests/backends/wgpu/test_memory.py)."""
    limit = (1 << 31) - 4
    three = memory_plan(spec_of("Llama-3.2-3B"), LORA, OPTIM, 1, 512, limit, weights="q4", recompute=True)
    eight = memory_plan(spec_of("Llama-3.1-8B"), LORA, OPTIM, 1, 512, limit, weights="q4", recompute=True)
    assert three.total <= 4e9 and eight.total <= 7.5e9
    assert usable_budget(8 * GIB) < 8 * GIB and usable_budget(None) is None
