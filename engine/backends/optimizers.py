"""Numpy optimizers for the CPU backend, and the twins the WGSL optimizer kernels are tested against.

All three work on one flat float32 vector: the parameters of a step are concatenated in the dict's order, so
their state (`m`, `v`, codes and scales) has exactly the layout of shaders/optimizer.wgsl's buffers and a
checkpoint moves between backends unchanged. Arithmetic follows torch.optim (single-tensor path) in float32:
  AdamW  p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = b2 v + (1-b2) g^2;
         p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
  SGD    p *= 1 - lr*wd;  p -= lr g        (decay decoupled like AdamW's, unlike torch.optim.SGD's)
  AdamW 8-bit: as AdamW, but between steps m and sqrt(v) are kept as 8-bit codes into bitsandbytes' dynamic
         maps with one absmax scale per block of `block_size` values (see `dynamic_map`, HostAdamW8bit).
Clipping and the non-finite guard are the caller's: `global_grad_norm`, `clip_scale`, then `step(...,
grad_scale=clip)`, or no step at all when the loss or the norm is not finite.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.backends.base import OptimizerConfig

F32 = np.float32
# Values per in-place chunk: 512 KiB per operand, so p, g, m, v and a scratch stay in L2 (measured on the 135M
# shape's 4.9M values, 2 threads: 8 ms a step; 32k-value chunks took 12.6, the per-call overhead holding the GIL).
UPDATE_CHUNK = 1 << 17


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic (tree) quantisation map, 256 sorted float32 values in [-1, 1] or [0, 1].

    Why this map and not a linear one: v spans many decades inside a block, and a linear 8-bit v rounds every
    value below absmax/510 to 0, after which m / (sqrt(0) + eps) makes a huge step. This map keeps 7 decades:
    decade i (scale 10^(i-6)) holds 2^i (signed, per sign) or 2^(i+1) (unsigned) evenly spaced midpoints of
    [0.1, 1], plus 0 and 1. Re-derived from bitsandbytes.functional.create_dynamic_map(signed, 7, 8).
    """
    values = [0.0, 1.0]
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += list(10.0 ** (i - 6) * means)
        if signed:
            values += list(-(10.0 ** (i - 6)) * means)
    assert len(values) == 256
    return np.sort(np.array(values, np.float32))


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)


