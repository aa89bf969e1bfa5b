"""NVML's device order filtered by `CUDA_VISIBLE_DEVICES`, the way the CUDA runtime filters it."""

from __future__ import annotations

import ctypes

import pytest

from devicekit import _nvml

UUIDS = ["GPU-aaaa-0000", "GPU-bbbb-1111", "GPU-cccc-2222", "GPU-abcd-3333"]


class FakeNvml:
    """Answers `nvmlDeviceGetUUID` for handles 0..3 like the real library does."""

    def nvmlDeviceGetUUID(
        self, handle: ctypes.c_void_p, buffer: ctypes.Array[ctypes.c_char], size: ctypes.c_uint
    ) -> int:
        buffer.value = UUIDS[handle.value or 0].encode()
        return 0


def visible(monkeypatch: pytest.MonkeyPatch, spec: str | None) -> list[int]:
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    handles = [ctypes.c_void_p(i) for i in range(len(UUIDS))]
    chosen = _nvml._visible(FakeNvml(), handles)  # type: ignore[arg-type]
    return [handle.value or 0 for handle in chosen]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("2", [2]),
        ("3,1", [3, 1]),
        ("1, 2", [1, 2]),
        ("GPU-bbbb", [1]),
        ("GPU-c,0", [2, 0]),
        ("0,7,1", [0]),  # CUDA stops at the first entry it cannot resolve
        ("1,1", [1]),  # and at a repeated one
        ("GPU-a", []),  # an ambiguous UUID prefix resolves nothing
    ],
)
def test_visible_devices_follow_cuda_rules(
    monkeypatch: pytest.MonkeyPatch, spec: str | None, expected: list[int]
) -> None:
    assert visible(monkeypatch, spec) == expected


def test_without_nvml_everything_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_nvml, "_library", lambda: None)
    assert _nvml.visible_devices() is None
    assert _nvml.driver_version() is None
