"""Bind groups with explicit binding numbers, for shader files whose entry points use different bindings.

`GpuContext.bind_group` binds 0..n-1 in order; a family like attention or optimizer declares all its resources
once and each entry point uses a subset (layout="auto" keeps only the ones it uses), so the numbers have gaps.
"""
from __future__ import annotations

from engine.gpu import GpuContext


def bind_numbered(ctx: GpuContext, pipeline, resources: dict, label: str):
    """Bind group for `pipeline` (layout="auto", group 0) with {binding number: whole buffer}."""
    entries = [{"binding": i, "resource": {"buffer": buf, "offset": 0, "size": buf.size}}
               for i, buf in sorted(resources.items())]
    return ctx.device.create_bind_group(label=label, layout=pipeline.get_bind_group_layout(0), entries=entries)