def quantise(x: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """uint8 code of the nearest map entry (ties to the lower code), exactly as optimizer.wgsl's `quantise`."""
    lo = np.clip(np.searchsorted(qmap, x, side="right") - 1, 0, 255)
    up = np.minimum(lo + 1, 255)
    return np.where(x - qmap[lo] > qmap[up] - x, up, lo).astype(np.uint8)


def global_grad_norm(grads) -> float:
    """L2 norm over every gradient array: float32 dot products (no float64 copy of a large gradient) summed in
    float64; inf or nan when any entry is."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads))


def clip_scale(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 1 when max_norm is 0."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    return 1.0 - beta1 ** step, 1.0 - beta2 ** step


class HostOptimizer(ABC):
    """Updates float32 parameter arrays in place from same-shaped gradients; state is flat as on the GPU."""

    size_key: str | None        # the state entry whose length is P

    def __init__(self, config: OptimizerConfig, size: int | None = None, threads: int = 1):
        """`threads`: how many threads an update may use (the element-wise optimizers split the vector)."""
        self.config = config
        self.threads = max(1, threads)
        self.step_count = 0
        self.size: int | None = None        # P, fixed by `reserve`, the first step or load_state
        if size is not None:
            self.reserve(size)

    def reserve(self, size: int) -> None:
        """Size the state for `size` parameters now, so that state() already works before any step."""
        if self.size is not None and self.size != size:
            raise ValueError(f"this optimizer holds state for {self.size} values; asked to reserve {size}")
        if self.size is None:
            self.size = size
            self._init_state(size)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float,
             grad_scale: float = 1.0) -> None:
        if params.keys() != grads.keys():
            raise ValueError(f"params and grads name different tensors: {sorted(params.keys() ^ grads.keys())}")
        for name, p in params.items():
            if p.dtype != F32 or grads[name].shape != p.shape:
                raise ValueError(f"{name}: expected float32 params and grads of one shape, got {p.dtype} "
                                 f"{p.shape} and {grads[name].shape}")
        flat_p = np.concatenate([p.ravel() for p in params.values()]) if params else np.zeros(0, F32)
        flat_g = np.concatenate([grads[n].ravel().astype(F32) for n in params]) if params else np.zeros(0, F32)
        self.step_flat(flat_p, flat_g, lr, grad_scale)
        offset = 0
        for p in params.values():
            p[...] = flat_p[offset:offset + p.size].reshape(p.shape)
            offset += p.size

    def step_flat(self, flat_p: np.ndarray, flat_g: np.ndarray, lr: float, grad_scale: float = 1.0) -> None:
        """`step` on parameters and gradients already laid out as one contiguous float32 vector each: no
        copies. `flat_p` is updated in place; `flat_g` is scaled in place by `grad_scale` (it is scratch)."""
        if flat_p.dtype != F32 or flat_g.dtype != F32 or flat_p.shape != flat_g.shape or flat_p.ndim != 1:
            raise ValueError(f"expected two float32 vectors of one length, got {flat_p.dtype}{list(flat_p.shape)} "
                             f"and {flat_g.dtype}{list(flat_g.shape)}")
        if self.size is None:
            self.reserve(flat_p.size)
        elif flat_p.size != self.size:
            raise ValueError(f"this optimizer holds state for {self.size} values; the step passed {flat_p.size}")
        self.step_count += 1
        self._update(flat_p, flat_g, float(lr), F32(grad_scale))

    def state(self) -> dict[str, np.ndarray]:
        return {"step": np.array(self.step_count, np.int64), **{k: v.copy() for k, v in self._state().items()}}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        expected = {"step", *self._state_shapes(0)}
        if set(state) != expected:
            raise ValueError(f"optimizer state has keys {sorted(state)}; expected {sorted(expected)}")
        if self.size_key is not None:           # SGD has no state to size itself by
            self.size = int(np.asarray(state[self.size_key]).size)
            self._init_state(self.size)
            for key, (shape, dtype) in self._state_shapes(self.size).items():
                value = np.asarray(state[key])
                if value.shape != shape or value.dtype != dtype:
                    raise ValueError(f"optimizer state {key!r} is {value.dtype}{list(value.shape)}; "
                                     f"expected {np.dtype(dtype)}{list(shape)}")
                self._state()[key][...] = value
        self.step_count = int(state["step"])

    @abstractmethod
    def _init_state(self, size: int) -> None: ...

    @abstractmethod
    def _state(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _state_shapes(self, size: int) -> dict[str, tuple[tuple[int, ...], type]]: ...

    @abstractmethod
    def _update(self, p: np.ndarray, g: np.ndarray, lr: float, grad_scale: np.float32) -> None:
        """Update p in place from g·grad_scale (g may be overwritten)."""


class HostAdamW(HostOptimizer):
    size_key = "m"

    def _init_state(self, size):
        self.m, self.v = np.zeros(size, F32), np.zeros(size, F32)

    def _state(self):
        return {"m": self.m, "v": self.v}

    def _state_shapes(self, size):
        return {"m": ((size,), F32), "v": ((size,), F32)}

    def _update(self, p, g, lr, grad_scale):
        """The formula of the module doc, chunk by chunk in place: every operand of a chunk stays in the
        cache and no temporary the size of P is allocated (whole-vector numpy temporaries made this update
        70-450 ms per step on the 135M model's 4.9M LoRA values, mostly page faults; chunked it is ~12 ms on
        one thread). Same float32 operations in the same order as the whole-vector form, so the results are
        identical; `threads` contiguous spans run at once (numpy releases the GIL inside each operation)."""
        c = self.config
        bc1, bc2 = bias_corrections(c.beta1, c.beta2, self.step_count)
        constants = (grad_scale, F32(1.0 - lr * c.weight_decay), F32(1.0 - c.beta1), F32(c.beta2),
                     F32(1.0 - c.beta2), F32(math.sqrt(bc2)), F32(c.eps), F32(lr / bc1))
        spans = split_spans(p.size, self.threads)
        if len(spans) == 1:
            self._update_span(p, g, spans[0], constants)
        else:
            list(_pool(len(spans)).map(lambda span: self._update_span(p, g, span, constants), spans))

    def _update_span(self, p, g, span: tuple[int, int], constants) -> None:
        scale, decay, keep_m, b2, new_v, sqrt_bc2, eps, step_size = constants
        scratch = np.empty(min(span[1] - span[0], UPDATE_CHUNK), F32)
        for start in range(span[0], span[1], UPDATE_CHUNK):
            part = slice(start, min(start + UPDATE_CHUNK, span[1]))
            pc, gc, mc, vc = p[part], g[part], self.m[part], self.v[part]
            t = scratch[:pc.size]
            gc *= scale                                       # clipping
            pc *= decay                                       # p *= 1 - lr*wd
            np.subtract(gc, mc, out=t)
            t *= keep_m
            mc += t                                           # m += (1-b1)(g - m)
            np.multiply(gc, gc, out=t)
            t *= new_v
            vc *= b2
            vc += t                                           # v = b2 v + (1-b2) g²
            np.sqrt(vc, out=t)
            t /= sqrt_bc2
            t += eps                                          # denom = sqrt(v)/sqrt(bc2) + eps
            np.divide(mc, t, out=t)
            t *= step_size
            pc -= t                                           # p -= lr/bc1 · m/denom


def split_spans(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) spans covering 0..size, at most `parts`, each a whole number of UPDATE_CHUNKs but the last."""
    chunks = -(-size // UPDATE_CHUNK)
    parts = max(1, min(parts, chunks))
    bounds = [min(size, (chunks * i // parts) * UPDATE_CHUNK) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [(0, size)]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-lab-optimizer")
    return _POOLS[workers]


class HostSGD(HostOptimizer):
    size_key = None

    def _init_state(self, size):
        pass

    def _state(self):
        return {}

    def _state_shapes(self, size):
        return {}

    def _update(self, p, g, lr, grad_scale):
        g *= grad_scale
        p *= F32(1.0 - lr * self.config.weight_decay)
        p -= F32(lr) * g


class HostAdamW8bit(HostOptimizer):
    """Block-wise 8-bit AdamW: the numpy twin of optimizer.wgsl's adamw8bit_update, value for value.

    As bitsandbytes: dequantise, update the moments and the parameters in f32, requantise with the blocks' new
    absmax. Unlike bitsandbytes, the second moment is stored as sqrt(v) (codes of sqrt(v) / max sqrt(v)):
    the map's 7 decades then cover 14 decades of v. Storing v itself rounded v to 0 for values with gradients
    ~4 decades below the block's largest while m stayed non-zero, and m / (0 + eps) steps made a toy quadratic
    diverge (tests/backends/test_optimizers.py); with sqrt(v) it tracks f32 AdamW to a few percent.
    """

    size_key = "m_codes"

    def _blocks(self, size):
        return -(-size // self.config.block_size)

    def _init_state(self, size):
        nb = self._blocks(size)
        # Codes 0 with scale 0 dequantise to 0: a fresh state is all zeros whatever code 0 means.
        self.m_codes, self.v_codes = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
        self.m_scale, self.v_scale = np.zeros(nb, F32), np.zeros(nb, F32)

    def _state(self):
        return {"m_codes": self.m_codes, "v_codes": self.v_codes, "m_scale": self.m_scale, "v_scale": self.v_scale}

    def _state_shapes(self, size):
        nb = self._blocks(size)
        return {"m_codes": ((size,), np.uint8), "v_codes": ((size,), np.uint8),
                "m_scale": ((nb,), F32), "v_scale": ((nb,), F32)}

    def _update(self, p, g, lr, grad_scale):
        g *= grad_scale
        c, n, bs = self.config, p.size, self.config.block_size
        nb = self._blocks(n)
        pad = nb * bs - n

        def blocks(x):
            return np.concatenate([x, np.zeros(pad, x.dtype)]).reshape(nb, bs)

        gb = blocks(g)
        m_old = SIGNED_MAP[blocks(self.m_codes)] * self.m_scale[:, None]
        r_old = UNSIGNED_MAP[blocks(self.v_codes)] * self.v_scale[:, None]     # sqrt(v), see class doc
        v_old = r_old * r_old
        m = m_old + F32(1.0 - c.beta1) * (gb - m_old)
        v = F32(c.beta2) * v_old + F32(1.0 - c.beta2) * gb * gb
        bc1, bc2 = bias_corrections(c.beta1, c.beta2, self.step_count)
        upd = F32(F32(lr) / F32(bc1)) * m / (np.sqrt(v) / np.sqrt(F32(bc2)) + F32(c.eps))
        p[...] = p * F32(1.0 - lr * c.weight_decay) - upd.ravel()[:n]
        r = np.sqrt(v)
        m_scale, v_scale = np.abs(m).max(axis=1), r.max(axis=1)
        m_inv = np.where(m_scale > 0, F32(1.0) / np.where(m_scale > 0, m_scale, F32(1.0)), F32(0.0))
        v_inv = np.where(v_scale > 0, F32(1.0) / np.where(v_scale > 0, v_scale, F32(1.0)), F32(0.0))
        self.m_codes[...] = quantise(m * m_inv[:, None], SIGNED_MAP).ravel()[:n]
        self.v_codes[...] = quantise(r * v_inv[:, None], UNSIGNED_MAP).ravel()[:n]
        self.m_scale[...], self.v_scale[...] = m_scale, v_scale


def make_host_optimizer(config: OptimizerConfig, size: int | None = None, threads: int = 1) -> HostOptimizer:
    """The optimizer `config` names; `size` (the number of parameters) sizes its state up front."""
    return {"adamw": HostAdamW, "adamw8bit": HostAdamW8bit, "sgd": HostSGD}[config.name](config, size, threads)
