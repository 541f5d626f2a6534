"""The GEMM autotune: which tile each product of a model runs fastest with on this GPU, and whether a product of
few tiles is faster split over K or not, measured once and kept on disk per adapter, driver, wgpu version and
shader text.

Why measured rather than chosen by rule: which of the three tiles (kernels.linear.TILES) wins depends on the
product's shape, the GEMM family and the GPU, and no rule fitted the H200's figures everywhere
(bench/results/matmul-h200-trusted.json: 128×128 wins at 4096×1024×1024, 25.4 against 20.9 TFLOP/s for 128×64,
and loses at 512×1024×1024, 5.0 against 13.3 for 64×64; the f16-math family often prefers 64×64 where the f32
one prefers 128×128). kernels.linear.choose_tile stays the rule where nothing is measured: software adapters
(lavapipe: timing a CPU rasteriser says nothing about a GPU), LORA_LAB_GEMM_TUNE=0, and products whose output
exceeds the timing scratch.

How: a product is timed with its real operands A and B (only read) and a scratch C (so no buffer of the model is
written): every candidate compiled first, then each timed for a few milliseconds' worth of dispatches, round-robin,
best of three. A product the rule would split over K (kernels.linear.split_k) is timed with each tile both split
(its reduction included; the backend's partials scratch is free while the model is built) and whole: at small
batches a split LoRA product's reduction is a second dispatch for little work. The scratch is one buffer, freed by
`release()` once the model is built, and it and the trial products' uniforms are left out of
GpuContext.bytes_allocated: the memory plan counts what stays allocated.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import wgpu

from engine.backends.hardware import adapter_is_software
from engine.model.references import data_dir

TUNE_ENV = "LORA_LAB_GEMM_TUNE"   # "0": never measure; "1": measure even on a software adapter (tests)
CACHE_FILE = "gemm-tuning.json"   # in the data dir: {adapter identity: {product key: [rows, columns, split]}}
SCRATCH_BYTES = 64 << 20          # the largest C a product may have to be timed (else the rule's tile)
TARGET_SECONDS = 0.004            # GPU time per timed submit
ROUNDS = 3                        # timed submits per candidate (round-robin over the candidates; the best counts)
SHADERS = ("linear", "linear_f16", "gemm_common", "weight_formats")   # their text is part of the identity


def adapter_identity(ctx) -> str:
    """Adapter, driver, wgpu version, shader text and runtime checks: a change of any may change the winner."""
    from engine.backends.wgpu.context import SHADER_CHECKS_ENV, shader_source
    info = ctx.adapter.info
    shaders = hashlib.sha1("".join(shader_source(s) for s in SHADERS).encode()).hexdigest()[:12]
    checks = "checked" if os.environ.get(SHADER_CHECKS_ENV) == "1" else "trusted"
    return (f"{info.get('device', '?')} | {info.get('backend_type', '?')} | {info.get('description', '?')} | "
            f"wgpu {wgpu.__version__} | shaders {shaders} | {checks}")


def round_robin_seconds(products: dict, submit: Callable[[object, int], float], target_seconds: float,
                        rounds: int = ROUNDS, repeat_range: tuple[int, int] = (1, 64)) -> dict:
    """Seconds per run of each of `products` (already built, so compiled): each submitted once, then its repeats
    for ~target_seconds estimated, then all timed round-robin, the best of `rounds` submits kept.
    submit(product, repeats) -> seconds per run. Why so: timing each candidate right after its own compile
    measured it 2-5× slow at random on the H200 (the clocks drop while the CPU compiles), so whichever was built
    first lost. The autotune and bench/matmul.py's sweep both time this way."""
    low, high = repeat_range
    repeats = {}
    for key, product in products.items():
        submit(product, 1)
        repeats[key] = max(low, min(high, int(target_seconds / max(submit(product, 1), 1e-6))))
    times = {key: float("inf") for key in products}
    for _ in range(rounds):
        for key, product in products.items():
            times[key] = min(times[key], submit(product, repeats[key]))
    return times


