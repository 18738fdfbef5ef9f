"""partition_slerp: the Eleusis "9-partition merge" as a mergekit method.

Importing the package is cheap (stdlib only) and guarantees that mergekit's
registry has `partition_slerp` as soon as mergekit's merge methods load.
The heavy names below are imported on first use.
"""

from mergekit_partition_slerp import _autoload  # noqa: F401  (registration hook)

__version__ = "0.1.0"

_LAZY = {
    "partition_slerp": "mergekit_partition_slerp.method",
    "plan": "mergekit_partition_slerp.planning",
    "Plan": "mergekit_partition_slerp.planning",
    "ConfigError": "mergekit_partition_slerp.planning",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
