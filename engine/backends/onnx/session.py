"""onnxruntime sessions over graphs from model_graph: frozen weights bound from numpy memory (shared by every
session of one backend, never serialised), execution providers chosen from what is installed."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.backends.onnx.graph import Graph

# Providers that run this graph's float32 ops; tried in this order when installed. TensorRT and CoreML are left
# out on purpose: they rebuild engines per shape and do not accept every op used here.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                       "OpenVINOExecutionProvider", "DnnlExecutionProvider", "CPUExecutionProvider")


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


# Every session is created and run on this one thread: onnxruntime switches the calling thread to
# flush-denormals-to-zero (see below), and that must not leak into the caller's numpy/torch arithmetic.
_ORT_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-lab-onnxruntime")


class GraphSession:
    """One InferenceSession; `run(feeds, outputs)` returns numpy arrays by output name."""

    def __init__(self, graph: Graph, values: dict, threads: int, providers: list[str], prepack: bool = True,
                 profile_prefix: str | None = None):
        """`profile_prefix`: record onnxruntime's per-node profile (see end_profiling)."""
        _ORT_THREAD.submit(self._create, graph, values, threads, providers, prepack, profile_prefix).result()

    def _create(self, graph: Graph, values: dict, threads: int, providers: list[str], prepack: bool,
                profile_prefix: str | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The memory-pattern planner made the second run as slow as the first (it re-plans one big block and
        # faults it in) and held ~0.5 GB more at the 135M shape; the arena alone reuses its blocks from run 2 on.
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        # Softmax rows of a causal mask and of a 50k vocabulary underflow to denormals, which the CPU handles
        # ~6x slower (measured: masked softmax 1.3 ms -> 0.18 ms); values below 1e-38 do not change any result.
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        if not prepack:
            # Eval/logits sessions run rarely: do not hold a second packed copy of every weight for them.
            options.add_session_config_entry("session.disable_prepacking", "1")
        names = list(graph.weights)
        options.add_external_initializers(names, [values[n] for n in names])
        self.session = ort.InferenceSession(graph.model().SerializeToString(), options, providers=providers)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, _ORT_THREAD.submit(self.session.run, names, feeds).result()))

    def end_profiling(self) -> str:
        """Stop profiling; the path of the JSON trace (Chrome trace format) onnxruntime wrote."""
        return _ORT_THREAD.submit(self.session.end_profiling).result()

    def binding(self) -> "Binding":
        return Binding(self)


def _bind(bind, name: str, array: np.ndarray) -> None:
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: only C-contiguous arrays can be bound")
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class Binding:
    """Inputs and outputs bound to numpy memory by address: no copies in or out, and the bindings persist, so
    arrays updated in place (LoRA tensors after an optimizer step) are read as they are at the next run.
    Every bound array must stay alive (and keep its address) while bound."""

    def __init__(self, graph_session: GraphSession):
        self._session = graph_session.session
        self._binding = self._session.io_binding()
        self._keep: dict[str, np.ndarray] = {}

    def inputs(self, arrays: dict[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            _bind(self._binding.bind_input, name, array)
            self._keep[f"in:{name}"] = array

    def outputs(self, arrays: dict[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            _bind(self._binding.bind_output, name, array)
            self._keep[f"out:{name}"] = array

    def run(self) -> None:
        _ORT_THREAD.submit(self._session.run_with_iobinding, self._binding).result()


def ort_values(weights: dict[str, np.ndarray]) -> dict:
    """OrtValues that alias the numpy arrays (no copy); keep `weights` alive as long as any session."""
    import onnxruntime as ort

    return {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in weights.items()}
