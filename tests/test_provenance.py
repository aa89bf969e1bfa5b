"""Provenance of the operands of cross-device errors (issue 15): what is recorded, when, for how
long, and what the report makes of it; and pytest tracebacks that end at the user's line."""

from __future__ import annotations

import gc
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import CrossDeviceError, _provenance, _report, device_guard
from tests.machine import REAL_CUDA

pytest_plugins = ["pytester"]

META = torch.ones(3, device="meta")


def test_nothing_is_recorded_outside_a_guard_or_simulation() -> None:
    made = torch.arange(3), torch.zeros(2), torch.tensor([1.0])
    assert all(id(tensor) not in _provenance.ENTRIES for tensor in made)
    with device_guard():
        pass
    after = torch.arange(3)
    assert id(after) not in _provenance.ENTRIES


def test_a_record_goes_with_its_tensor() -> None:
    with device_guard():
        made = torch.zeros(4)
    key = id(made)
    assert _provenance.ENTRIES[key]() is made
    del made
    gc.collect()
    assert key not in _provenance.ENTRIES


def test_a_record_is_no_part_of_the_tensor() -> None:
    import copy
    import pickle

    with device_guard():
        made = torch.ones(2)
    assert made.__dict__ == {}  # nothing in the tensor: pickles and copies carry nothing
    copied = copy.deepcopy(made)
    assert id(copied) not in _provenance.ENTRIES
    assert torch.equal(pickle.loads(pickle.dumps(made)), made)


class Masked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.ModuleDict({"attn": torch.nn.Linear(3, 3)})
        self.inner["attn"].mask = torch.ones(3, 3).tril()  # a plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.inner["attn"]
        return attn(x).masked_fill(attn.mask == 0, 0.0)


def test_the_guard_names_the_holder_of_a_plain_attribute() -> None:
    model = Masked().to("meta")
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        model(torch.ones(3, 3, device="meta"))
    (found,) = info.value.provenance
    assert (found.owner, found.owner_kind, found.via) == (
        "model.inner['attn'].mask",
        "attribute",
        "attn.mask",
    )
    assert 'register_buffer("mask", ..., persistent=False)' in str(info.value)


FACTORIES: dict[str, Callable[[int], torch.Tensor]] = {
    "torch.arange": lambda n: torch.arange(n),
    "torch.zeros": lambda n: torch.zeros(n),
    "torch.ones": lambda n: torch.ones(n),
    "torch.empty": lambda n: torch.empty(n),
    "torch.full": lambda n: torch.full((n,), 2.0),
    "torch.rand": lambda n: torch.rand(n),
    "torch.randn": lambda n: torch.randn(n),
    "torch.linspace": lambda n: torch.linspace(0, 1, n),
    "torch.tensor": lambda n: torch.tensor([1.0] * n),
    "torch.zeros_like": lambda n: torch.zeros_like(torch.empty(n)),
    "torch.full_like": lambda n: torch.full_like(torch.empty(n), 2.0),
    "torch.randn_like": lambda n: torch.randn_like(torch.empty(n)),
}


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(sorted(FACTORIES)), st.integers(2, 5), st.booleans())
def test_any_factory_in_a_block_is_named_with_its_line(name: str, n: int, simulate: bool) -> None:
    make = FACTORIES[name]
    source = make.__code__.co_filename, make.__code__.co_firstlineno
    if simulate:
        with devicekit.simulated_devices("cuda", 1):
            on_device = torch.ones(n, device="cuda:0")
            with pytest.raises(CrossDeviceError) as info:
                on_device * make(n)
    else:
        with device_guard(), pytest.raises(CrossDeviceError) as info:
            META[:1].expand(n) * make(n)
    (found,) = info.value.provenance
    assert found.op == name
    assert found.origin == "made"
    assert found.location is not None
    assert found.location.startswith(f"{source[0]}:{source[1]}: ")


