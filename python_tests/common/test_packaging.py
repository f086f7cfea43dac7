"""Packaging: the PEP 561 marker is shipped, the public API carries type hints, and the console
scripts point at importable functions."""
import importlib
import inspect
import os
import typing

import tomllib

import instdisc_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_py_typed_marker_is_in_the_package_and_its_package_data():
    assert os.path.isfile(os.path.join(os.path.dirname(instdisc_kernels.__file__), "py.typed"))
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["instdisc_kernels"]


def _public_callables():
    for name in instdisc_kernels.__all__:
        obj = getattr(instdisc_kernels, name)
        if inspect.isclass(obj):
            for meth in ("__init__", "forward", "update"):
                if meth in vars(obj):
                    yield f"{name}.{meth}", vars(obj)[meth]
        elif inspect.isfunction(obj):
            yield name, obj


def test_public_api_is_annotated():
    seen = []
    for name, fn in _public_callables():
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)          # resolves every annotation (no typo'd names)
        missing = [p for p in sig.parameters if p != "self" and p not in hints]
        assert not missing, f"{name}: parameters without a type hint: {missing}"
        assert "return" in hints, f"{name}: no return type"
        seen.append(name)
    assert {"nce_loss", "knn_accuracy", "InstDiscLoss.forward", "NCEAverage.forward"} <= set(seen)


def test_console_scripts_resolve_to_functions():
    scripts = _pyproject()["project"]["scripts"]
    assert scripts["instdisc-train"] == "instdisc_kernels.train:main"
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
