from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import devicekit
from devicekit import DeviceUnavailableError, InvalidDeviceSpecError, _nvml, _resolve
from devicekit._cli import main
from devicekit._discovery import parse, read_index
from tests.fakes import FakeBackend, FakeGpu, FakeNvml

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


# --- "auto": one answer, resolved once per configuration -----------------------------------------


class TestAutoIsOneAnswer:
    """`to_device(x, "auto")`, `to_device(x)`, `as_device("auto")`, `best_device()` and
    `default_device("auto")` give one device, which changes only when its inputs change."""

    @staticmethod
    def answers() -> set[torch.device]:
        x = torch.ones(1)
        return {
            devicekit.to_device(x, "auto").device,
            devicekit.to_device(x).device,
            devicekit.as_device("auto"),
            devicekit.best_device(),
            devicekit.current_device(),
            devicekit.default_device("auto").device,
        }

    def test_a_simulation_changes_auto_and_its_end_changes_it_back(self) -> None:
        assert self.answers() == {torch.device("cpu")}
        with devicekit.simulated_devices("xpu", 2):
            assert self.answers() == {torch.device("xpu", 0)}
        assert self.answers() == {torch.device("cpu")}

    def test_the_environment_variable_changes_auto(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("DEVICEKIT_DEVICE", raising=False)
        assert self.answers() == {torch.device("cpu")}
        monkeypatch.setenv("DEVICEKIT_DEVICE", "meta")
        assert self.answers() == {torch.device("meta")}
        monkeypatch.delenv("DEVICEKIT_DEVICE")
        assert self.answers() == {torch.device("cpu")}

    def test_resolved_once_not_per_batch(self, fake_backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        backend = fake_backend("cuda", [10 * GiB, 50 * GiB])
        queries = []
        monkeypatch.setattr(
            _nvml, "visible_devices", lambda: queries.append(1) or backend._nvml_devices()
        )
        batch = {"step": 0}
        for step in range(50):
            backend.free_memory[:] = [(10 + step) * GiB, 50 * GiB - step * GiB]
            assert devicekit.to_device(batch, "auto") is batch  # nothing to move, target resolved
            assert devicekit.to_device(batch) is batch
            assert devicekit.as_device("auto") == torch.device("cuda", 1)
        assert len(queries) == 1  # one NVML query, not one per batch
        assert backend.free_memory[0] > backend.free_memory[1]
        assert devicekit.best_device() == devicekit.current_device() == torch.device("cuda", 1)

    @pytest.mark.parametrize(
        ("variable", "value", "expected"),
        [
            ("DEVICEKIT_DEVICE", "cuda:0", torch.device("cuda", 0)),
            ("LOCAL_RANK", "0", torch.device("cuda", 0)),
            ("CUDA_VISIBLE_DEVICES", "1,0", None),  # re-resolved, whatever the answer
            ("CUDA_DEVICE_ORDER", "PCI_BUS_ID", None),
        ],
    )
    def test_each_input_of_auto_re_resolves_it(  # type: ignore[no-untyped-def]
        self, fake_backend, monkeypatch, variable, value, expected
    ) -> None:
        backend = fake_backend("cuda", [10 * GiB, 50 * GiB])
        queries = []
        monkeypatch.setattr(
            _nvml, "visible_devices", lambda: queries.append(1) or backend._nvml_devices()
        )
        assert devicekit.best_device() == torch.device("cuda", 1)
        monkeypatch.setenv(variable, value)
        device = devicekit.best_device()
        if expected is not None:
            assert device == expected
        else:
            assert len(queries) == 2

    def test_keyed_on_the_environment_as_os_environ_reads_it(self) -> None:
        with pytest.MonkeyPatch.context() as monkeypatch:
            for number, name in enumerate(_resolve.AUTO_ENVIRONMENT):
                monkeypatch.setenv(name, f"value {number} é")
            expected = tuple(os.environ.get(name) for name in _resolve.AUTO_ENVIRONMENT)
            assert _resolve._environment() == tuple(
                os.environ.encodevalue(value) for value in expected
            )
            monkeypatch.delenv("LOCAL_RANK")
            assert _resolve._environment()[1] is None

    def test_the_cache_stays_small(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for number in range(3 * _resolve._AUTO_LIMIT):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(number))
            devicekit.best_device()
        assert len(_resolve._AUTO) <= _resolve._AUTO_LIMIT

    def test_cpu_and_meta_come_back_as_one_object_each(self) -> None:
        assert _resolve.resolve("cpu:0", operation="to_device") is _resolve.CPU
        assert _resolve.resolve(torch.device("meta"), operation="to_device") is _resolve.META
        assert _resolve.best_device() is _resolve.CPU


# --- hostile specs and environments (issue 18, item 11 and 14) -----------------------------------


class Hostile:
    """A value whose `__repr__`, `__eq__` and `__hash__` all raise."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")


class TestHostileSpecs:
    def test_an_index_beyond_any_integer_type(self) -> None:
        spec = "cpu:99999999999999999999"
        with pytest.raises(InvalidDeviceSpecError) as info:
            devicekit.as_device(spec)
        assert str(info.value).startswith(
            f"as_device({spec!r}): device index 99999999999999999999 is larger than 127. "
        )

    def test_thousands_of_digits(self) -> None:
        spec = "cuda:" + "9" * 5000
        with pytest.raises(InvalidDeviceSpecError, match=r"99999\.\.\. \(5000 digits\) is larger"):
            devicekit.as_device(spec, check=False)

    def test_an_index_torch_would_wrap_around(self) -> None:
        with pytest.raises(InvalidDeviceSpecError) as info:
            devicekit.as_device("cpu:200")
        assert "device index 200 is larger than 127" in str(info.value)
        assert "-56" not in str(info.value)

    @pytest.mark.parametrize("device_type", ["cpu", "meta"])
    @pytest.mark.parametrize("check", [True, False])
    def test_a_second_cpu_does_not_suggest_check_false(self, device_type: str, check: bool) -> None:
        with pytest.raises(DeviceUnavailableError) as info:
            devicekit.as_device(f"{device_type}:1", check=check)
        assert str(info.value) == (
            f"as_device('{device_type}:1'): there is only one {device_type} device "
            f"({device_type}, also written {device_type}:0), so {device_type}:1 does not exist. "
            f"Use '{device_type}'."
        )
        assert info.value.device == torch.device(device_type, 1)

    def test_a_value_whose_repr_raises(self) -> None:
        with pytest.raises(InvalidDeviceSpecError) as info:
            devicekit.as_device(Hostile())  # type: ignore[arg-type]
        assert str(info.value).startswith(
            "as_device(<Hostile object with a failing __repr__>): got a Hostile. Expected "
        )
        with pytest.raises(InvalidDeviceSpecError, match="got a Hostile"):
            devicekit.to_device(torch.ones(1), Hostile())  # type: ignore[arg-type]

    def test_an_environment_index_beyond_any_integer_type(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("DEVICEKIT_DEVICE", "cpu:99999999999999999999")
        with pytest.raises(InvalidDeviceSpecError) as info:
            devicekit.best_device()
        assert str(info.value).startswith(
            "best_device(): the environment variable DEVICEKIT_DEVICE='cpu:99999999999999999999':"
            " device index 99999999999999999999 is larger than 127. "
        )
        assert main([]) == 2
        error = capsys.readouterr().err
        assert error.startswith("devicekit: error: best_device(): the environment variable ")
        assert error.count("\n") == 1
        monkeypatch.delenv("DEVICEKIT_DEVICE")
        assert main(["--device", "cpu:99999999999999999999"]) == 2
        assert "is larger than 127" in capsys.readouterr().err


class TestLocalRank:
    @pytest.mark.parametrize("text", ["²", "0\x1f", "\uff10", "1\x0b", "", " ", "+1", "-0", "1_0"])
    def test_not_ascii_digits(self, fake_backend, monkeypatch, text: str) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [GiB, GiB])
        monkeypatch.setenv("LOCAL_RANK", text)
        with pytest.raises(InvalidDeviceSpecError) as info:
            devicekit.local_device()
        assert str(info.value).startswith(
            f"local_device(): LOCAL_RANK={text!r} is not a non-negative integer. "
        )

    def test_thirty_nines(self, fake_backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [GiB])
        monkeypatch.setenv("LOCAL_RANK", "9" * 30)
        with pytest.raises(DeviceUnavailableError) as info:
            devicekit.local_device()
        assert str(info.value).startswith(
            f"local_device(): LOCAL_RANK='{'9' * 30}' but this machine has only 1 cuda device(s) "
        )
        assert info.value.device is None

    @pytest.mark.parametrize("text", ["1", " 1\n", "\t01 ", "001"])
    def test_ascii_digits_with_blanks(self, fake_backend, monkeypatch, text: str) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", [GiB, GiB])
        monkeypatch.setenv("LOCAL_RANK", text)
        assert devicekit.local_device() == torch.device("cuda", 1)


@given(st.text())
@example("²")
@example("\uff10")
@example("0\x1f")
@example(" 7 ")
@example("9" * 5000)
def test_read_index_reads_ascii_digits_only(text: str) -> None:
    index = read_index(text)
    digits = text.strip(" \t\n\r")
    if digits and digits.isascii() and digits.isdigit():
        assert index == min(int(digits), 128) if len(digits) < 4000 else index == 128
    else:
        assert index is None


ENV_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
DEVICEKIT_ERRORS = (InvalidDeviceSpecError, DeviceUnavailableError)


@given(
    variable=st.sampled_from(["DEVICEKIT_DEVICE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"]),
    text=ENV_TEXT | st.from_regex(r"\s*(cpu|cuda|meta)?:?[0-9²\uff10]{0,30}\s*", fullmatch=True),
    device_type=st.sampled_from([None, "cuda"]),
)
@example(variable="DEVICEKIT_DEVICE", text="cpu:99999999999999999999", device_type=None)
@example(variable="LOCAL_RANK", text="²", device_type="cuda")
@example(variable="LOCAL_RANK", text="0\x1f", device_type="cuda")
@example(variable="LOCAL_RANK", text="9" * 30, device_type="cuda")
@example(variable="CUDA_VISIBLE_DEVICES", text="²", device_type="cuda")
@example(variable="CUDA_VISIBLE_DEVICES", text="\uff10", device_type="cuda")
def test_any_environment_gives_a_device_or_a_devicekit_error(
    variable: str, text: str, device_type: str | None
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in _resolve.AUTO_ENVIRONMENT:
            monkeypatch.delenv(name, raising=False)
        gpus = [FakeGpu("NVIDIA H100", f"GPU-{i}{i}{i}", (0, i, 0)) for i in range(2)]
        backend = FakeBackend(monkeypatch, device_type, [None, None] if device_type else [])
        backend.library = FakeNvml(gpus)
        backend.install()
        monkeypatch.setenv(variable, text)
        infos = devicekit.devices()
        assert infos[0].type == "cpu"
        for call in (devicekit.best_device, devicekit.local_device, devicekit.current_device):
            try:
                device = call()
            except DEVICEKIT_ERRORS as error:
                assert variable in str(error)
            else:
                assert isinstance(device, torch.device)
                assert device.type in ("cpu", "meta") or device.index is not None


# --- the layering: `_discovery` parses, `_resolve` decides, `_context` answers `None` ------------


def test_discovery_and_resolve_do_not_import_the_default_device_module() -> None:
    code = (
        "import sys, devicekit._resolve, devicekit._discovery; "
        "print(sorted(m for m in sys.modules if m.startswith('devicekit.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(
        ["devicekit._discovery", "devicekit._errors", "devicekit._nvml", "devicekit._resolve"]
    )


@pytest.mark.parametrize("spec", [None, "auto"])
def test_parse_reads_names_and_leaves_choices_to_the_resolver(spec: str | None) -> None:
    with pytest.raises(InvalidDeviceSpecError):
        parse(spec, check=True, operation="parse")


SPECS = (
    st.text(max_size=12)
    | st.integers(-3, 2**70)
    | st.from_regex(r"(cpu|meta|cuda|gpu|auto)(:[0-9]{1,25})?", fullmatch=True)
    | st.sampled_from([torch.device("cpu"), torch.device("meta"), torch.device("cpu", 0)])
)


def _outcome(call: Callable[[], torch.device]) -> object:
    try:
        return call()
    except (InvalidDeviceSpecError, DeviceUnavailableError) as error:
        return type(error), str(error)


@given(spec=SPECS, check=st.booleans())
@example(spec="cpu:0", check=True)
@example(spec="auto", check=False)
@example(spec="cpu:99999999999999999999", check=True)
def test_the_resolver_answers_as_parsing_does_and_its_cache_changes_nothing(
    spec: object, check: bool
) -> None:
    first = _outcome(lambda: _resolve.resolve(spec, operation="as_device", check=check))
    again = _outcome(lambda: _resolve.resolve(spec, operation="as_device", check=check))
    assert first == again
    if spec == "auto":
        assert first == devicekit.best_device()
    else:
        assert first == _outcome(lambda: parse(spec, check=check, operation="as_device"))
    if first in (torch.device("cpu"), torch.device("meta")):
        assert first is _resolve.CPU or first is _resolve.META