def test_a_move_inside_the_guard_names_its_line() -> None:
    with devicekit.simulated_devices("cuda", 2), device_guard():
        x = torch.ones(3, device="cuda:0")
        y = x.cpu()
        with pytest.raises(CrossDeviceError) as info:
            x + y
    (found,) = info.value.provenance
    line = test_a_move_inside_the_guard_names_its_line.__code__.co_firstlineno + 3
    assert (found.origin, found.op) == ("moved", "Tensor.cpu")
    assert found.location == f"{__file__}:{line}: y = x.cpu()"
    assert str(info.value).splitlines()[-1] == (
        f"Fix: keep it on cuda:0: drop the Tensor.cpu at {found.location}, or move the result "
        "back before this op."
    )


def test_the_guards_warning_is_built_once_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = _report.Report.__init__

    def counting(self: _report.Report, *args: object, **kwargs: object) -> None:
        built.append(1)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_report.Report, "__init__", counting)
    x, w = torch.ones(2, 3), torch.ones(4, 3, device="meta")

    def five_calls() -> None:
        for _ in range(5):
            F.linear(x, w)  # torch runs it

    with pytest.warns(devicekit.DeviceMismatchWarning), device_guard("warn"):
        five_calls()
    assert len(built) == 1


def test_a_tensor_in_an_optimizers_state_names_its_parameter() -> None:
    with devicekit.simulated_devices("cuda", 1):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()  # momentum buffers on the CPU
        model.to("cuda")
        model(torch.ones(1, 2, device="cuda")).sum().backward()
        with pytest.raises(CrossDeviceError) as info:
            optimizer.step()
    owners = {found.owner for found in info.value.provenance}
    assert owners & {
        "optimizer.state[model.weight]['momentum_buffer']",
        "optimizer.state[model.bias]['momentum_buffer']",
    }


def test_provenance_needs_no_source() -> None:
    namespace: dict[str, object] = {"torch": torch, "META": META}
    exec("def mix():\n    return META * torch.ones(3)\n", namespace)  # no file to read lines from
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        namespace["mix"]()  # type: ignore[operator]
    (found,) = info.value.provenance
    assert found.origin == "made"
    assert found.location == "<string>:2"


# --- tracebacks that end at the user's line (pytest's --tb=line and --tb=short) -----------------

USER_CODE = textwrap.dedent(
    """
    import torch
    import devicekit
    import torch.nn.functional as F

    def test_guard():
        x, w = torch.ones(2, 3), torch.ones(4, 3, device="meta")
        with devicekit.device_guard():
            x @ w.T

    def test_simulation():
        with devicekit.simulated_devices("cuda", 2):
            x = torch.ones(2, 3, device="cuda:0")
            x + torch.ones(3)

    def test_colocate():
        with devicekit.simulated_devices("cuda", 2):
            a, b = torch.ones(2, device="cuda:0"), torch.ones(2, device="cuda:1")
            devicekit.colocate(a, b)

    def test_function():
        logits, labels = torch.ones(2, 3, device="meta"), torch.zeros(2, dtype=torch.long)
        with devicekit.device_guard():
            F.cross_entropy(logits, labels)

    def test_module():
        with devicekit.simulated_devices("cuda", 2):
            model = torch.nn.Linear(3, 2).to("cuda:0")
            model(torch.ones(3))
    """
)


@pytest.mark.skipif(REAL_CUDA, reason="the simulation needs a machine without CUDA")
@pytest.mark.parametrize("style", ["line", "short"])
def test_tracebacks_end_at_the_users_line(pytester: pytest.Pytester, style: str) -> None:
    pytester.makepyfile(test_user=USER_CODE)
    result = pytester.runpytest("-p", "no:cacheprovider", f"--tb={style}")
    result.assert_outcomes(failed=5)
    lines = [
        (8, "test_guard", "x @ w.T"),
        (13, "test_simulation", "x + torch.ones(3)"),
        (18, "test_colocate", "devicekit.colocate(a, b)"),
        (23, "test_function", "F.cross_entropy(logits, labels)"),
        (28, "test_module", "model(torch.ones(3))"),
    ]
    if style == "line":
        result.stdout.fnmatch_lines(
            [
                f"*test_user.py:{line}: devicekit._errors.CrossDeviceError: Expected all tensors*"
                for line, _, _ in lines
            ]
        )
    else:
        result.stdout.fnmatch_lines(
            [
                text
                for line, test, source in lines
                for text in (f"test_user.py:{line}: in {test}", f"    {source}")
            ]
        )
    result.stdout.no_fnmatch_line("*devicekit/_*.py*")
    result.stdout.no_fnmatch_line("*torch/nn/*.py*")
    result.stdout.no_fnmatch_line("*torch/overrides.py*")


