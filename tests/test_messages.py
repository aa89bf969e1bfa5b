"""Messages users read, word for word. Each call under test sits on its own line of a helper, so
the expected text can name the source line the message points at."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import devicekit
from devicekit import (
    CrossDeviceError,
    DeviceMismatchWarning,
    DeviceMoveWarning,
    TransferGuardError,
    device_guard,
    transfer_guard,
)

x = torch.ones(32, 64)
weight = torch.ones(16, 64, device="meta")
bias = torch.ones(16, device="meta")


#: torch's own first line, which programs match; devicekit's detail follows it.
SAME_DEVICE = "Expected all tensors to be on the same device, but found at least two devices, "
SIMULATED_NOTE = (
    "(Device cuda:0 is simulated on the CPU by devicekit.simulated_devices; real hardware raises "
    "here too.)"
)


def site(function: Callable[[], object], source: str) -> str:
    """`file:line: source` for the one-line body of `function`."""
    return f"{__file__}:{function.__code__.co_firstlineno + 1}: {source}"


def call_linear() -> object:
    return F.linear(x, weight, bias)


def call_matmul() -> object:
    return x @ weight.T


def call_cat() -> object:
    return torch.cat([weight[:2], x, weight[:3]])


def call_index() -> object:
    return x[torch.tensor([0, 1], device="meta")]


def test_device_guard_error() -> None:
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        call_linear()
    assert str(info.value) == (
        f"{SAME_DEVICE}cpu and meta!\n"
        "torch.nn.functional.linear got tensors on different devices (cpu, meta):\n"
        "  input: f32[32,64] @ cpu\n"
        "    came from outside the guarded block (passed in, loaded or made before it)\n"
        "  weight: f32[16,64] @ meta\n"
        "  bias: f32[16] @ meta\n"
        f"called at {site(call_linear, 'return F.linear(x, weight, bias)')}\n"
        'Fix: move input to meta first, e.g. `devicekit.to_device(input, "meta")`, '
        'or let `devicekit.device_guard("move")` move operands for you.'
    )


def test_device_guard_error_for_an_operator() -> None:
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        call_matmul()
    assert str(info.value) == (
        f"{SAME_DEVICE}cpu and meta!\n"
        "Tensor.__matmul__ got tensors on different devices (cpu, meta):\n"
        "  self: f32[32,64] @ cpu\n"
        "    came from outside the guarded block (passed in, loaded or made before it)\n"
        "  other: f32[64,16] @ meta\n"
        f"called at {site(call_matmul, 'return x @ weight.T')}\n"
        'Fix: move self to meta first, e.g. `devicekit.to_device(self, "meta")`, '
        'or let `devicekit.device_guard("move")` move operands for you.'
    )


def test_device_guard_error_for_a_list_argument() -> None:
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        call_cat()
    assert str(info.value) == (
        f"{SAME_DEVICE}meta and cpu!\n"
        "torch.cat got tensors on different devices (meta, cpu):\n"
        "  tensors[0]: f32[2,64] @ meta\n"
        "  tensors[1]: f32[32,64] @ cpu\n"
        "    came from outside the guarded block (passed in, loaded or made before it)\n"
        "  tensors[2]: f32[3,64] @ meta\n"
        f"called at {site(call_cat, 'return torch.cat([weight[:2], x, weight[:3]])')}\n"
        'Fix: move tensors[1] to meta first, e.g. `devicekit.to_device(tensors[1], "meta")`, '
        'or let `devicekit.device_guard("move")` move operands for you.'
    )


INDEX_SOURCE = 'return x[torch.tensor([0, 1], device="meta")]'


def test_device_guard_error_for_indexing() -> None:
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        call_index()
    assert str(info.value) == (
        f"{SAME_DEVICE}cpu and meta!\n"
        "Tensor.__getitem__ got tensors on different devices (cpu, meta):\n"
        "  self: f32[32,64] @ cpu\n"
        "    came from outside the guarded block (passed in, loaded or made before it)\n"
        "  key: i64[2] @ meta\n"
        f"called at {site(call_index, INDEX_SOURCE)}\n"
        'Fix: move self to meta first, e.g. `devicekit.to_device(self, "meta")`, '
        'or let `devicekit.device_guard("move")` move operands for you.'
    )


def test_device_guard_warn() -> None:
    with pytest.warns(DeviceMismatchWarning) as record, device_guard("warn"):
        call_matmul()
    assert str(record[0].message) == (
        "Tensor.__matmul__ got tensors on different devices (cpu, meta):\n"
        "  self: f32[32,64] @ cpu\n"
        "    came from outside the guarded block (passed in, loaded or made before it)\n"
        "  other: f32[64,16] @ meta\n"
        f"called at {site(call_matmul, 'return x @ weight.T')}\n"
        'Fix: move self to meta first, e.g. `devicekit.to_device(self, "meta")`, '
        'or let `devicekit.device_guard("move")` move operands for you.'
    )
    assert (record[0].filename, record[0].lineno) == (
        __file__,
        call_matmul.__code__.co_firstlineno + 1,
    )


def test_device_guard_move() -> None:
    with pytest.warns(DeviceMoveWarning) as record, device_guard("move"):
        call_linear()
    assert str(record[0].message) == (
        'device_guard("move") moved input to meta to run torch.nn.functional.linear, '
        f"called at {site(call_linear, 'return F.linear(x, weight, bias)')}.\n"
        "Each call copies them again: move them once with `devicekit.to_device`, or silence "
        'this with `warnings.filterwarnings("ignore", category=devicekit.DeviceMoveWarning)`.'
    )


def test_device_guard_move_without_a_target() -> None:
    from devicekit._report import Report

    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    report = Report("torch.add", [], devices=[a, b], target=None, block="device_guard")
    assert report.fix() == (
        'Fix: choose the device, e.g. `devicekit.device_guard("move", target="cuda:0")`, '
        "or move the operands to one device with `devicekit.to_device` first."
    )


def test_device_guard_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy") as info:
        device_guard("strict")  # type: ignore[arg-type]
    assert str(info.value) == (
        "device_guard: unknown policy 'strict'; expected 'error', 'warn' or 'move'."
    )


loss = torch.ones((), device="meta")


def read_loss() -> object:
    return loss.item()


def build_on_meta() -> object:
    return torch.tensor([1.0, 2.0], device="meta")


def test_transfer_guard_to_the_host() -> None:
    with transfer_guard(), pytest.raises(TransferGuardError) as info:
        read_loss()
    assert str(info.value) == (
        "transfer_guard: Tensor.item copies f32[] @ meta to the host, "
        "an implicit transfer that waits for the device.\n"
        f"called at {site(read_loss, 'return loss.item()')}\n"
        'Fix: copy it explicitly where you mean to, with `devicekit.to_device(tensor, "cpu")` '
        'or `.cpu()`, or allow it in this block with `devicekit.transfer_guard("log")`.'
    )


def test_transfer_guard_to_the_device() -> None:
    with transfer_guard(), pytest.raises(TransferGuardError) as info:
        build_on_meta()
    source = 'return torch.tensor([1.0, 2.0], device="meta")'
    assert str(info.value) == (
        "transfer_guard: torch.tensor builds a tensor on meta from list data, "
        "an implicit host-to-device copy.\n"
        f"called at {site(build_on_meta, source)}\n"
        "Fix: build it on the CPU and move it explicitly, e.g. "
        '`devicekit.to_device(torch.tensor(data), "meta")`, or allow it in this block with '
        '`devicekit.transfer_guard("log")`.'
    )


def test_transfer_guard_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy") as info:
        transfer_guard("allow")  # type: ignore[arg-type]
    assert str(info.value) == (
        "transfer_guard: unknown policy 'allow'; expected 'disallow' or 'log'."
    )


COLOCATE_SOURCE = 'return devicekit.colocate(a, {"b": b})'


def make_on_two() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(2, device="cuda:0"), torch.arange(2, device="cuda:1")


def test_colocate_on_two_accelerators() -> None:
    with devicekit.simulated_devices("cuda", 2):
        a, b = make_on_two()

        def call() -> object:
            return devicekit.colocate(a, {"b": b})

        with pytest.raises(CrossDeviceError) as info:
            call()
    made = 'return torch.ones(2, device="cuda:0"), torch.arange(2, device="cuda:1")'
    assert str(info.value) == (
        f"{SAME_DEVICE}cuda:0 and cuda:1!\n"
        "colocate got tensors on different devices (cuda:0, cuda:1):\n"
        "  objs[0]: f32[2] @ cuda:0\n"
        f"    made by torch.ones at {site(make_on_two, made)}\n"
        "  objs[1]['b']: i64[2] @ cuda:1\n"
        f"    made by torch.arange at {site(make_on_two, made)}\n"
        f"called at {site(call, COLOCATE_SOURCE)}\n"
        'Fix: name the device, e.g. `colocate(..., device="cuda:0")`: with tensors on several '
        "accelerators there is no one device to move them to."
    )
    assert info.value.operands == (
        ("objs[0]", "f32[2] @ cuda:0"),
        ("objs[1]['b']", "i64[2] @ cuda:1"),
    )
    assert [(p.label, p.origin, p.op) for p in info.value.provenance] == [
        ("objs[0]", "made", "torch.ones"),
        ("objs[1]['b']", "made", "torch.arange"),
    ]


def test_colocate_lists_a_few_tensors_per_device() -> None:
    with devicekit.simulated_devices("cuda", 2):
        first = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to("cuda:0")
        second = torch.nn.Linear(2, 2).to("cuda:1")
        with pytest.raises(CrossDeviceError) as info:
            devicekit.colocate(first, second)
    lines = str(info.value).splitlines()
    assert lines[2:12] == [
        "  objs[0].0.weight: f32[2,2] @ cuda:0",
        "    held by first[0].weight (parameter, on cuda:0)",
        "  objs[0].0.bias: f32[2] @ cuda:0",
        "    held by first[0].bias (parameter, on cuda:0)",
        "  objs[0].1.weight: f32[2,2] @ cuda:0",
        "    held by first[1].weight (parameter, on cuda:0)",
        "  and 1 more on cuda:0",
        "  objs[1].weight: f32[2,2] @ cuda:1",
        "    held by second.weight (parameter, on cuda:1)",
        "  objs[1].bias: f32[2] @ cuda:1",
    ]
    assert len(info.value.operands) == 5  # the summary line is no operand


class _Leaky(torch.nn.Module):
    """One of each error `audit` finds in a module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(4, 2)
        self.head = torch.nn.Linear(2, 4, bias=False)
        self.head.weight = torch.nn.Parameter(self.embed.weight)
        self.register_buffer("scale", torch.ones(2))
        for name, value in {
            "mask": torch.ones(2, 2),
            "cache": {"k": torch.zeros(3)},
            "experts": [torch.nn.Linear(2, 2)],
            "scale_copy": self.scale,
        }.items():
            setattr(self, name, value)


