"""onnxruntime sessions over graphs from model_graph: frozen weights bound from numpy memory (shared by every
session of one backend, never serialised), execution providers chosen from what is installed."""
from __future__ import annotations

import os

import numpy as np

from engine.onnx_backend.graph import Graph

# Providers that run this graph's float32 ops; tried in this order when installed. TensorRT and CoreML are left
# out on purpose: they rebuild engines per shape and do not accept every op used here.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                       "OpenVINOExecutionProvider", "DnnlExecutionProvider", "CPUExecutionProvider")


def cpu_threads() -> int:
    """Cores this process may run on (affinity-aware, so containers and taskset are honoured)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def available_providers(requested: tuple[str, ...] | None = None) -> list[str]:
    import onnxruntime as ort

    installed = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in installed]
        if missing:
            raise ValueError(f"onnxruntime provider(s) {', '.join(missing)} not installed; "
                             f"installed: {', '.join(installed)}")
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in installed]


class GraphSession:
    """One InferenceSession; `run(feeds, outputs)` returns numpy arrays by output name."""

    def __init__(self, graph: Graph, values: dict, threads: int, providers: list[str], prepack: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if not prepack:
            # Eval/logits sessions run rarely: do not hold a second packed copy of every weight for them.
            options.add_session_config_entry("session.disable_prepacking", "1")
        names = list(graph.weights)
        options.add_external_initializers(names, [values[n] for n in names])
        self.session = ort.InferenceSession(graph.model().SerializeToString(), options, providers=providers)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))


def ort_values(weights: dict[str, np.ndarray]) -> dict:
    """OrtValues that alias the numpy arrays (no copy); keep `weights` alive as long as any session."""
    import onnxruntime as ort

    return {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in weights.items()}