@pytest.mark.skipif(REAL_CUDA, reason="the simulation needs a machine without CUDA")
def test_fulltrace_keeps_torchs_frames(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_CODE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--fulltrace", "-k", "test_function")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*torch/overrides.py:*"])


def test_the_error_of_a_function_names_the_users_line() -> None:
    labels = torch.zeros(3, dtype=torch.long)
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        F.cross_entropy(torch.ones(3, 2, device="meta"), labels)
    line = test_the_error_of_a_function_names_the_users_line.__code__.co_firstlineno + 3
    assert info.value.location is not None
    assert info.value.location.startswith(f"{__file__}:{line}: ")


# --- tensors made by library code: the user's call into it (issue 15 review) ----------------------


LIBRARY_SOURCE = """
import torch


def make_weights(n):
    return build(n)


def build(n):
    return torch.zeros(n) + 1
"""


@pytest.fixture
def installed(tmp_path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A module in a folder that counts as installed code (as site-packages does)."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    (folder / "weights_lib.py").write_text(LIBRARY_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(_provenance, "LIBRARY", (*_provenance.LIBRARY, f"{folder}/"))
    import weights_lib  # type: ignore[import-not-found]

    yield weights_lib
    import sys

    sys.modules.pop("weights_lib", None)


@pytest.mark.parametrize("simulate", [False, True])
def test_an_installed_packages_factory_is_named_by_the_users_call(
    installed, simulate: bool
) -> None:  # type: ignore[no-untyped-def]
    lib = installed
    if simulate:
        with devicekit.simulated_devices("cuda", 1):
            x = torch.ones(3, device="cuda")
            w = lib.make_weights(3)
            with pytest.raises(CrossDeviceError) as info:
                x * w
    else:
        with device_guard():
            x = META
            w = lib.make_weights(3)
            with pytest.raises(CrossDeviceError) as info:
                x * w
    (found,) = info.value.provenance
    line = test_an_installed_packages_factory_is_named_by_the_users_call.__code__.co_firstlineno
    offset = 8 if simulate else 14  # from the decorator's line
    assert (found.origin, found.op) == ("returned", "lib.make_weights")
    assert found.location == f"{__file__}:{line + offset}: w = lib.make_weights(3)"
    device = "cuda:0" if simulate else "meta"
    assert str(info.value).splitlines()[4:6] == [
        f"    made inside lib.make_weights, called at {found.location}",
        f"called at {__file__}:{line + offset + 2}: x * w",
    ]
    fix = [line for line in str(info.value).splitlines() if line.startswith("Fix: ")]
    assert fix == [
        f"Fix: move what lib.make_weights returns to {device} before using it: "
        f'`w = devicekit.to_device(w, "{device}")` (or `.to(x.device)`).'
    ]
    assert "torch.zeros(..., device=" not in str(info.value)


def test_a_factory_called_by_the_user_is_still_the_users() -> None:
    with device_guard():
        made = torch.zeros(2)
    entry = _provenance.ENTRIES[id(made)]
    assert getattr(entry, "called", None) is None
    assert entry.filename == __file__


def test_torch_load_under_the_guard_is_named_as_the_load() -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    buffer.seek(0)
    with device_guard():
        state = torch.load(buffer, weights_only=True)
        with pytest.raises(CrossDeviceError) as info:
            META[:2] + state["w"]
    (found,) = info.value.provenance
    assert (found.origin, found.op, found.owner) == ("returned", "torch.load", "state['w']")
    assert str(info.value).splitlines()[-1] == (
        'Fix: load it onto the device where it is used: `torch.load(..., map_location="meta")`, '
        'or move it after loading: `state = devicekit.to_device(state, "meta")`.'
    )


def test_the_library_prefixes_cover_torch_and_the_stdlib() -> None:
    import json

    assert torch.__file__.startswith(_provenance.LIBRARY)
    assert json.__file__.startswith(_provenance.LIBRARY)
    assert not __file__.startswith(_provenance.LIBRARY)
