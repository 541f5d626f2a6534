"""The CPU training backend: the LoRA training step as an ONNX graph (forward, cross-entropy and a hand-written
backward into the LoRA gradients) run by onnxruntime. `OnnxBackend` implements engine.backends.base.TrainingBackend."""
from engine.backends.onnx.backend import OnnxBackend

__all__ = ["OnnxBackend"]
