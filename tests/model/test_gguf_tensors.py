"""engine.model.gguf_tensors: a quantized GGUF's tensors read raw, then dequantized, equal transformers' own GGUF
load of the same file in float32 (names, Llama Q/K row order, every bit)."""
import numpy as np
import pytest

from engine.model.gguf_tensors import read_gguf_tensors
from engine.model.weight_formats import WeightFormat, dequantize
from bench.gguf_base import write_gguf_base
from bench.tiny_models import make_model

# (arch, config overrides that make every row a whole number of blocks, formats the 2-D weights take in turn)
CASES = {
    "llama-q8_0": ("llama", dict(hidden_size=96, intermediate_size=160), ("q8_0",)),
    "llama-q4_0-q4_1": ("llama", dict(hidden_size=96, intermediate_size=160), ("q4_0", "q4_1")),
    "qwen2-q4_1-q8_0-bf16": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_attention_heads=2,
                                            num_key_value_heads=1), ("q4_1", "q8_0", "bf16")),
    "llama-k-quants": ("llama", dict(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                                     num_key_value_heads=2), ("q4_k", "q6_k", "q5_k", "f16")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_raw_tensors_dequantize_to_transformers_gguf_load(case, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    arch, overrides, formats = CASES[case]
    make_model(arch, tmp_path / "hf", **overrides)
    path = write_gguf_base(tmp_path / "hf", tmp_path / f"{case}.gguf", formats)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    converted = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        converted.pop("lm_head.weight")   # the same tensor as the embedding: the file stores it once

    seen, stored = set(), set()
    for t in read_gguf_tensors(path):
        want = converted[t.name]
        assert t.shape == want.shape, t.name
        got = dequantize(t.raw, t.format, t.shape)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=t.name)
        assert (t.format in [WeightFormat.parse(f) for f in formats]) == (len(t.shape) == 2), t.name
        stored.add(t.format)
        seen.add(t.name)
        if t.gguf_name.endswith("attn_q.weight") and arch == "llama":
            # The file holds llama.cpp's row order; the reader must have undone it (else this test proves little).
            assert not np.array_equal(got, dequantize(_file_rows(path, t.gguf_name), t.format, t.shape))
        elif arch != "llama" or "attn_k" not in t.gguf_name:
            assert not t.raw.flags.owndata, f"{t.name} was copied, not read from the mapped file"
    assert seen == set(converted)
    assert stored == {WeightFormat.F32} | {WeightFormat.parse(f) for f in formats}


def _file_rows(path, gguf_name):
    from gguf import GGUFReader
    t = next(t for t in GGUFReader(path).tensors if t.name == gguf_name)
    return np.array(t.data).view(np.uint8)


def test_unsupported_tensor_type_is_named(tmp_path):
    import gguf

    make_model("qwen2", tmp_path / "hf", hidden_size=64, intermediate_size=96, num_attention_heads=2,
               num_key_value_heads=1)
    path = write_gguf_base(tmp_path / "hf", tmp_path / "m.gguf")
    # Rewrite one tensor's type id in its header entry (name, n_dims, dims, type): q5_0's 32-weight block fits
    # the rows, and the engine has no q5_0.
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == gguf.GGMLQuantizationType.F32
    # f32 [96, 64] is 24576 bytes; as q5_0 it would be 96·2·22 = 4224: still inside the file, so it reads.
    data[type_at:type_at + 4] = int(gguf.GGMLQuantizationType.Q5_0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight is stored as Q5_0.*Q4_K"):
        list(read_gguf_tensors(path))


def test_gemma_gguf_is_refused_by_its_norm_shift(tmp_path):
    """llama.cpp stores Gemma's norm weights as 1 + w; transformers' loader subtracts 1 from dequantized values,
    which raw bytes cannot take: refused before anything is read, naming why."""
    import gguf

    path = tmp_path / "g.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gemma3 GGUF stores its norm weights as 1 \+ w"):
        list(read_gguf_tensors(path))
