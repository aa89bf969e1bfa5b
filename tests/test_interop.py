"""`to_device` with the objects users bring from other libraries and from torch itself.

The real packages are used (the `interop` extra); a test whose package is missing is skipped with
the reason. `meta` stands in for an accelerator on CPU-only machines: the objects really move
(device, shapes and dtypes are checked), only the values cannot be compared there.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

import devicekit
from devicekit import to_device

META = torch.device("meta")


def target_device() -> torch.device:
    """The machine's accelerator where there is one, else `meta`."""
    return META if devicekit.accelerator_type() is None else devicekit.as_device("accelerator")


def real_values(device: torch.device) -> bool:
    return device.type != "meta"


def import_or_skip(name: str) -> ModuleType:
    try:
        with warnings.catch_warnings():
            # torch_geometric calls torch.jit.script at import time, which torch 2.13 deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"{name} is not installed (the `interop` extra): {error}")


# --- Hugging Face transformers ------------------------------------------------------------------


def test_transformers_batch_encoding_keeps_its_type_and_moves() -> None:
    transformers = import_or_skip("transformers")
    ids = torch.tensor([[101, 7592, 102, 0], [101, 2088, 999, 102]])
    encoding = transformers.BatchEncoding(
        {"input_ids": ids, "attention_mask": (ids != 0).long()}, tensor_type="pt"
    )
    device = target_device()
    batch = {"encoding": encoding, "labels": torch.tensor([0, 1])}
    moved = to_device(batch, device)
    assert isinstance(moved["encoding"], transformers.BatchEncoding)
    assert set(moved["encoding"].keys()) == {"input_ids", "attention_mask"}
    assert moved["encoding"]["input_ids"].device == device
    assert moved["encoding"].input_ids.shape == (2, 4)  # attribute access still works
    assert moved["labels"].device == device
    if real_values(device):
        assert torch.equal(moved["encoding"]["input_ids"].cpu(), ids)


# --- tensordict ---------------------------------------------------------------------------------


def test_tensordict_keeps_batch_size_nesting_and_moves() -> None:
    tensordict = import_or_skip("tensordict")
    data = tensordict.TensorDict(
        {"obs": torch.randn(4, 3), "next": {"reward": torch.randn(4, 1)}}, batch_size=[4]
    )
    device = target_device()
    moved = to_device({"data": data, "step": 7}, device)
    assert isinstance(moved["data"], tensordict.TensorDict)
    assert moved["data"].batch_size == torch.Size([4])
    assert moved["data"]["obs"].device == device
    assert moved["data"]["next", "reward"].device == device
    assert moved["step"] == 7
    assert data["obs"].device == torch.device("cpu")  # the input is left as it was


# --- PyTorch Geometric --------------------------------------------------------------------------


def test_pyg_data_moves() -> None:
    geometric = import_or_skip("torch_geometric.data")
    graph = geometric.Data(
        x=torch.randn(4, 3), edge_index=torch.tensor([[0, 1, 2], [1, 2, 3]]), y=torch.tensor([1])
    )
    device = target_device()
    moved = to_device([graph], device)
    assert isinstance(moved[0], geometric.Data)
    assert moved[0].x.device == device
    assert moved[0].edge_index.device == device
    assert moved[0].num_nodes == 4


# --- torch.utils.data.DataLoader ----------------------------------------------------------------


