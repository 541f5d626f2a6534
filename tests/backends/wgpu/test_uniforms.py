"""Uniforms are packed by name from the shader's own struct (engine/backends/wgpu/uniforms.py)."""
import re
from importlib import resources

import numpy as np
import pytest

from engine.backends.wgpu.context import shader_source
from engine.backends.wgpu.uniforms import parse_struct, uniform_struct

SOURCE = """
struct Params {
    rows: u32,     // a comment, with a comma
    scale: f32, offset: i32,
    _pad0: u32, _pad1: u32,
}
"""


def test_fields_parse_in_declaration_order_and_pad_to_16_bytes():
    params = parse_struct(SOURCE, "Params")
    assert params.fields == (("rows", "u32"), ("scale", "f32"), ("offset", "i32"), ("_pad0", "u32"), ("_pad1", "u32"))
    assert params.nbytes == 32 and params.offset("offset") == 8
    raw = np.frombuffer(params.pack(rows=7, scale=0.5, offset=-3), np.uint8)
    assert raw.nbytes == 32 and not raw[12:].any()
    assert raw[0:4].view(np.uint32)[0] == 7 and raw[4:8].view(np.float32)[0] == 0.5
    assert raw[8:12].view(np.int32)[0] == -3


def test_missing_unknown_and_non_scalar_fields_are_named():
    params = parse_struct(SOURCE, "Params")
    with pytest.raises(ValueError, match=r"missing fields \['scale', 'offset'\]"):
        params.pack(rows=1)
    with pytest.raises(ValueError, match=r"unknown fields \['row'\]"):
        params.pack(row=1, rows=1, scale=0.0, offset=0)
    with pytest.raises(ValueError, match="not a 32-bit scalar"):
        parse_struct("struct P { a: vec4<f32>, }", "P")
    with pytest.raises(ValueError, match="no struct Q"):
        parse_struct(SOURCE, "Q")


def test_every_uniform_of_every_shader_is_a_packable_struct():
    """Each `var<uniform> name: Struct` of the shaders parses, so every kernel twin can pack it by name."""
    families = [f.name[:-5] for f in resources.files("shaders").iterdir() if f.name.endswith(".wgsl")]
    seen = 0
    for family in families:
        for struct in re.findall(r"var<uniform>\s+\w+\s*:\s*(\w+)\s*;", shader_source(family)):
            assert uniform_struct(family, struct).nbytes % 16 == 0
            seen += 1
    assert seen >= 10
