from __future__ import annotations

import devicekit


def test_all_is_sorted_and_complete() -> None:
    assert devicekit.__all__ == sorted(devicekit.__all__)
    assert len(set(devicekit.__all__)) == len(devicekit.__all__)
    for name in devicekit.__all__:
        assert hasattr(devicekit, name), name


def test_public_names_are_exported() -> None:
    public = {name for name in vars(devicekit) if not name.startswith("_")}
    # `devicekit.testing` is a public submodule, an attribute once something imported it.
    assert public - set(devicekit.__all__) - {"annotations", "testing"} == set()


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