class Samples(Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": torch.full((3,), float(index)), "meta": {"id": index, "name": f"s{index}"}}


def test_dataloader_with_workers_and_pinned_memory() -> None:
    device = target_device()
    pin = real_values(device)  # pinning needs an accelerator; torch warns without one
    loader = DataLoader(Samples(), batch_size=4, num_workers=2, pin_memory=pin)
    seen = []
    for batch in loader:
        if pin:
            assert batch["x"].is_pinned()
        moved = to_device(batch, device)
        assert moved["x"].device == device
        assert moved["meta"]["name"] == batch["meta"]["name"]  # strings stay as they are
        assert moved["meta"]["id"].device == device  # default_collate made the ids a tensor
        if real_values(device):
            assert torch.equal(moved["x"].cpu(), batch["x"])
        seen += batch["meta"]["name"]
    assert seen == [f"s{i}" for i in range(10)]


# --- torch.compile ------------------------------------------------------------------------------


def test_compiled_module_moves_and_still_runs() -> None:
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    # aot_eager runs dynamo and AOTAutograd without needing a C++ compiler for inductor
    compiled = torch.compile(model, backend="aot_eager")
    inputs = torch.randn(3, 4)
    expected = model(inputs)
    assert torch.allclose(compiled(inputs), expected)
    device = target_device()
    moved = to_device(compiled, device)
    assert moved is compiled  # modules move in place, as with Module.to
    assert {p.device for p in model.parameters()} == {device}
    out = moved(to_device(inputs, device))
    assert out.device == device
    assert out.shape == (3, 2)
    if real_values(device):
        assert torch.allclose(out.cpu(), expected, atol=1e-6)


# --- modules: tied weights, buffers, parametrizations -------------------------------------------


class TiedLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most language models
        self.register_buffer("position", torch.arange(4))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.register_buffer("absent", None)


def test_tied_weights_stay_tied() -> None:
    # torch's own Module.to('meta') unties them (each module gets a new Parameter there).
    model = TiedLanguageModel()
    device = target_device()
    moved = to_device(model, device)
    assert moved is model
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.device == device
    assert len(list(model.parameters())) == 1  # still one shared parameter


def test_buffers_move_persistent_or_not_and_none_stays_none() -> None:
    model = TiedLanguageModel()
    device = target_device()
    to_device(model, device)
    assert model.position.device == device
    assert model.scratch.device == device
    assert model.absent is None
    assert set(model.state_dict()) == {"embed.weight", "head.weight", "position"}


class Symmetric(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.triu() + weight.triu(1).transpose(-1, -2)


def test_parametrizations_move_with_their_originals() -> None:
    layer = nn.Linear(3, 3)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    device = target_device()
    to_device(layer, device)
    original = layer.parametrizations.weight.original
    assert original.device == device
    assert layer.weight.device == device  # recomputed from the moved original
    assert parametrize.is_parametrized(layer, "weight")
    if real_values(device):
        assert torch.equal(layer.weight.cpu(), layer.weight.cpu().T)


def test_weight_norm_parametrization_moves() -> None:
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    device = target_device()
    to_device(layer, device)
    assert {p.device for p in layer.parameters()} == {device}
    assert layer.weight.device == device
    assert layer(to_device(torch.randn(5, 3), device)).shape == (5, 2)


# --- dtype= and objects with their own .to() ----------------------------------------------------


def test_tensordict_with_dtype_is_refused_rather_than_left_uncast() -> None:
    """`TensorDict.to(dtype)` casts integer tensors too, unlike `to_device`'s `dtype=`: devicekit
    cannot ask it for floating-point tensors only, so it says so instead of returning float32."""
    tensordict = import_or_skip("tensordict")
    data = tensordict.TensorDict(
        {"obs": torch.ones(4, 3), "action": torch.zeros(4, dtype=torch.long)}, batch_size=[4]
    )
    with pytest.raises(devicekit.UnmovableError) as caught:
        to_device({"data": data}, "cpu", dtype=torch.float64)
    assert str(caught.value) == (
        "to_device(cpu, dtype=torch.float64): batch['data'] (TensorDict) moves with its own "
        ".to(), which devicekit calls as .to(cpu) and cannot ask to cast only floating-point and "
        "complex tensors, and it holds batch['data']['obs'] (f32[4,3] @ cpu), which "
        "dtype=torch.float64 would cast. Cast it with its own method first, if that casts as "
        "you mean, or leave it out with skip= and move it in a call of its own."
    )
    assert caught.value.path == "batch['data']['obs']"
    assert caught.value.obj is data
    assert data["obs"].dtype == torch.float32  # nothing was changed


def test_tensordict_already_in_the_dtype_or_skipped_moves_with_dtype() -> None:
    tensordict = import_or_skip("tensordict")
    data = tensordict.TensorDict(
        {"obs": torch.ones(4, 3, dtype=torch.float64), "action": torch.zeros(4, dtype=torch.long)},
        batch_size=[4],
    )
    moved = to_device({"data": data, "x": torch.ones(2)}, "meta", dtype=torch.float64)
    assert moved["data"]["obs"].device == META
    assert moved["data"]["action"].dtype == torch.long  # not cast: as to_device's own tensors
    assert moved["x"].dtype == torch.float64
    single = tensordict.TensorDict({"obs": torch.ones(2)}, batch_size=[2])
    kept = to_device(
        {"data": single, "x": torch.ones(2)}, "cpu", dtype=torch.float64, skip={"data"}
    )
    assert kept["data"] is single
    assert kept["x"].dtype == torch.float64


def test_batch_encoding_of_integer_ids_moves_with_dtype() -> None:
    """Nothing in it would be cast, so there is nothing to refuse."""
    transformers = import_or_skip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(1, 3, dtype=torch.long)})
    moved = to_device({"enc": encoding, "x": torch.ones(1)}, "meta", dtype=torch.float16)
    assert moved["enc"]["input_ids"].device == META
    assert moved["enc"]["input_ids"].dtype == torch.long
    assert moved["x"].dtype == torch.float16


def test_module_takes_dtype_as_module_to_does() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Embedding(3, 2))
    model.register_buffer("steps", torch.zeros(1, dtype=torch.long))
    assert to_device({"model": model}, "cpu", dtype=torch.float64)["model"] is model
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.steps.dtype == torch.long  # integer buffers keep theirs, as with Module.to
