"""The weight check that stops a run before any backend is built (engine.model.weights.check_weights_fit) accepts
every supported architecture's own weights, lists exactly the tensors they hold, and refuses a missing one by
name. (OLMo 2 was once refused here: this check and the WGSL buffers each kept their own list of block tensors.)"""
import pytest

from engine.model.spec import load_model_spec
from engine.model.weights import check_weights_fit, expected_shapes, open_weights

FIXTURES = ("tiny_llama_dir", "tiny_gemma2_dir", "tiny_gemma3_dir", "tiny_granite_dir", "tiny_olmo2_dir",
            "tiny_smollm3_dir", "tiny_phi3_dir", "tiny_phi4mini_dir")


@pytest.mark.parametrize("fixture", FIXTURES)
def test_every_architecture_passes_its_own_weights(request, fixture):
    folder = request.getfixturevalue(fixture)
    spec, source = load_model_spec(folder), open_weights(folder)
    check_weights_fit(spec, source)
    stored = source.stored()
    expected = expected_shapes(spec)
    assert {name: tuple(stored[name].shape) for name in expected} == expected


def test_a_missing_block_tensor_is_refused_by_name(tiny_olmo2_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "olmo2"
    shutil.copytree(tiny_olmo2_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    del tensors["model.layers.1.post_feedforward_layernorm.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="model.layers.1.post_feedforward_layernorm.weight"):
        check_weights_fit(load_model_spec(folder), open_weights(folder))
