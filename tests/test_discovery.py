from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import devicekit
from devicekit import DeviceUnavailableError, InvalidDeviceSpecError

GiB = 2**30


class TestAsDeviceOnThisMachine:
    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("cpu", torch.device("cpu")),
            ("cpu:0", torch.device("cpu")),
            ("meta", torch.device("meta")),
            ("meta:0", torch.device("meta")),
            (torch.device("cpu"), torch.device("cpu")),
            (torch.device("cpu", 0), torch.device("cpu")),
        ],
    )
    def test_normalises(self, spec: devicekit.DeviceLike, expected: torch.device) -> None:
        assert devicekit.as_device(spec) == expected
        assert devicekit.as_device(spec).index is None

    @pytest.mark.parametrize("spec", ["cuda:x", "cuda:-1", "tpu9", "", " cpu", "CUDA", "cuda:01"])
    def test_malformed_strings(self, spec: str) -> None:
        with pytest.raises(InvalidDeviceSpecError) as info:
            devicekit.as_device(spec)
        assert info.value.spec == spec
        assert str(info.value).startswith(f"as_device({spec!r}): ")
        assert "Expected 'auto', 'cpu', 'meta'" in str(info.value)

    @pytest.mark.parametrize("spec", [3.5, True, b"cpu", ["cpu"]])
    def test_wrong_types(self, spec: object) -> None:
        with pytest.raises(InvalidDeviceSpecError, match=r"got a (float|bool|bytes|list)\."):
            devicekit.as_device(spec)  # type: ignore[arg-type]

    def test_negative_int(self) -> None:
        with pytest.raises(InvalidDeviceSpecError, match="cannot be negative"):
            devicekit.as_device(-1)

    def test_index_beyond_torch_range(self) -> None:
        with pytest.raises(InvalidDeviceSpecError, match="device index 200 is larger than 127"):
            devicekit.as_device("cuda:200", check=False)

    def test_errors_are_builtin_subclasses(self) -> None:
        assert issubclass(InvalidDeviceSpecError, ValueError)
        assert issubclass(DeviceUnavailableError, RuntimeError)
        assert issubclass(InvalidDeviceSpecError, devicekit.DevicekitError)

    def test_none_is_current_device(self) -> None:
        assert devicekit.as_device(None) == devicekit.current_device()

    def test_auto_is_best_device(self) -> None:
        assert devicekit.as_device("auto") == devicekit.best_device()


