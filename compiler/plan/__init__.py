"""The resolution of a spec: exact parameters, FLOPs, memory per device, the parallel layout.

`build_plan(spec) -> Plan` is the entry point; `count_params(model_spec)` counts a ModelSpec alone.
Attributes load lazily: `llmc.compiler.spec` imports `plan.hardware` while it is itself being
imported, so this package must not import the spec at import time.
"""

_EXPORTS = {
    "build_plan": ".plan", "Plan": ".plan", "PLAN_VERSION": ".plan",
    "count_params": ".params", "ParamCount": ".params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
