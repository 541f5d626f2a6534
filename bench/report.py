"""What the benchmark scripts share around their measurements: JSON lines printed (and appended to a file, so a
device call that is cut short still leaves every finished row), the loop over backends that records a missing
wgpu adapter as skipped instead of failing the whole run, and the interleaved timing of several kinds of step."""
from __future__ import annotations

import json
import time
from collections.abc import Callable


class JsonLines:
    """emit(obj): one JSON line on stdout, and on `path` (appended, flushed) where one is given."""

    def __init__(self, path: str | None):
        self.sink = open(path, "a") if path else None   # noqa: SIM115 — closed by close()/the with block

    def emit(self, obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if self.sink:
            self.sink.write(line + "\n")
            self.sink.flush()

    def close(self) -> None:
        if self.sink:
            self.sink.close()

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def each_backend(kinds: list[str], run: Callable[[str], dict]) -> dict:
    """{kind: run(kind)} for "cpu" / "wgpu"; wgpu without an adapter is {"skipped": why}."""
    results = {}
    for kind in kinds:
        if kind == "wgpu":
            from engine.backends.wgpu.context import GpuContext, NoAdapterError
            try:
                GpuContext.create()
            except NoAdapterError as exc:
                results[kind] = {"skipped": f"no wgpu adapter: {exc}"}
                continue
        results[kind] = run(kind)
    return results


def interleaved_times(steps: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds of each call of each kind: two warm-up calls per kind, then `rounds` rounds in which every kind runs
    `per_round` times in turn (interleaved, so a clock or thermal drift reaches every kind alike)."""
    times = {k: [] for k in steps}
    for step in steps.values():
        for _ in range(2):
            step()
    for _ in range(rounds):
        for kind, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                times[kind].append(time.perf_counter() - start)
    return times