def test_audit_report() -> None:
    assert str(devicekit.audit(_Leaky(), name="net")) == (
        "audit(net): 5 errors\n"
        "[error] plain-attribute-tensor: net.mask is a tensor (f32[2,2] @ cpu) held as a plain "
        "attribute of _Leaky, not a registered buffer: Module.to() does not move it.\n"
        '    fix: Register it in _Leaky.__init__: self.register_buffer("mask", ..., '
        "persistent=False) (persistent=True also saves it in the state_dict).\n"
        "[error] plain-attribute-tensor: net.cache['k'] is a tensor (f32[3] @ cpu) inside the "
        "dict net.cache, a plain attribute of _Leaky, not a registered buffer: Module.to() does "
        "not move it.\n"
        "    fix: Register each tensor as a buffer (self.register_buffer(name, tensor, "
        "persistent=False)), or stack them into one buffer.\n"
        "[error] unregistered-module: net.experts[0] is a Linear inside the list net.experts, a "
        "plain attribute of _Leaky, not a registered submodule: Module.to() does not move its "
        "parameters, and net.parameters() does not list them.\n"
        "    fix: Hold the modules in an nn.ModuleList: self.experts = nn.ModuleList(...).\n"
        "[error] stale-alias: net.scale_copy (f32[2] @ cpu) is the buffer net.scale, held as a "
        "plain attribute of _Leaky: Module.to() replaces buffers with moved copies, so this "
        "reference keeps the old tensor on the old device.\n"
        "    fix: Read self.scale where it is needed instead of keeping a second reference to "
        "it.\n"
        "[error] split-tie: net.head.weight and net.embed.weight are two tensors sharing one "
        "storage: Module.to() copies each separately, so after a move they no longer share "
        "memory and training updates them apart.\n"
        "    fix: Tie them by assigning one parameter object to both (net.head.weight = "
        "net.embed.weight), not nn.Parameter(...) of the other or a view of it."
    )


