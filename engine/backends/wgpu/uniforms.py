"""Uniform buffers packed by field name from the shader's own struct: the WGSL declaration is the one typed
description, so a Python packer and a shader struct cannot drift apart.

Every uniform struct of the engine holds 32-bit scalars only (u32, i32, f32): each field takes 4 bytes in
declaration order, and the struct is padded to 16 bytes, as WGSL's uniform address space lays it out.
Fields whose names start with `_` are padding and are written as zero.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from engine.backends.wgpu.context import UNIFORM, GpuContext, shader_source

SCALARS = {"u32": np.uint32, "i32": np.int32, "f32": np.float32}
_FIELD = re.compile(r"^\s*(\w+)\s*:\s*(\w+)\s*$")


@dataclass(frozen=True)
class UniformStruct:
    name: str
    fields: tuple[tuple[str, str], ...]   # (name, "u32" | "i32" | "f32") in declaration order

    @property
    def nbytes(self) -> int:
        return -(-4 * len(self.fields) // 16) * 16

    def offset(self, field: str) -> int:
        """Byte offset of a field, for updating one value of a bound uniform in place."""
        for i, (name, _) in enumerate(self.fields):
            if name == field:
                return 4 * i
        raise KeyError(f"struct {self.name} has no field {field!r}")

    def pack(self, **values) -> bytes:
        """The struct's bytes from every non-padding field by name (ValueError naming a missing or unknown one)."""
        names = {name for name, _ in self.fields}
        unknown = sorted(set(values) - names)
        missing = [name for name, _ in self.fields if not name.startswith("_") and name not in values]
        if unknown or missing:
            raise ValueError(f"struct {self.name}: unknown fields {unknown}, missing fields {missing}")
        raw = bytearray(self.nbytes)
        for i, (name, kind) in enumerate(self.fields):
            raw[4 * i:4 * i + 4] = np.array([values.get(name, 0)], SCALARS[kind]).tobytes()
        return bytes(raw)


def parse_struct(source: str, struct: str) -> UniformStruct:
    """The scalar fields of `struct NAME { ... }` in WGSL source (comments allowed)."""
    found = re.search(rf"struct\s+{struct}\s*\{{(.*?)\}}", source, re.S)
    if found is None:
        raise ValueError(f"no struct {struct} in the shader")
    body = re.sub(r"//[^\n]*", "", found.group(1))
    fields = []
    for part in filter(str.strip, body.split(",")):
        match = _FIELD.match(part)
        if match is None or match.group(2) not in SCALARS:
            raise ValueError(f"struct {struct}: field {part.strip()!r} is not a 32-bit scalar (u32, i32, f32)")
        fields.append((match.group(1), match.group(2)))
    return UniformStruct(struct, tuple(fields))


@functools.cache
def uniform_struct(family: str, struct: str) -> UniformStruct:
    """The struct `struct` of shaders/<family>.wgsl."""
    return parse_struct(shader_source(family), struct)


def upload_uniform(ctx: GpuContext, family: str, struct: str, label: str, **values):
    """A uniform buffer holding `struct` of shaders/<family>.wgsl with these field values."""
    raw = uniform_struct(family, struct).pack(**values)
    return ctx.upload(np.frombuffer(raw, np.uint8), label, UNIFORM)
