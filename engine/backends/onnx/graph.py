"""A small ONNX graph builder: unique names, typed inputs/outputs, tiny constants, and frozen weights that stay
in numpy memory (declared as external data and handed to onnxruntime as OrtValues, so no protobuf copy and no
2 GiB limit)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}


@dataclass
class Graph:
    name: str
    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    constants: list = field(default_factory=list)           # small TensorProtos embedded in the model
    weights: dict[str, np.ndarray] = field(default_factory=dict)   # frozen tensors fed from memory
    _ids: itertools.count = field(default_factory=itertools.count, repr=False)
    _const_cache: dict = field(default_factory=dict, repr=False)

    # ---- names and declarations ------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _DTYPES[np.dtype(dtype)], list(shape)))
        return name

    def output(self, value: str, name: str, dtype=np.float32, shape=None) -> None:
        """Expose `value` as graph output `name` (through an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh("out")))
        self.outputs.append(helper.make_tensor_value_info(name, _DTYPES[np.dtype(dtype)], shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A frozen float32 tensor, kept in `weights` and bound at session creation (shared between sessions)."""
        if name not in self.weights:
            self.weights[name] = np.ascontiguousarray(array, dtype=np.float32)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant embedded in the model (shapes, axes, masks, RoPE tables)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh("c")
        self.constants.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._const_cache[key] = name
        return name

    # ---- nodes -----------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: str | None = None, **attrs):
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh("n"), **attrs))
        return names[0] if outputs == 1 else names

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", x, self.const(shape))

    def transpose(self, x: str, perm) -> str:
        return self.op("Transpose", x, perm=list(perm))

    def reduce_sum(self, x: str, axes, keepdims: int = 1) -> str:
        return self.op("ReduceSum", x, self.const(list(axes)), keepdims=keepdims)

    def reduce_mean(self, x: str, axes, keepdims: int = 1) -> str:
        return self.op("ReduceMean", x, self.const(list(axes)), keepdims=keepdims)

    def split(self, x: str, sizes, axis: int) -> list[str]:
        if len(sizes) == 1:
            return [x]
        return self.op("Split", x, self.const(list(sizes)), outputs=len(sizes), axis=axis)

    def concat(self, xs: list[str], axis: int) -> str:
        return xs[0] if len(xs) == 1 else self.op("Concat", *xs, axis=axis)

    def add(self, a: str | None, b: str) -> str:
        """a + b, where a None start means just b (for accumulating gradients)."""
        return b if a is None else self.op("Add", a, b)

    def scalar(self, value: float) -> str:
        return self.const(np.float32(value), np.float32)

    # ---- the model -------------------------------------------------------------------------------------
    def model(self) -> onnx.ModelProto:
        """The ModelProto; frozen weights are declared as in-memory external data (see session.py)."""
        initializers = list(self.constants)
        for name, array in self.weights.items():
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "in-memory"), ("offset", "0"), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == "com.microsoft" for node in self.nodes):   # onnxruntime's fused kernels
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="lora-lab")
        model.ir_version = 9
        return model