# --- provenance: where the stray tensor came from (issue 15) -----------------------------------

SIMULATED = (
    "(Devices cuda:0 to cuda:1 are simulated on the CPU by devicekit.simulated_devices; real "
    "hardware raises here too.)"
)


def line_of(function: Callable[..., object], offset: int) -> str:
    """`file:line` of the line `offset` lines below `function`'s `def`."""
    return f"{__file__}:{function.__code__.co_firstlineno + offset}"


class Positions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Embedding(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.size(1))
        return x + self.pos(pos)


def test_a_tensor_made_in_forward_names_its_line() -> None:
    with devicekit.simulated_devices("cuda", 2):
        model, x = Positions().to("cuda:0"), torch.ones(2, 5, 4, device="cuda:0")
        with pytest.raises(CrossDeviceError) as info:
            model(x)
    forward = Positions.forward
    assert str(info.value) == (
        f"{SAME_DEVICE}cpu and cuda:0!\n"
        "torch.nn.functional.embedding got tensors on different devices (cpu, cuda:0):\n"
        "  input: i64[5] @ cpu\n"
        f"    made by torch.arange at {line_of(forward, 1)}: pos = torch.arange(x.size(1))\n"
        "  weight: f32[8,4] @ cuda:0\n"
        f"called at {line_of(forward, 2)}: return x + self.pos(pos)\n"
        "Fix: create it on the device where it is used: `torch.arange(..., device=x.device)`.\n"
        f"{SIMULATED}"
    )
    assert info.value.provenance == (
        devicekit.Provenance(
            "input",
            "cpu",
            "made",
            "torch.arange",
            f"{line_of(forward, 1)}: pos = torch.arange(x.size(1))",
            owner="pos",
            owner_kind="local variable",
        ),
    )