class TestEmulatedBackends:
    def test_cpu_only(self, fake_backend) -> None:  # type: ignore[no-untyped-def]
        fake_backend(None)
        assert [info.device for info in devicekit.devices()] == [torch.device("cpu")]
        assert devicekit.best_device() == torch.device("cpu")
        assert devicekit.local_device() == torch.device("cpu")
        with pytest.raises(DeviceUnavailableError) as info:
            devicekit.as_device("cuda:7")
        assert str(info.value) == (
            "as_device('cuda:7'): cuda:7 is not available on this machine. Available devices: "
            "cpu. Use one of those, or pass check=False to build the torch.device anyway."
        )
        assert info.value.available == (torch.device("cpu"),)
        assert devicekit.as_device("cuda:7", check=False) == torch.device("cuda", 7)
        with pytest.raises(DeviceUnavailableError, match="'gpu' means the accelerator, and this"):
            devicekit.as_device("gpu")
        with pytest.raises(DeviceUnavailableError, match="integer names an accelerator index"):
            devicekit.as_device(0)

    def test_one_cuda_device(self, fake_backend) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [70 * GiB])
        assert devicekit.as_device("cuda") == torch.device("cuda", 0)
        assert devicekit.as_device("cuda") == devicekit.as_device("cuda:0")
        assert devicekit.as_device("gpu") == torch.device("cuda", 0)
        assert devicekit.as_device("accelerator") == torch.device("cuda", 0)
        assert devicekit.as_device(0) == torch.device("cuda", 0)
        with pytest.raises(DeviceUnavailableError, match="Available devices: cpu, cuda:0"):
            devicekit.as_device("cuda:7")
        assert devicekit.best_device() == torch.device("cuda", 0)
        info = devicekit.devices()[1]
        assert (info.name, info.free_memory, info.capability) == ("Fake GPU 0", 70 * GiB, (9, 0))
        assert str(info) == "cuda:0 | Fake GPU 0 | 80.0 GiB total, 70.0 GiB free | capability 9.0"

    def test_four_cuda_devices_pick_most_free(self, fake_backend) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [10 * GiB, 50 * GiB, 70 * GiB, 70 * GiB])
        assert [str(i.device) for i in devicekit.devices()] == [
            "cpu",
            "cuda:0",
            "cuda:1",
            "cuda:2",
            "cuda:3",
        ]
        device, reason = devicekit.explain_best_device()
        assert device == torch.device("cuda", 2)  # ties go to the lower index
        assert reason == "the cuda device with the most free memory"

    def test_unknown_free_memory_uses_current(self, fake_backend) -> None:  # type: ignore[no-untyped-def]
        backend = fake_backend("cuda", [None, None])
        backend.current_index = 1
        # The current index is only read from torch once CUDA is initialised; before, it is 0.
        assert devicekit.best_device() == torch.device("cuda", 0)
        assert devicekit.devices()[1].free_memory is None

    def test_mps(self, fake_backend) -> None:  # type: ignore[no-untyped-def]
        fake_backend("mps", [None])
        assert devicekit.as_device("mps") == torch.device("mps", 0)
        assert devicekit.as_device("gpu") == torch.device("mps", 0)
        assert devicekit.best_device() == torch.device("mps", 0)
        with pytest.raises(DeviceUnavailableError, match="cuda:0 is not available"):
            devicekit.as_device("cuda")
        assert devicekit.devices()[1].name == "Apple GPU (MPS)"

    def test_env_override(self, fake_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [10 * GiB, 50 * GiB])
        monkeypatch.setenv("DEVICEKIT_DEVICE", "cuda:0")
        assert devicekit.explain_best_device() == (
            torch.device("cuda", 0),
            "the DEVICEKIT_DEVICE environment variable is 'cuda:0'",
        )
        monkeypatch.setenv("DEVICEKIT_DEVICE", "auto")
        assert devicekit.best_device() == torch.device("cuda", 1)

    @pytest.mark.parametrize(
        ("value", "error"),
        [("cuda:x", InvalidDeviceSpecError), ("cuda:5", DeviceUnavailableError)],
    )
    def test_env_override_is_validated(self, fake_backend, monkeypatch, value, error) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [GiB])
        monkeypatch.setenv("DEVICEKIT_DEVICE", value)
        with pytest.raises(error) as info:
            devicekit.best_device()
        assert str(info.value).startswith(
            f"best_device(): the environment variable DEVICEKIT_DEVICE={value!r}: "
        )

    def test_local_rank(self, fake_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [70 * GiB, 10 * GiB])
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert devicekit.local_device() == torch.device("cuda", 1)
        device, reason = devicekit.explain_best_device()
        assert device == torch.device("cuda", 1)
        assert "torchrun" in reason

    def test_local_rank_beyond_count(self, fake_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [GiB, GiB])
        monkeypatch.setenv("LOCAL_RANK", "3")
        with pytest.raises(DeviceUnavailableError) as info:
            devicekit.local_device()
        assert str(info.value) == (
            "local_device(): LOCAL_RANK=3 but this machine has only 2 cuda device(s) "
            "(indices 0 to 1). Start at most 2 processes per node (torchrun --nproc_per_node), "
            "or check CUDA_VISIBLE_DEVICES."
        )

    def test_local_rank_malformed(self, fake_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [GiB])
        monkeypatch.setenv("LOCAL_RANK", "first")
        with pytest.raises(InvalidDeviceSpecError, match="LOCAL_RANK='first' is not a non-neg"):
            devicekit.local_device()

    def test_local_rank_without_accelerator_is_cpu(self, fake_backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        fake_backend(None)
        monkeypatch.setenv("LOCAL_RANK", "5")
        assert devicekit.local_device() == torch.device("cpu")
        assert devicekit.best_device() == torch.device("cpu")

    def test_auto_is_stable_between_calls(self, fake_backend) -> None:  # type: ignore[no-untyped-def]
        backend = fake_backend("cuda", [10 * GiB, 50 * GiB])
        assert devicekit.current_device() == torch.device("cuda", 1)
        backend.free_memory[0] = 79 * GiB  # memory moves; the process's device must not
        cuda1 = torch.device("cuda", 1)
        assert devicekit.current_device() == cuda1
        assert devicekit.best_device() == cuda1
        assert devicekit.as_device("auto") == cuda1
        assert devicekit.default_device("auto").device == cuda1


@given(st.one_of(st.text(), st.integers(), st.from_regex(r"[a-z]{1,6}(:-?[0-9]{1,4})?")))
@example("cuda:x")
@example("cuda:99999")
@example("\x00")
@example(2**70)
def test_fuzzed_specs_raise_only_devicekit_errors(spec: str | int) -> None:
    for check in (True, False):
        try:
            device = devicekit.as_device(spec, check=check)
        except (InvalidDeviceSpecError, DeviceUnavailableError) as error:
            assert repr(spec) in str(error)
        else:
            assert isinstance(device, torch.device)
            if device.type not in ("cpu", "meta"):
                assert device.index is not None