@dataclass
class GemmTuner:
    """Chosen variants (tile, split) by product key for one adapter; `choose()` measures what the file
    does not hold yet."""
    ctx: object                      # GpuContext
    path: Path
    identity: str
    table: dict = field(default_factory=dict)   # product key -> the chosen candidate as a list
    measured: int = 0                # products this tuner timed (the rest came from the file)
    failed: bool = False             # a measurement failed (say, no memory for the scratch): the rule decides
    _scratch: object = None
    _unsaved: bool = False           # measured tiles not yet in the file (release() writes them)

    @classmethod
    def for_context(cls, ctx, path: Path | None = None) -> "GemmTuner | None":
        """The tuner of a real GPU (None on a software adapter, or where LORA_LAB_GEMM_TUNE=0)."""
        wanted = os.environ.get(TUNE_ENV)
        if wanted == "0" or (adapter_is_software(ctx.adapter.info) and wanted != "1"):
            return None
        path = path or data_dir() / CACHE_FILE
        identity = adapter_identity(ctx)
        try:
            table = json.loads(path.read_text(encoding="utf-8")).get(identity, {})
        except (OSError, ValueError, AttributeError):
            table = {}   # no file yet, or an unreadable one: measure again and rewrite it
        return cls(ctx, path, identity, dict(table))

    def choose(self, key: str, output_floats: int, build: Callable[[object, tuple[int, ...]], object],
               candidates: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
        """The fastest of `candidates` (flat tuples of ints: kernels.linear's (rows, columns, split)) for product
        `key`: from the file, else timed on `build(scratch_c, candidate)` (the product writing the scratch instead
        of its C). None where C is too big to time."""
        kept = tuple(self.table.get(key, ()))
        if kept in candidates:      # (an entry naming a variant this version lacks is measured again)
            return kept
        if 4 * output_floats > SCRATCH_BYTES or self.failed:
            return None
        before = self.ctx.bytes_allocated
        try:
            times = round_robin_seconds({choice: build(self._scratch_buffer(), choice) for choice in candidates},
                                        self._submit, TARGET_SECONDS)
        except Exception:  # noqa: BLE001 — e.g. no memory left for the scratch: tuning only speeds things up
            self.failed = True    # so the rule decides, for this and every later product of this process
            self.release()
            return None
        finally:
            self.ctx.bytes_allocated = before   # the trial products' uniforms are garbage once timed
        best = min(times, key=times.get)
        self.table[key] = list(best)
        self.measured += 1
        self._unsaved = True
        return best

    def release(self) -> None:
        """The model is built: write what was measured (once, not per product) and free the timing scratch."""
        if self._unsaved:
            self._save()
            self._unsaved = False
        if self._scratch is not None:
            self._scratch.destroy()
            self._scratch = None

    def _scratch_buffer(self):
        if self._scratch is None:
            self._scratch = self.ctx.device.create_buffer(label="gemm_tuning.c", size=SCRATCH_BYTES,
                                                          usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
        return self._scratch

    def _wait(self) -> None:
        self.ctx.read(self._scratch, count=1)

    def _submit(self, product, repeats: int) -> float:
        start = time.perf_counter()
        enc = self.ctx.encoder("gemm_tuning")
        for _ in range(repeats):
            product.encode(enc)
        enc.submit()
        self._wait()
        return (time.perf_counter() - start) / repeats


    def _save(self) -> None:
        """Merge this adapter's table into the file (other adapters' entries kept), written whole then renamed."""
        try:
            everything = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(everything, dict):
                everything = {}
        except (OSError, ValueError):
            everything = {}
        everything[self.identity] = self.table
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".tmp")
            partial.write_text(json.dumps(everything, indent=1, sort_keys=True), encoding="utf-8")
            partial.replace(self.path)
        except OSError:
            pass   # a read-only data dir: the tiles still hold for this process, and are measured again next time