class Masked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask = torch.ones(4, 4).tril()

    def forward(self, att: torch.Tensor) -> torch.Tensor:
        return att.masked_fill(self.mask == 0, 0.0)


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Masked(), Masked()])

    def forward(self, att: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            att = block(att)
        return att


def test_a_plain_attribute_mask_names_its_holder() -> None:
    model = Stack()
    with devicekit.simulated_devices("cuda", 2):
        model.to("cuda:0")
        with pytest.raises(CrossDeviceError) as info:
            model(torch.ones(4, 4, device="cuda:0"))
    source = "return att.masked_fill(self.mask == 0, 0.0)"
    assert str(info.value) == (
        f"{SAME_DEVICE}cuda:0 and cpu!\n"
        "Tensor.masked_fill got tensors on different devices (cuda:0, cpu):\n"
        "  self: f32[4,4] @ cuda:0\n"
        "  mask: bool[4,4] @ cpu\n"
        "    computed from self.mask, held by model.blocks[0].mask (a plain attribute, not a "
        "registered buffer: Module.to does not move it)\n"
        f"called at {line_of(Masked.forward, 1)}: {source}\n"
        'Fix: register mask as a buffer, which Module.to moves: `self.register_buffer("mask", '
        "..., persistent=False)` in __init__ instead of `self.mask = ...`.\n"
        f"{SIMULATED}"
    )


class WithHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h)


