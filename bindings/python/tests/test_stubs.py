"""The stub fleetlink/_fleetlink.pyi matches the native module: the same public classes,
functions, methods and properties, and the same parameter names (pyo3 writes each method's
``__text_signature__``, which ``inspect.signature`` reads). The stub is parsed with ``ast``, not
imported, so it needs none of the typing packages it names."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

from fleetlink import _fleetlink

STUB = Path(__file__).resolve().parents[1] / "python" / "fleetlink" / "_fleetlink.pyi"
DUNDERS = {"__new__", "__init__", "__len__", "__iter__", "__next__", "__arrow_c_stream__", "__enter__", "__exit__"}


def stub_tree() -> ast.Module:
    if not STUB.exists():
        pytest.fail(f"{STUB} is missing: the native module needs a stub")
    return ast.parse(STUB.read_text(), filename=str(STUB))


def is_public(name: str) -> bool:
    return not name.startswith("_") or name in DUNDERS


def decorators(node: ast.FunctionDef) -> set[str]:
    return {d.id if isinstance(d, ast.Name) else ast.unparse(d) for d in node.decorator_list}


def stub_params(node: ast.FunctionDef, *, method: bool) -> list[tuple[str, bool]]:
    """(name, has a default) for each parameter, without self/cls."""
    a = node.args
    positional = a.posonlyargs + a.args
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    params = list(zip([p.arg for p in positional], defaults))
    if method and "staticmethod" not in decorators(node):
        params = params[1:]
    if a.vararg:
        params.append(("*" + a.vararg.arg, False))
    params += [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append(("**" + a.kwarg.arg, False))
    return params


def runtime_params(obj: Any, *, drop_first: bool) -> list[tuple[str, bool]]:
    params = []
    for p in inspect.signature(obj).parameters.values():
        name = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        params.append((name, p.default is not p.empty))
    return params[1:] if drop_first else params


def stub_classes() -> dict[str, ast.ClassDef]:
    return {n.name: n for n in stub_tree().body if isinstance(n, ast.ClassDef)}


def stub_functions() -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in stub_tree().body if isinstance(n, ast.FunctionDef)}


def runtime_names() -> set[str]:
    names = set()
    for name in dir(_fleetlink):
        if name.startswith("_"):
            continue
        obj = getattr(_fleetlink, name)
        if isinstance(obj, type) or callable(obj):
            names.add(name)
    return names


def members(cls: type) -> dict[str, Any]:
    return {k: v for k, v in vars(cls).items() if is_public(k) and not (k.startswith("__") and k not in DUNDERS)}


def test_the_stub_exists_and_parses() -> None:
    stub_tree()


def test_same_public_classes_and_functions() -> None:
    in_stub = set(stub_classes()) | set(stub_functions())
    at_runtime = runtime_names()
    assert sorted(in_stub - at_runtime) == [], "in the stub but not in the native module"
    assert sorted(at_runtime - in_stub) == [], "in the native module but not in the stub"


def test_module_attributes() -> None:
    annotated = {n.target.id for n in stub_tree().body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert "__version__" in annotated
    assert isinstance(_fleetlink.__version__, str)


@pytest.mark.parametrize("name", sorted(stub_functions()) if STUB.exists() else [])
def test_function_parameters(name: str) -> None:
    node = stub_functions()[name]
    assert stub_params(node, method=False) == runtime_params(getattr(_fleetlink, name), drop_first=False)


@pytest.mark.parametrize("name", sorted(stub_classes()) if STUB.exists() else [])
def test_class_members_match(name: str) -> None:
    node = stub_classes()[name]
    cls = getattr(_fleetlink, name)
    stub_members = {n.name for n in node.body if isinstance(n, ast.FunctionDef) and is_public(n.name)}
    runtime = set(members(cls))
    if "__new__" in stub_members:
        # pyo3's #[new] shows up as the class's own __new__ and text signature
        assert cls.__text_signature__ is not None
        runtime.add("__new__")
    assert sorted(stub_members - runtime) == [], f"{name}: in the stub but not at run time"
    assert sorted(runtime - stub_members) == [], f"{name}: at run time but not in the stub"


@pytest.mark.parametrize("name", sorted(stub_classes()) if STUB.exists() else [])
def test_method_parameters_and_kinds(name: str) -> None:
    node = stub_classes()[name]
    cls = getattr(_fleetlink, name)
    for fn in (n for n in node.body if isinstance(n, ast.FunctionDef) and is_public(n.name)):
        where = f"{name}.{fn.name}"
        if fn.name == "__new__":
            assert stub_params(fn, method=True) == runtime_params(cls, drop_first=False), where
            continue
        static = inspect.getattr_static(cls, fn.name, None)
        assert static is not None, f"{where} is not at run time"
        if "property" in decorators(fn):
            assert inspect.isgetsetdescriptor(static) or isinstance(static, property), f"{where} is a property in the stub only"
            continue
        assert not inspect.isgetsetdescriptor(static), f"{where} is a property at run time, a method in the stub"
        is_static = isinstance(static, staticmethod)
        assert is_static == ("staticmethod" in decorators(fn)), f"{where}: staticmethod in one only"
        runtime = getattr(cls, fn.name)
        assert stub_params(fn, method=True) == runtime_params(runtime, drop_first=not is_static), where
