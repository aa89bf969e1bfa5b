from __future__ import annotations

import importlib

import pytest

import devicekit


def test_all_is_sorted_and_complete() -> None:
    assert devicekit.__all__ == sorted(devicekit.__all__)
    assert len(set(devicekit.__all__)) == len(devicekit.__all__)
    for name in devicekit.__all__:
        assert hasattr(devicekit, name), name


def test_public_names_are_exported() -> None:
    # Identifiers only: pytest's assertion rewriting adds `@py_builtins` to a plugin's package.
    public = {name for name in vars(devicekit) if name.isidentifier() and name[0] != "_"}
    # `devicekit.testing` is a public submodule, an attribute once something imported it.
    allowed = {"annotations", "testing"}
    assert public - set(devicekit.__all__) - allowed == set()


def test_every_lazy_export_is_in_all_and_resolves() -> None:
    lazy = set(devicekit._MODULE_OF)
    assert lazy | {"__version__"} == set(devicekit.__all__)
    for name, module in devicekit._MODULE_OF.items():
        assert getattr(devicekit, name) is getattr(importlib.import_module(module), name), name


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="module 'devicekit' has no attribute 'to_gpu'"):
        devicekit.to_gpu  # type: ignore[attr-defined]  # noqa: B018


def test_errors_share_one_root() -> None:
    for name in devicekit.__all__:
        value = getattr(devicekit, name)
        if isinstance(value, type) and issubclass(value, Warning):
            assert issubclass(value, devicekit.DevicekitWarning), name
        elif isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, devicekit.DevicekitError), name


def test_version() -> None:
    assert isinstance(devicekit.__version__, str)
    assert devicekit.__version__ != "0+unknown"