def test_a_parameter_on_another_gpu_names_the_module() -> None:
    with devicekit.simulated_devices("cuda", 2):
        model = WithHead().to("cuda:0")
        model.head.to("cuda:1")
        with pytest.raises(CrossDeviceError) as info:
            model(torch.ones(3, 4, device="cuda:0"))
    forward = WithHead.forward
    assert str(info.value) == (
        f"{SAME_DEVICE}cuda:0 and cuda:1!\n"
        "torch.nn.functional.linear got tensors on different devices (cuda:0, cuda:1):\n"
        "  input: f32[3,4] @ cuda:0\n"
        "    computed from x, made by torch.ones at "
        f"{line_of(test_a_parameter_on_another_gpu_names_the_module, 5)}: "
        'model(torch.ones(3, 4, device="cuda:0"))\n'
        "  weight: f32[2,4] @ cuda:1\n"
        "    held by model.head.weight (parameter, on cuda:1)\n"
        "  bias: f32[2] @ cuda:1\n"
        "    held by model.head.bias (parameter, on cuda:1)\n"
        f"called at {line_of(forward, 2)}: return self.head(h)\n"
        "Fix: put both on one device: move the input to cuda:1 before calling model.head "
        '(`x.to("cuda:1")`), or `model.head.to("cuda:0")`; with two models, put both models on '
        "one device.\n"
        f"{SIMULATED}"
    )


logits = torch.ones(4, 3, device="meta")
labels = torch.zeros(4, dtype=torch.long)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def call_loss() -> object:
    return loss_of(logits, labels)


def test_labels_from_outside_the_block_name_where_they_were_passed_in() -> None:
    with device_guard(), pytest.raises(CrossDeviceError) as info:
        call_loss()
    assert str(info.value) == (
        f"{SAME_DEVICE}meta and cpu!\n"
        "torch.nn.functional.cross_entropy got tensors on different devices (meta, cpu):\n"
        "  input: f32[4,3] @ meta\n"
        "  target: i64[4] @ cpu\n"
        "    passed in as the argument labels by "
        f"{site(call_loss, 'return loss_of(logits, labels)')}\n"
        f"called at {site(loss_of, 'return F.cross_entropy(logits, labels)')}\n"
        'Fix: move the labels to meta with the batch: `devicekit.to_device(batch, "meta")`, or '
        '`labels = labels.to("meta")`.'
    )
    (found,) = info.value.provenance
    assert (found.origin, found.owner, found.owner_kind) == ("argument", "labels", "argument")


# --- made by library code: the user's call into it, and a fix for that call (issue 15 review) -----


def load_and_scale(buffer: object) -> object:
    with devicekit.simulated_devices("cuda", 1):
        w = torch.load(buffer, weights_only=True)
        return torch.ones(3, device="cuda") * w


def test_a_tensor_torch_load_made_names_the_load_not_its_factory() -> None:
    import io

    buffer = io.BytesIO()
    torch.save(torch.ones(3), buffer)
    buffer.seek(0)
    with pytest.raises(CrossDeviceError) as info:
        load_and_scale(buffer)
    assert str(info.value) == (
        f"{SAME_DEVICE}cuda:0 and cpu!\n"
        "Tensor.__mul__ got tensors on different devices (cuda:0, cpu):\n"
        "  self: f32[3] @ cuda:0\n"
        "  other: f32[3] @ cpu\n"
        f"    made inside torch.load, called at {line_of(load_and_scale, 2)}: "
        "w = torch.load(buffer, weights_only=True)\n"
        f'called at {line_of(load_and_scale, 3)}: return torch.ones(3, device="cuda") * w\n'
        'Fix: load it onto the device where it is used: `torch.load(..., map_location="cuda:0")`'
        ', or move it after loading: `w = devicekit.to_device(w, "cuda:0")`.\n'
        f"{SIMULATED_NOTE}"
    )
    (found,) = info.value.provenance
    assert (found.origin, found.op) == ("returned", "torch.load")


def collate_and_scale(x: torch.Tensor) -> object:
    with devicekit.simulated_devices("cuda", 1):
        x = x.to("cuda")
        batch = default_collate([{"y": 1.0}, {"y": 2.0}])
        return x * batch["y"]


