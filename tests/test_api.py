"""The public surface: every public function and method of the s2h modules is typed (each
parameter and the return), read from the signatures themselves."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import s2h


def _public_callables():
    for info in pkgutil.iter_modules(s2h.__path__, "s2h."):
        if info.name in ("s2h.__main__", "s2h._C"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if inspect.isfunction(obj):
                yield f"{info.name}.{name}", obj
            elif inspect.isclass(obj):
                for mname, f in vars(obj).items():
                    if mname.startswith("_") and mname != "__init__":
                        continue
                    if isinstance(f, property):
                        f = f.fget
                    if isinstance(f, (staticmethod, classmethod)):
                        f = f.__func__
                    if inspect.isfunction(f):
                        yield f"{info.name}.{name}.{mname}", f


def test_every_public_function_and_method_is_typed():
    missing, checked = [], 0
    for qual, f in _public_callables():
        sig = inspect.signature(f)
        checked += 1
        for p in sig.parameters.values():
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                missing.append(f"{qual}({p.name})")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{qual} -> ?")
    assert checked > 150, checked  # the walk really sees the package
    assert not missing, "untyped: " + ", ".join(missing)
