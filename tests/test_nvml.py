"""NVML's facts matched to CUDA's device indices, on an emulated NVML of mixed cards.

NVML numbers GPUs in PCI bus order; CUDA numbers them fastest first unless
`CUDA_DEVICE_ORDER=PCI_BUS_ID`, then keeps those `CUDA_VISIBLE_DEVICES` names (by index in that
order, or by UUID). These tests pin which facts land on which `cuda:i`, and that devicekit
leaves the facts out rather than guess where the matching is not certain.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import devicekit
from devicekit import _nvml
from tests.fakes import FakeGpu, FakeNvml

GiB = 2**30
# Listed in NVML's order on purpose not PCI order, so that no test passes by accident.
H100 = FakeGpu("NVIDIA H100", "GPU-bbbb-1111", (0, 0x5E, 0), free=70 * GiB, capability=(9, 0))
A100_LOW = FakeGpu("NVIDIA A100", "GPU-aaaa-0000", (0, 0x3B, 0), free=10 * GiB, capability=(8, 0))
A100_HIGH = FakeGpu("NVIDIA A100", "GPU-cccc-2222", (0, 0x86, 0), free=40 * GiB, capability=(8, 0))
MIXED = [H100, A100_LOW, A100_HIGH]

MakeNvml = Callable[[list[FakeGpu]], FakeNvml]


def names(devices: list[_nvml.NvmlDevice] | None) -> list[str] | None:
    return None if devices is None else [f"{d.name} {d.uuid}" for d in devices]


def label(*gpus: FakeGpu) -> list[str]:
    return [f"{gpu.name} {gpu.uuid}" for gpu in gpus]


def four_same(free: int = 40 * GiB) -> list[FakeGpu]:
    return [
        FakeGpu("NVIDIA H100", uuid, (0, bus, 0), free=free)
        for uuid, bus in [
            ("GPU-aaaa-0000", 0x1B),
            ("GPU-bbbb-1111", 0x2B),
            ("GPU-cccc-2222", 0x3B),
            ("GPU-abcd-3333", 0x4B),
        ]
    ]


class TestOrder:
    def test_mixed_cards_fastest_first_are_not_guessed(
        self, fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake_nvml(MIXED)
        assert _nvml.visible_devices() is None
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        assert _nvml.visible_devices() is None

    def test_pci_bus_order(self, fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
        fake_nvml(MIXED)
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        assert names(_nvml.visible_devices()) == label(A100_LOW, H100, A100_HIGH)

    def test_one_model_is_in_pci_order_either_way(self, fake_nvml: MakeNvml) -> None:
        gpus = four_same()
        fake_nvml([gpus[2], gpus[0], gpus[3], gpus[1]])
        assert names(_nvml.visible_devices()) == label(*gpus)

    @pytest.mark.parametrize("order", [None, "PCI_BUS_ID"])
    def test_uuids_name_devices_in_any_order(
        self, fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch, order: str | None
    ) -> None:
        fake_nvml(MIXED)
        if order is not None:
            monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc,GPU-bbbb-1111")
        assert names(_nvml.visible_devices()) == label(A100_HIGH, H100)

    def test_an_index_into_an_unknown_order_is_not_guessed(
        self, fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake_nvml(MIXED)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
        assert _nvml.visible_devices() is None
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        assert names(_nvml.visible_devices()) == label(H100)

    def test_without_pci_addresses_only_uuids_match(
        self, fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        library = fake_nvml(four_same())
        library.nvmlDeviceGetPciInfo_v3 = lambda handle, info: 3  # type: ignore[method-assign]
        assert _nvml.visible_devices() is None
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abcd")
        assert names(_nvml.visible_devices()) == ["NVIDIA H100 GPU-abcd-3333"]


class TestMig:
    A100 = FakeGpu(
        "NVIDIA A100",
        "GPU-aaaa-0000",
        (0, 0x3B, 0),
        capability=(8, 0),
        instances=[
            FakeGpu("NVIDIA A100 MIG 3g.40gb", "MIG-1111", (0, 0, 0), 30 * GiB, 40 * GiB, None),
            FakeGpu("NVIDIA A100 MIG 3g.40gb", "MIG-2222", (0, 0, 0), 20 * GiB, 40 * GiB, None),
        ],
    )

    def test_a_gpu_in_mig_mode_is_not_taken_for_itself(
        self, fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake_nvml([self.A100])
        assert _nvml.visible_devices() is None
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        assert _nvml.visible_devices() is None
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
        assert _nvml.visible_devices() is None

    def test_mig_uuids_name_instances(
        self, fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake_nvml([self.A100])
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2222")
        (instance,) = _nvml.visible_devices() or []
        assert (instance.uuid, instance.free_memory, instance.total_memory) == (
            "MIG-2222",
            20 * GiB,
            40 * GiB,
        )
        assert instance.capability == (8, 0)  # the GPU's, where the instance reports none
        assert instance.pci is None
        assert not instance.mig


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", []),
        ("2", [2]),
        ("3,1", [3, 1]),
        ("1, 2", [1, 2]),
        ("GPU-bbbb", [1]),
        ("GPU-c,0", [2, 0]),
        ("0,7,1", [0]),  # CUDA stops at the first entry it cannot resolve
        ("1,1", [1]),  # and at a repeated one
        ("GPU-a", []),  # an ambiguous UUID prefix resolves nothing
        ("²", []),  # not a number to CUDA: an unknown UUID
        ("\uff10", []),  # a full-width zero is not device 0 either
        ("0,²,1", [0]),
        ("9" * 5000, []),  # more digits than `int()` reads
        ("-1,0", []),
    ],
)
def test_visible_devices_follow_cuda_rules(
    fake_nvml: MakeNvml, monkeypatch: pytest.MonkeyPatch, spec: str, expected: list[int]
) -> None:
    gpus = four_same()
    fake_nvml(gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    assert names(_nvml.visible_devices()) == label(*(gpus[i] for i in expected))


ENV_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))


@given(spec=ENV_TEXT, order=st.sampled_from([None, "PCI_BUS_ID", "FASTEST_FIRST", "x"]))
@example(spec="²", order=None)
@example(spec="0\x1f", order=None)
@example(spec="0," + "9" * 5000, order="PCI_BUS_ID")
def test_any_visible_devices_text_gives_devices_or_none(spec: str, order: str | None) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        gpus = [*MIXED, TestMig.A100]
        library = FakeNvml(gpus)
        monkeypatch.setattr(_nvml, "_library", lambda: library)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
        if order is None:
            monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
        else:
            monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
        found = _nvml.visible_devices()
        if found is not None:
            uuids = [device.uuid for device in found]
            assert len(set(uuids)) == len(uuids)
            known = {gpu.uuid for gpu in gpus} | {i.uuid for i in TestMig.A100.instances}
            assert set(uuids) <= known


class TestDiscovery:
    """What `devices()` and `best_device()` make of it, before CUDA is initialised."""

    def test_mixed_cards_get_no_facts_without_a_certain_order(self, fake_backend) -> None:  # type: ignore[no-untyped-def]
        fake_backend("cuda", count=3, gpus=MIXED)
        infos = devicekit.devices()[1:]
        assert [(i.name, i.free_memory, i.total_memory) for i in infos] == [
            ("cuda:0", None, None),
            ("cuda:1", None, None),
            ("cuda:2", None, None),
        ]
        assert devicekit.explain_best_device() == (
            torch.device("cuda", 0),
            "the current cuda device",
        )

    def test_pci_bus_order_puts_each_card_at_its_index(
        self,
        fake_backend,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        fake_backend("cuda", count=3, gpus=MIXED)
        infos = devicekit.devices()[1:]
        assert [(i.name, i.free_memory // GiB) for i in infos if i.free_memory] == [
            ("NVIDIA A100", 10),
            ("NVIDIA H100", 70),
            ("NVIDIA A100", 40),
        ]
        assert devicekit.best_device() == torch.device("cuda", 1)

    def test_uuids_in_visible_devices(self, fake_backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc-2222,GPU-aaaa-0000")
        fake_backend("cuda", count=2, gpus=MIXED)
        infos = devicekit.devices()[1:]
        assert [(i.name, i.free_memory) for i in infos] == [
            ("NVIDIA A100", 40 * GiB),
            ("NVIDIA A100", 10 * GiB),
        ]
        assert devicekit.best_device() == torch.device("cuda", 0)


class TestAfterCudaInitialised:
    """Once CUDA is initialised, torch's properties name the GPU and NVML adds free memory."""

    @staticmethod
    def properties(gpu: FakeGpu, **changes: object) -> SimpleNamespace:
        domain, bus, device = gpu.pci
        fields: dict[str, object] = {
            "name": gpu.name,
            "total_memory": gpu.total,
            "major": (gpu.capability or (0, 0))[0],
            "minor": (gpu.capability or (0, 0))[1],
            "uuid": gpu.uuid.removeprefix("GPU-"),
            "pci_domain_id": domain,
            "pci_bus_id": bus,
            "pci_device_id": device,
        }
        fields.update(changes)
        return SimpleNamespace(**fields)

    def install(
        self,
        fake_backend,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch,
        cuda_order: list[SimpleNamespace],
    ) -> list[int]:
        fake_backend("cuda", count=len(cuda_order), gpus=MIXED)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: cuda_order[i])
        asked: list[int] = []

        def mem_get_info(index: int) -> tuple[int, int]:
            asked.append(index)  # would create a context on that GPU
            return 1, 2

        monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
        return asked

    def test_matched_by_pci_address(self, fake_backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        # CUDA's fastest-first order: the H100 first, though NVML lists it elsewhere.
        order = [self.properties(g, uuid="") for g in (H100, A100_HIGH, A100_LOW)]
        asked = self.install(fake_backend, monkeypatch, order)
        infos = devicekit.devices()[1:]
        assert [(i.name, i.free_memory) for i in infos] == [
            ("NVIDIA H100", 70 * GiB),
            ("NVIDIA A100", 40 * GiB),
            ("NVIDIA A100", 10 * GiB),
        ]
        assert asked == []

    def test_matched_by_uuid_without_pci_fields(self, fake_backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        order = [self.properties(A100_HIGH, pci_bus_id=None)]
        asked = self.install(fake_backend, monkeypatch, order)
        assert devicekit.devices()[1].free_memory == 40 * GiB
        assert asked == []

    def test_unmatched_falls_back_to_torch(self, fake_backend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        order = [self.properties(H100, uuid="", pci_bus_id=0x99)]
        asked = self.install(fake_backend, monkeypatch, order)
        info = devicekit.devices()[1]
        assert (info.name, info.free_memory, info.total_memory) == ("NVIDIA H100", 1, 2)
        assert asked == [0]


def test_driver_version(fake_nvml: MakeNvml) -> None:
    fake_nvml([])
    assert _nvml.driver_version() == "555.42"
    assert _nvml.visible_devices() == []


def test_without_nvml_everything_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_nvml, "_library", lambda: None)
    assert _nvml.visible_devices() is None
    assert _nvml.all_devices() is None
    assert _nvml.driver_version() is None
