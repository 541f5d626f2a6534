"""`lora-lab hw [--json]`: the hardware report."""
from __future__ import annotations

import json

from engine.backends.hardware import detect


def register(sub) -> None:
    parser = sub.add_parser("hw", help="list GPU adapters (features, limits), CPU and memory")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_hw)


def _fmt_bytes(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def _hw(args) -> int:
    report = detect()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"CPU: {report.cpu_model}, {report.cpu_cores_logical} logical cores "
          f"({report.cpu_cores_physical or 'unknown'} physical)")
    print(f"RAM: {_fmt_bytes(report.ram_bytes)} ({_fmt_bytes(report.ram_available_bytes)} available)")
    for a in report.adapters:
        kind = "software" if a.software else a.adapter_type
        print(f"GPU: {a.name} — {a.backend}, {kind}, driver {a.driver or 'unknown'}, memory {_fmt_bytes(a.memory_bytes)}")
        print(f"     features: {', '.join(a.features) or 'none of interest'}")
        print("     limits: " + ", ".join(f"{k}={v}" for k, v in a.limits.items()))
    for err in report.errors:
        print(f"warning: {err}")
    if not report.adapters:
        print("no wgpu adapter: training will use the CPU backend")
    return 0
