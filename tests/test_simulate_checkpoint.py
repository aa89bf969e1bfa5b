"""`torch.save`/`torch.load` under `simulated_devices`: files as real CUDA writes them, and every
`map_location` form applied as torch applies it to real devices."""

from __future__ import annotations

import ctypes
import io
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator

import pytest
import torch

from devicekit import simulated_devices
from devicekit._simulate import _TAG
from tests.machine import REAL_CUDA

pytestmark = pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def sim() -> Iterator[list[torch.device]]:
    with simulated_devices("cuda", 2) as made:
        yield made


def _save(obj: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _pickle_of(buffer: io.BytesIO) -> bytes:
    with zipfile.ZipFile(buffer) as archive:
        data = b"".join(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    buffer.seek(0)
    return data


def _locations(buffer: io.BytesIO) -> list[str]:
    """The storage locations a checkpoint names (the strings after each storage key)."""
    return [
        str(argument)
        for opcode, argument, _ in pickletools.genops(_pickle_of(buffer))
        if opcode.name in ("BINUNICODE", "SHORT_BINUNICODE")
        and str(argument)[:4] in ("cpu", "cuda")
    ]


def test_save_writes_the_real_location_and_no_devicekit_state(sim: object) -> None:
    model = torch.nn.Linear(2, 2).to("cuda:1")
    buffer = _save({"w": torch.ones(2, device="cuda:1"), "cpu": torch.ones(2), "model": model})
    assert b"_devicekit" not in _pickle_of(buffer)
    assert _TAG.encode() not in _pickle_of(buffer)
    assert sorted(set(_locations(buffer))) == ["cpu", "cuda:1"]


def test_tensors_made_in_an_earlier_block_save_their_simulated_location() -> None:
    with simulated_devices("cuda", 2):
        kept = torch.ones(2, device="cuda:1")  # a module-scoped fixture, say
    with simulated_devices("cuda", 2):
        buffer = _save({"w": kept})
        assert _locations(buffer) == ["cuda:1"]
        assert torch.load(buffer)["w"].device == CUDA1


def test_views_save_their_storage_once_on_its_device(sim: object) -> None:
    base = torch.arange(6.0, device="cuda:0")
    loaded = torch.load(_save({"a": base, "b": base[2:]}))
    assert loaded["a"].device == loaded["b"].device == CUDA0
    assert loaded["b"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()
    assert loaded["b"].tolist() == [2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize(
    ("map_location", "expected"),
    [
        (None, CUDA1),
        ("cpu", CPU),
        (CPU, CPU),
        ("cuda", CUDA0),
        ("cuda:0", CUDA0),
        ("cuda:1", CUDA1),
        (torch.device("cuda", 0), CUDA0),
        ({"cuda:1": "cpu"}, CPU),
        ({"cuda:1": "cuda:0"}, CUDA0),
        ({"cuda:0": "cpu"}, CUDA1),
        (lambda storage, location: storage, CPU),
        (lambda storage, location: None, CUDA1),
        (lambda storage, location: storage.cuda(0), CUDA0),
        (lambda storage, location: storage.cuda(), CUDA0),
        (lambda storage, location: storage.to(device="cuda:1"), CUDA1),
        (lambda storage, location: storage.to(device="cpu"), CPU),
    ],
)
@pytest.mark.parametrize("weights_only", [True, False])
def test_every_map_location_form(
    sim: object, map_location: object, expected: torch.device, weights_only: bool
) -> None:
    buffer = _save({"w": torch.arange(3.0, device="cuda:1")})
    loaded = torch.load(buffer, map_location=map_location, weights_only=weights_only)
    assert loaded["w"].device == expected
    assert loaded["w"].tolist() == [0.0, 1.0, 2.0]
    assert _TAG not in loaded["w"].__dict__ or expected.type == "cuda"


def test_a_cpu_checkpoint_maps_onto_a_simulated_device(sim: object) -> None:
    with simulated_devices("cuda", 2):
        pass
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, map_location="cuda:1")["w"].device == CUDA1


def test_the_current_device_is_where_cuda_without_an_index_goes(sim: object) -> None:
    buffer = _save({"w": torch.ones(2, device="cuda:0")})
    torch.cuda.set_device(1)
    assert torch.load(buffer, map_location="cuda")["w"].device == CUDA1


def test_a_device_beyond_the_simulated_count_is_refused_like_cuda() -> None:
    with simulated_devices("cuda", 2):
        buffer = _save({"w": torch.ones(2, device="cuda:1")})
    with simulated_devices("cuda", 1), pytest.raises(RuntimeError) as caught:
        torch.load(buffer)
    assert str(caught.value).startswith(
        "Attempting to deserialize object on CUDA device 1 but torch.cuda.device_count() is 1. "
        "Please use torch.load with map_location to map your storages to an existing device."
    )


def test_outside_the_simulation_loading_fails_as_on_a_cpu_only_machine() -> None:
    with simulated_devices("cuda", 2):
        buffer = _save({"w": torch.ones(2, device="cuda:1")})
    with pytest.raises(RuntimeError, match=re.escape("map_location=torch.device('cpu')")):
        torch.load(buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu")
    assert loaded["w"].device == CPU
    assert _TAG not in loaded["w"].__dict__


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(3, 2), lambda: torch.nn.BatchNorm1d(3)])
def test_training_state_resumes_on_the_saved_device(
    sim: object, make: Callable[[], torch.nn.Module]
) -> None:
    model = make().to("cuda:1")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3, device="cuda:1")).sum().backward()
    optimizer.step()
    checkpoint = torch.load(
        _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1})
    )
    resumed = make().to("cuda:1")
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters())
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for name, tensor in checkpoint["model"].items():
        assert tensor.device == CUDA1, name
    for state in resumed_optimizer.state.values():
        assert state["exp_avg"].device == CUDA1
    assert all(
        torch.equal(a.cpu(), b.cpu())
        for a, b in zip(model.parameters(), resumed.parameters(), strict=False)
    )


def test_a_whole_module_round_trips(sim: object) -> None:
    model = torch.nn.Linear(2, 2).to("cuda:1")
    loaded = torch.load(_save(model), weights_only=False)
    assert loaded.weight.device == CUDA1
    assert isinstance(loaded.weight, torch.nn.Parameter)
    assert _TAG not in _pickle_of(_save(model)).decode("latin-1")


def test_a_cpu_storage_at_a_simulated_storages_address_is_saved_as_cpu() -> None:
    # The state of a simulated tensor can be gathered without its storage being saved (pickling
    # a wrapper subclass does that). The entry this leaves must name that storage only: keyed by
    # an address, it outlived the storage and labelled a later CPU storage `cuda:1` (seen on
    # torch_geometric's `test_save_and_load[*-cpu]` under `--devicekit-simulate`, where the
    # address was reused). A second storage object over the same memory must be saved as `cpu`.
    with simulated_devices("cuda", 2):
        gathered = torch.ones(64, device="cuda:1")
        torch._utils._get_obj_state(gathered)
        memory = (ctypes.c_float * 64).from_address(gathered.untyped_storage().data_ptr())
        on_cpu = torch.frombuffer(memory, dtype=torch.float32)
        assert on_cpu.untyped_storage() is not gathered.untyped_storage()
        assert on_cpu.device == torch.device("cpu")
        buffer = io.BytesIO()
        torch.save(on_cpu, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)
    assert loaded.device == torch.device("cpu")
    assert _TAG not in loaded.__dict__