def test_a_batch_default_collate_made_names_the_collate_and_moves_its_result() -> None:
    with pytest.raises(CrossDeviceError) as info:
        collate_and_scale(torch.ones(2))
    assert str(info.value) == (
        f"{SAME_DEVICE}cuda:0 and cpu!\n"
        "Tensor.__mul__ got tensors on different devices (cuda:0, cpu):\n"
        "  self: f32[2] @ cuda:0\n"
        "  other: f64[2] @ cpu\n"
        f"    made inside default_collate, called at {line_of(collate_and_scale, 3)}: "
        'batch = default_collate([{"y": 1.0}, {"y": 2.0}])\n'
        f'called at {line_of(collate_and_scale, 4)}: return x * batch["y"]\n'
        "Fix: move what default_collate returns to cuda:0 before using it: "
        '`batch = devicekit.to_device(batch, "cuda:0")` (or `.to(x.device)`).\n'
        f"{SIMULATED_NOTE}"
    )


def zeros_like_and_scale() -> object:
    with devicekit.simulated_devices("cuda", 1):
        base = torch.ones(3)
        w = torch.zeros_like(base)
        logits = torch.ones(3, device="cuda")
        return torch.ones(3, device="cuda") * w + logits


def test_a_like_factory_is_named_at_its_own_line_and_no_unused_variable_in_the_fix() -> None:
    with pytest.raises(CrossDeviceError) as info:
        zeros_like_and_scale()
    assert str(info.value) == (
        f"{SAME_DEVICE}cuda:0 and cpu!\n"
        "Tensor.__mul__ got tensors on different devices (cuda:0, cpu):\n"
        "  self: f32[3] @ cuda:0\n"
        "  other: f32[3] @ cpu\n"
        f"    made by torch.zeros_like at {line_of(zeros_like_and_scale, 3)}: "
        "w = torch.zeros_like(base)\n"
        f"called at {line_of(zeros_like_and_scale, 5)}: "
        'return torch.ones(3, device="cuda") * w + logits\n'
        "Fix: create it on the device where it is used: "
        "`torch.zeros_like(..., device=logits.device)`.\n"
        f"{SIMULATED_NOTE}"
    )


def made_beside_an_unused_variable() -> object:
    with devicekit.simulated_devices("cuda", 1):
        logits = torch.ones(3, device="cuda")
        arr = torch.tensor([1.0, 2.0, 3.0])
        scaled = torch.ones(3, device="cuda") * arr
        return scaled, logits


def test_the_fix_names_no_variable_the_failing_line_does_not_use() -> None:
    with pytest.raises(CrossDeviceError) as info:
        made_beside_an_unused_variable()
    assert str(info.value).splitlines()[-2] == (
        "Fix: create it on the device where it is used: "
        "`torch.tensor(..., device=<the other operand>.device)`."
    )


# --- a missing device: `check=False` offered only where the function takes it ---------------------


@pytest.mark.parametrize(
    ("call", "operation"),
    [
        (
            lambda: devicekit.materialize(torch.nn.Linear(2, 2, device="meta"), "cuda:63"),
            "materialize",
        ),
        (lambda: devicekit.deferred("cuda:63"), "deferred"),
        (lambda: devicekit.prefetch([torch.ones(2)], device="cuda:63"), "prefetch"),
        (lambda: devicekit.to_device(torch.ones(2), "cuda:63"), "to_device"),
    ],
)
def test_a_missing_device_offers_no_check_to_functions_without_it(
    call: Callable[[], object], operation: str
) -> None:
    with pytest.raises(devicekit.DeviceUnavailableError) as info:
        call()
    available = ", ".join(map(str, info.value.available))
    assert str(info.value) == (
        f"{operation}('cuda:63'): cuda:63 is not available on this machine. Available devices: "
        f"{available}. Use one of those."
    )


def test_a_missing_device_offers_check_false_to_as_device() -> None:
    with pytest.raises(devicekit.DeviceUnavailableError) as info:
        devicekit.as_device("cuda:63")
    available = ", ".join(map(str, info.value.available))
    assert str(info.value) == (
        "as_device('cuda:63'): cuda:63 is not available on this machine. Available devices: "
        f"{available}. Use one of those, or pass check=False to build the torch.device anyway."
    )
