"""Make plain `mergekit-yaml` find `partition_slerp` (DESIGN §5).

mergekit has no plugin discovery. `mergekit_partition_slerp.pth` imports this
module at interpreter startup; it must stay stdlib-only and cheap. It puts a
finder on sys.meta_path that waits for `mergekit.merge_methods` to finish
executing and then imports our method module, which registers itself.
"""

import sys

_TARGET = "mergekit.merge_methods"
_METHOD = "mergekit_partition_slerp.method"


def _register() -> None:
    # import_module, not `from ... import`: a user importing the method module
    # first must not hit a half-initialised circular import.
    import importlib

    importlib.import_module(_METHOD)


class _Finder:  # a MetaPathFinder; importlib.abc costs startup time
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        import importlib.util  # not at startup: it pulls in `warnings`

        try:
            spec = importlib.util.find_spec(fullname)
        except Exception:
            return None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
