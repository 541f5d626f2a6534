"""Rope scaling read as transformers reads it: the inverse frequencies and yarn's attention factor equal
transformers' own rope init functions (modeling_rope_utils) for each option; what is not computed is refused."""
import numpy as np
import pytest

from engine.model.spec import UnsupportedModelError, load_model_spec
from tests.arch_helpers import config_dir

YARN = {
    "factor-only": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
    "betas-no-truncate": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=16,
                              beta_slow=2, truncate=False),
    "mscales": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64, mscale=1.2,
                    mscale_all_dim=0.8),
    "attention-factor": dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=48,
                             attention_factor=0.9),
    "factor-below-one": dict(rope_type="yarn", factor=0.5, original_max_position_embeddings=32),
    "original-from-max-positions": dict(rope_type="yarn", factor=4.0),
}


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("name", list(YARN))
def test_yarn_is_transformers_own(tmp_path, model_type, name):
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = config_dir(tmp_path, "m", model_type=model_type, head_dim=24, hidden_size=48,
                        rope_parameters={"rope_theta": 10000.0, **YARN[name]})
    spec = load_model_spec(folder)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(folder), torch.device("cpu"))
    got = spec.rope.inv_freq(spec.head_dim)
    np.testing.assert_allclose(got, want_inv.numpy(), rtol=1e-6, atol=0)
    assert spec.rope.attention_factor == pytest.approx(want_factor, rel=1e-12)
    assert not np.allclose(got, load_model_spec(config_dir(tmp_path, "plain", model_type=model_type, head_dim=24,
                                                           hidden_size=48)).rope.inv_freq(24))


def test_a_top_level_original_max_position_wins_as_in_transformers(tmp_path):
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = config_dir(tmp_path, "m", model_type="llama", original_max_position_embeddings=40,
                        rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 64})
    spec = load_model_spec(folder)
    want_inv, _ = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(folder), torch.device("cpu"))
    assert spec.rope.original_max_position == 40
    np.testing.assert_allclose(spec.rope.inv_freq(spec.head_dim), want_inv.numpy(), rtol=1e-6, atol=0)


LONGROPE = {   # head_dim 24: 12 factors each; original 32 of max_position_embeddings 128
    "factor-from-positions": dict(rope_type="longrope", original_max_position_embeddings=32,
                                  short_factor=[1.0 + 0.1 * i for i in range(12)],
                                  long_factor=[2.0 + 0.5 * i for i in range(12)]),
    "factor-and-attention-factor": dict(rope_type="longrope", original_max_position_embeddings=32, factor=3.0,
                                        attention_factor=1.25, short_factor=[1.5] * 12,
                                        long_factor=[4.0 - 0.2 * i for i in range(12)]),
}


@pytest.mark.parametrize("name", list(LONGROPE))
@pytest.mark.parametrize("seq_len", [32, 33])
def test_longrope_is_transformers_own_on_either_side_of_the_original_length(tmp_path, name, seq_len):
    """Short factors up to original_max_position_embeddings, long ones past it, as transformers picks them for a
    batch of seq_len positions; attention factor sqrt(1 + ln(factor) / ln(original)) unless given."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = config_dir(tmp_path, "m", model_type="llama", head_dim=24, hidden_size=48,
                        rope_parameters={"rope_theta": 10000.0, **LONGROPE[name]})
    spec = load_model_spec(folder)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["longrope"](AutoConfig.from_pretrained(folder), torch.device("cpu"),
                                                            seq_len=seq_len)
    np.testing.assert_allclose(spec.rope.inv_freq(24, seq_len), want_inv.numpy(), rtol=1e-6, atol=0)
    assert spec.rope.attention_factor == pytest.approx(want_factor, rel=1e-12) and want_factor > 1
    assert not np.allclose(spec.rope.inv_freq(24, 32), spec.rope.inv_freq(24, 33))


@pytest.mark.parametrize("rope, message", [
    (dict(rope_type="longrope", factor=4.0, short_factor=[1.0] * 3, long_factor=[2.0] * 4),
     r"longrope short_factor must be 4 positive numbers \(one per rotary pair of head_dim 8\), got \[1.0, 1.0"),
    (dict(rope_type="dynamic", factor=2.0), r"rope scaling 'dynamic' is unsupported \(default, linear, llama3, "
                                            r"yarn, longrope\)"),
    (dict(rope_type="yarn", factor=4.0, partial_rotary_factor=0.5), r"partial_rotary_factor 0.5 is unsupported"),
    (dict(rope_type="linear"), r"rope scaling 'linear' needs a factor"),
], ids=["longrope-wrong-length", "dynamic", "yarn-partial-rotary", "linear-without-factor"])
def test_rope_not_computed_is_refused_by_name(tmp_path, rope, message):
    with pytest.raises(UnsupportedModelError, match=message):
        load_model_spec(config_dir(tmp_path, "m", model_type="llama", rope_parameters={"rope_theta": 1e4, **rope}))
