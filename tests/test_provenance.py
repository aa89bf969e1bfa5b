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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulation needs a machine without CUDA")
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulation needs a machine without CUDA")
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
