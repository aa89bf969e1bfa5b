"""`devicekit.audit`: each finding on a small realistic module, word for word; no false alarm on
torch's layers and tiny Hugging Face models; the pytest helper."""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import devicekit
from devicekit import AuditError, AuditFinding, AuditReport, InvalidArgumentError, audit
from devicekit.testing import assert_movable

pytest_plugins = ["pytester"]


def _hold(module: nn.Module, **attributes: Any) -> None:
    """`module.name = value` for each, as user code writes it (typed for mypy)."""
    for name, value in attributes.items():
        setattr(module, name, value)


# --- each finding -------------------------------------------------------------------------------


class CausalAttention(nn.Module):
    """The classic: a mask made in `__init__` and kept as a plain attribute."""

    def __init__(self, n: int = 4, *, registered: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(n, n)
        if registered:
            self.register_buffer("mask", torch.ones(n, n).tril(), persistent=False)
        else:
            self.mask = torch.ones(n, n).tril()


class Blocks(nn.Module):
    def __init__(self, *, registered: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CausalAttention(registered=registered) for _ in range(2))


def test_plain_attribute_tensor() -> None:
    report = audit(Blocks())
    assert [finding.path for finding in report] == ["model.blocks[0].mask", "model.blocks[1].mask"]
    assert report[0] == AuditFinding(
        path="model.blocks[0].mask",
        kind="plain-attribute-tensor",
        message="model.blocks[0].mask is a tensor (f32[4,4] @ cpu) held as a plain attribute "
        "of CausalAttention, not a registered buffer: Module.to() does not move it.",
        fix='Register it in CausalAttention.__init__: self.register_buffer("mask", ..., '
        "persistent=False) (persistent=True also saves it in the state_dict).",
        severity="error",
    )
    assert audit(Blocks(registered=True)) == []


def test_the_finding_is_true_module_to_leaves_it_behind() -> None:
    model = Blocks().to("meta")
    assert model.blocks[0].mask.device == torch.device("cpu")
    assert model.blocks[0].get_parameter("proj.weight").device == torch.device("meta")


class KVCache(nn.Module):
    def __init__(self, *, registered: bool = False) -> None:
        super().__init__()
        if registered:
            for i in range(2):
                self.register_buffer(f"k_{i}", torch.zeros(2, 3), persistent=False)
        else:
            self.layers = [{"k": torch.zeros(2, 3), "v": torch.zeros(2, 3)}]


def test_tensors_in_plain_containers() -> None:
    report = audit(KVCache(), name="cache")
    assert [finding.path for finding in report] == ["cache.layers[0]['k']", "cache.layers[0]['v']"]
    assert report[0].kind == "plain-attribute-tensor"
    assert report[0].message == (
        "cache.layers[0]['k'] is a tensor (f32[2,3] @ cpu) inside the list cache.layers, a "
        "plain attribute of KVCache, not a registered buffer: Module.to() does not move it."
    )
    assert report[0].fix == (
        "Register each tensor as a buffer (self.register_buffer(name, tensor, "
        "persistent=False)), or stack them into one buffer."
    )
    assert audit(KVCache(registered=True)) == []


class Experts(nn.Module):
    def __init__(self, *, registered: bool = False) -> None:
        super().__init__()
        scales = [nn.Parameter(torch.ones(3)) for _ in range(2)]
        layers = {"up": nn.Linear(3, 3)}
        if registered:
            self.scales = nn.ParameterList(scales)
            self.layers = nn.ModuleDict(layers)
        else:
            _hold(self, scales=scales, layers=layers)


def test_parameters_and_modules_in_plain_containers() -> None:
    report = audit(Experts())
    assert [(finding.path, finding.kind) for finding in report] == [
        ("model.scales[0]", "plain-attribute-tensor"),
        ("model.scales[1]", "plain-attribute-tensor"),
        ("model.layers['up']", "unregistered-module"),
    ]
    assert report[0].message == (
        "model.scales[0] is a parameter (f32[3] @ cpu) inside the list model.scales, a plain "
        "attribute of Experts, not a registered parameter: Module.to() does not move it."
    )
    assert report[0].fix == (
        "Hold the parameters in an nn.ParameterList: self.scales = nn.ParameterList(...)."
    )
    assert report[2].message == (
        "model.layers['up'] is a Linear inside the dict model.layers, a plain attribute of "
        "Experts, not a registered submodule: Module.to() does not move its parameters, and "
        "model.parameters() does not list them."
    )
    assert (
        report[2].fix == "Hold the modules in an nn.ModuleDict: self.layers = nn.ModuleDict(...)."
    )
    assert audit(Experts(registered=True)) == []


class Rotary(nn.Module):
    def __init__(self, *, alias: bool = True) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** torch.arange(0, 4, 2), persistent=False)
        if alias:
            self.original_inv_freq = self.inv_freq


def test_stale_buffer_alias() -> None:
    report = audit(Rotary())
    assert report == [
        AuditFinding(
            path="model.original_inv_freq",
            kind="stale-alias",
            message="model.original_inv_freq (f32[2] @ cpu) is the buffer model.inv_freq, held as "
            "a plain attribute of Rotary: Module.to() replaces buffers with moved copies, so this "
            "reference keeps the old tensor on the old device.",
            fix="Read self.inv_freq where it is needed instead of keeping a second reference to "
            "it.",
        )
    ]
    moved = Rotary().to("meta")  # the finding is true
    assert (moved.inv_freq.device.type, moved.original_inv_freq.device.type) == ("meta", "cpu")
    assert audit(Rotary(alias=False)) == []


def test_an_alias_of_a_parameter_moves_with_it() -> None:
    model = nn.Linear(2, 2)
    _hold(model, weights=[model.weight])  # what RNNs' _flat_weights does
    assert audit(model) == []
    model.to(torch.float64)
    assert vars(model)["weights"][0] is model.weight  # set in place, kept


def test_an_alias_of_a_parameter_on_meta_goes_stale_in_to_empty() -> None:
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    _hold(model, weights=[model.weight])
    (finding,) = audit(model)
    assert finding.message == (
        "model.weights[0] (f32[2,2] @ meta) is the parameter model.weight on the meta device, "
        "inside the list model.weights, a plain attribute of Linear: to_empty() replaces "
        "parameters on meta with new tensors, so this reference keeps the old tensor on the old "
        "device."
    )
    model.to_empty(device="cpu")
    assert vars(model)["weights"][0] is not model.weight  # the finding is true
    with torch.device("meta"):
        assert audit(nn.LSTM(2, 2)) == []  # RNNs' own _apply refreshes _flat_weights


class TiedLM(nn.Module):
    def __init__(self, *, tie: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie == "copy":
            self.head.weight = nn.Parameter(self.embed.weight)  # shares storage, a new tensor
        elif tie == "same":
            self.head.weight = self.embed.weight


def test_split_tie_by_shared_storage() -> None:
    report = audit(TiedLM(tie="copy"))
    assert report == [
        AuditFinding(
            path="model.head.weight",
            kind="split-tie",
            message="model.head.weight and model.embed.weight are two tensors sharing one "
            "storage: Module.to() copies each separately, so after a move they no longer share "
            "memory and training updates them apart.",
            fix="Tie them by assigning one parameter object to both (model.head.weight = "
            "model.embed.weight), not nn.Parameter(...) of the other or a view of it.",
        )
    ]
    moved = TiedLM(tie="copy").to(torch.float64)  # the finding is true: the tie is gone
    assert moved.head.weight.data_ptr() != moved.embed.weight.data_ptr()
    assert audit(TiedLM(tie="same")) == []
    assert audit(TiedLM(tie="none")) == []


def _declaring(ties: dict[str, str], **children: nn.Module) -> nn.Module:
    """A module declaring ties as Hugging Face models do (`all_tied_weights_keys`)."""
    model = nn.Module()
    for name, child in children.items():
        model.add_module(name, child)
    _hold(model, all_tied_weights_keys=ties)
    return model


def test_declared_ties_of_a_model_and_its_submodel_are_one_finding() -> None:
    inner = _declaring(
        {"head.weight": "embed.weight", "r'blocks.\\d+'": "embed.weight"},
        embed=nn.Embedding(4, 2),
        head=nn.Linear(2, 4, bias=False),
    )
    outer = _declaring({"lm.head.weight": "lm.embed.weight"}, lm=inner)
    assert [(finding.path, finding.kind) for finding in audit(outer)] == [
        ("model.lm.head.weight", "split-tie")
    ]
    inner.get_submodule("head").weight = inner.get_submodule("embed").weight
    assert audit(outer) == []


class OlderHuggingFaceLM(nn.Module):
    """How transformers 4 declares the tie: a list, and `config.tie_word_embeddings`."""

    _tied_weights_keys: ClassVar[list[str]] = ["lm_head.weight"]

    def __init__(self, *, tie_word_embeddings: bool = True) -> None:
        super().__init__()
        _hold(self, config=types.SimpleNamespace(tie_word_embeddings=tie_word_embeddings))
        self.embed = nn.Embedding(4, 2)
        self.lm_head = nn.Linear(2, 4, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_ties_declared_the_older_way() -> None:
    model = OlderHuggingFaceLM()
    (finding,) = audit(model)
    assert finding.message == (
        "model.lm_head.weight (f32[4,2] @ cpu) is declared tied to model.embed.weight "
        "(f32[4,2] @ cpu) by config.tie_word_embeddings, but they are two tensors: training "
        "updates them apart."
    )
    model.lm_head.weight = model.embed.weight
    assert audit(model) == []
    assert audit(OlderHuggingFaceLM(tie_word_embeddings=False)) == []


def test_buffers_sharing_storage_are_not_a_tie() -> None:
    model = nn.Module()
    cache = torch.randn(2, 8)
    model.register_buffer("cos", cache[0])
    model.register_buffer("sin", cache[1])
    assert audit(model) == []


def test_uninitialised_after_to_empty() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), Rotary(alias=False))
    report = audit(model)
    assert report == [
        AuditFinding(
            path="model[1].inv_freq",
            kind="uninitialised-after-to-empty",
            message="model[1].inv_freq is a non-persistent buffer on the meta device: to_empty() "
            "gives it uninitialised memory, and load_state_dict() does not fill it (the "
            "state_dict does not hold it).",
            fix="Recompute it after to_empty() (in the reset_parameters() or init_weights() you "
            "call then), build the model with buffers on a real device (accelerate's "
            "init_empty_weights(include_buffers=False)), or make it persistent.",
        )
    ]
    assert audit(nn.Sequential(nn.Linear(2, 2), Rotary(alias=False))) == []


def test_non_persistent_buffers_with_info() -> None:
    model = nn.Sequential(Rotary(alias=False))
    assert audit(model) == []
    assert audit(model, info=True) == [
        AuditFinding(
            path="model[0].inv_freq",
            kind="non-persistent-buffer",
            message="model[0].inv_freq is a non-persistent buffer: Module.to() moves it, but "
            "state_dict() does not save it, so a model built on the meta device and loaded with "
            "to_empty() and load_state_dict() would leave it uninitialised.",
            fix="Nothing to do while the model is built on a real device; otherwise recompute it "
            "after to_empty(), or make it persistent.",
            severity="info",
        )
    ]


def test_mixed_devices() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].to("meta")
    report = audit(model)
    assert report == [
        AuditFinding(
            path="model",
            kind="mixed-devices",
            message="the parameters and buffers of model are on 2 devices (cpu: model[0].weight, "
            "model[0].bias, model[2].weight and 1 more; meta: model[1].weight, model[1].bias).",
            fix="Move it to one device (model.to(device), or devicekit.to_device for other "
            "objects). If it is split on purpose (model parallel, an accelerate device_map or "
            "offload), ignore this warning; the parts must then hand activations over in "
            "forward.",
            severity="warning",
        )
    ]
    assert audit(model.to("meta")) == []


def test_accelerate_layouts(hugging_face: dict[str, Any]) -> None:
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():  # parameters on meta, buffers on the CPU: meant
        model = hugging_face["llama"]()
    assert audit(model).kinds == ("mixed-devices",)
    with accelerate.init_empty_weights(include_buffers=True):  # inv_freq lost in to_empty()
        model = hugging_face["llama"]()
    assert audit(model).kinds == ("uninitialised-after-to-empty",)


def test_mixed_devices_names_list_places_by_index() -> None:
    model = nn.Module()
    model.scales = nn.ParameterList([nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))])
    model.scales[1] = nn.Parameter(torch.ones(1, device="meta"))
    (finding,) = audit(model)
    assert finding.message == (
        "the parameters and buffers of model are on 2 devices (cpu: model.scales[0]; meta: "
        "model.scales[1])."
    )


def test_mixed_devices_in_any_structure() -> None:
    batch = {"ids": torch.ones(2), "labels": [torch.zeros(2, device="meta")]}
    (finding,) = audit(batch, name="batch")
    assert finding.message == (
        "the tensors of batch are on 2 devices (cpu: batch['ids']; meta: batch['labels'][0])."
    )


def test_model_parallel_on_simulated_gpus() -> None:
    with devicekit.simulated_devices("cuda", 2):
        model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        model[0].to("cuda:0")
        model[1].to("cuda:1")
        (finding,) = audit(model)
    assert finding.kind == "mixed-devices"
    assert "(cuda:0: model[0].weight, model[0].bias; cuda:1: model[1].weight" in finding.message


def test_optimizer_state_on_another_device() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert audit({"model": model, "optimizer": optimizer}, name="training") == []
    optimizer.state[model.weight]["exp_avg"] = torch.zeros(2, 2, device="meta")
    report = audit({"model": model, "optimizer": optimizer}, name="training")
    assert [finding.kind for finding in report] == ["optimizer-state-device"]
    assert report[0].message == (
        "training['optimizer'].state[training['model'].weight]['exp_avg'] (f32[2,2] @ meta) is "
        "on another device than its parameter training['model'].weight (cpu): the next step() "
        "fails with a device mismatch."
    )
    (alone,) = audit(optimizer, name="optimizer")
    assert alone.path == "optimizer.state[optimizer.param_groups[0]['params'][0]]['exp_avg']"


def test_adams_cpu_step_count_is_not_a_finding() -> None:
    model = nn.Linear(2, 2).to("meta")
    optimizer = torch.optim.SGD(model.parameters(), momentum=0.9)
    optimizer.state[model.weight] = {"step": torch.tensor(1.0)}
    assert audit([model, optimizer]) == []


# --- walking ------------------------------------------------------------------------------------


def test_cycles_and_shared_parts_end() -> None:
    parent = nn.Sequential(nn.Linear(2, 2))
    object.__setattr__(parent[0], "parent", parent)  # a back reference, not registered twice
    shared: list[Any] = [torch.ones(1)]
    _hold(parent[0], first=shared, second=shared)
    shared.append(shared)
    report = audit(parent)
    assert [finding.path for finding in report] == ["model[0].first[0]"]


def test_a_module_registered_elsewhere_is_not_unregistered() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    _hold(model[1], helpers=[model[0]])
    assert audit(model) == []


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 3)
        table = torch.arange(10.0)
        self.register_buffer("table", table)
        _hold(self, proj_t=self.proj.weight.T, head=table[:3])


def test_views_of_registered_tensors_go_stale() -> None:
    report = audit(Transposed())
    assert [(finding.path, finding.kind) for finding in report] == [
        ("model.proj_t", "stale-alias"),
        ("model.head", "stale-alias"),
    ]
    assert report[0].message == (
        "model.proj_t (f32[2,3] @ cpu) shares memory with the parameter model.proj.weight, held "
        "as a plain attribute of Transposed: Module.to() gives the parameter new memory, and "
        "this view keeps the old memory on the old device."
    )
    assert report[0].fix == (
        "Compute it from self.proj.weight where it is needed (in forward) instead of keeping a "
        "view of it."
    )
    model = Transposed().to(torch.float64)  # the finding is true
    assert vars(model)["proj_t"].dtype == torch.float32


class MovesItsCache(nn.Module):
    """A module that moves its plain attributes itself, in `_apply` (which `.to()` calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = [torch.zeros(2)]

    def _apply(self, fn: Any, recurse: bool = True) -> MovesItsCache:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self.cache = [fn(t) for t in self.cache]
        return self


def test_a_module_with_its_own_apply_is_trusted() -> None:
    assert audit(MovesItsCache()) == []
    assert vars(MovesItsCache().to("meta"))["cache"][0].device.type == "meta"


def test_modules_without_tensors_or_whose_tensors_are_registered() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    _hold(model, activations=[nn.ReLU()], shadow=[nn.Sequential(model[0])])
    assert audit(model) == []


def test_a_module_whose_init_never_ran() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            pass  # no super().__init__()

    model = nn.Sequential(nn.Linear(2, 2))
    object.__setattr__(model, "broken", Broken())
    assert [finding.kind for finding in audit(model)] == ["unregistered-module"]
    assert audit(Broken()) == []


def test_a_module_hidden_from_registration() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    object.__setattr__(model, "teacher", nn.Linear(2, 2))
    (finding,) = audit(model)
    assert (finding.path, finding.kind) == ("model.teacher", "unregistered-module")
    assert finding.fix == (
        "Assign it as usual (self.teacher = module) so that nn.Module registers it."
    )


@dataclasses.dataclass
class State:
    hidden: torch.Tensor
    steps: int = 0


def test_dataclasses_and_objects_with_to_are_looked_into() -> None:
    model = nn.Linear(2, 2)
    _hold(model, state=State(torch.zeros(2)))
    (finding,) = audit(model)
    assert finding.path == "model.state.hidden"


def test_hooks_that_recompute_an_attribute_are_understood() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # old-style weight_norm is deprecated
        old = nn.utils.weight_norm(nn.Linear(3, 3))
    spectral = nn.utils.spectral_norm(nn.Linear(3, 3))
    from torch.nn.utils import prune

    pruned = prune.l1_unstructured(  # type: ignore[no-untyped-call]
        nn.Linear(3, 3), "weight", amount=0.5
    )
    for model in (old, spectral, pruned):
        assert isinstance(vars(model)["weight"], torch.Tensor)  # a plain attribute, recomputed
        assert audit(model) == [], type(model)


def test_report() -> None:
    report = audit(Experts())
    assert report
    assert not audit(nn.Linear(1, 1))
    assert isinstance(report[1:], AuditReport)
    assert len(report[1:]) == 2
    assert report.kinds == ("plain-attribute-tensor", "unregistered-module")
    assert report.at_least("error") == report
    assert report == tuple(report)
    assert hash(report) == hash(tuple(report))
    assert str(report).splitlines()[:3] == [
        "audit(model): 3 errors",
        "[error] plain-attribute-tensor: model.scales[0] is a parameter (f32[3] @ cpu) inside "
        "the list model.scales, a plain attribute of Experts, not a registered parameter: "
        "Module.to() does not move it.",
        "    fix: Hold the parameters in an nn.ParameterList: self.scales = nn.ParameterList(...).",
    ]
    mixed = audit([torch.ones(1), torch.ones(1, device="meta")], name="xs")
    assert mixed.format("error") == "audit(xs): no findings."
    assert mixed.format().startswith("audit(xs): 1 warning\n[warning] mixed-devices: ")
    assert repr(audit(nn.Linear(1, 1))) == "AuditReport([], name='model')"
    assert report.name == "model"
    with pytest.raises(AttributeError):
        report.name = "net"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report[0].path = "elsewhere"  # type: ignore[misc]


def test_errors_come_first() -> None:
    model = nn.Sequential(Blocks(), nn.Linear(2, 2).to("meta"))
    assert [finding.severity for finding in audit(model)] == ["error", "error", "warning"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: audit(nn.Linear(1, 1), name=""),
            "audit(name=''): expected a non-empty string naming the object in the paths, "
            "such as 'model'.",
        ),
        (
            lambda: audit(nn.Linear(1, 1), info=1),  # type: ignore[arg-type]
            "audit(info=1): expected True or False.",
        ),
        (
            lambda: audit(nn.Linear(1, 1)).format("fatal"),  # type: ignore[arg-type]
            "AuditReport.format('fatal'): expected a severity, one of 'error', 'warning' or "
            "'info', got 'fatal'.",
        ),
        (
            lambda: assert_movable(nn.Linear(1, 1), fail_on="warn"),  # type: ignore[arg-type]
            "assert_movable(fail_on='warn'): expected a severity, one of 'error', 'warning' or "
            "'info', got 'warn'.",
        ),
    ],
)
def test_bad_arguments(call: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        call()
    assert str(caught.value) == message


# --- a property: every tensor in a plain attribute, with its path, and nothing else --------------


#: The model the property test hangs its nestings on; its registered weight may appear in them.
_HOLDER_MODEL = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))


def _nestings() -> st.SearchStrategy[Any]:
    fresh = st.one_of(
        st.builds(lambda n: torch.zeros(n), st.integers(0, 3)),
        st.builds(lambda n: nn.Parameter(torch.zeros(n)), st.integers(1, 2)),
    )
    leaves = st.one_of(
        fresh,
        st.just(_HOLDER_MODEL[0].weight),  # an alias of a registered parameter: not a finding
        st.sampled_from([None, 1, "x", 2.5]),
    )
    keys = st.text("abc_", min_size=1, max_size=3)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(keys, inner, max_size=3),
            st.lists(fresh, max_size=2).map(set),
        ),
        max_leaves=12,
    )


def _expected_paths(value: Any, path: str) -> Iterator[str]:
    if value is _HOLDER_MODEL[0].weight:
        return
    if isinstance(value, torch.Tensor):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _expected_paths(item, f"{path}[{key!r}]")
    elif isinstance(value, set):
        for index, item in enumerate(value):
            yield from _expected_paths(item, f"{path}{{{index}}}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _expected_paths(item, f"{path}[{index}]")


@given(_nestings())
def test_every_held_tensor_is_reported_with_its_path(nesting: Any) -> None:
    holder = _HOLDER_MODEL.get_submodule("1.0")
    if hasattr(holder, "held"):
        delattr(holder, "held")  # the last example's, a parameter's or a plain attribute's
    _hold(holder, held=nesting)  # a bare parameter is registered: not a finding
    report = audit(_HOLDER_MODEL)
    expected = (
        [] if isinstance(nesting, nn.Parameter) else _expected_paths(nesting, "model[1][0].held")
    )
    assert [finding.path for finding in report] == list(expected)
    assert {finding.kind for finding in report} <= {"plain-attribute-tensor"}


# --- no false alarm -----------------------------------------------------------------------------

#: Layers whose constructor needs arguments the generic attempts below do not give (made when
#: the layer is, on its device).
_SPECIAL: dict[str, Any] = {
    "AdaptiveLogSoftmaxWithLoss": lambda: (8, 10, [4]),
    "RNNBase": lambda: ("LSTM", 4, 4),
    "RNNCellBase": lambda: (4, 4, True, 4),
    "Transformer": lambda: (8, 2, 1, 1, 16),
    "TransformerDecoder": lambda: (nn.TransformerDecoderLayer(8, 2, 16), 1),
    "TransformerEncoder": lambda: (nn.TransformerEncoderLayer(8, 2, 16), 1),
    "TransformerDecoderLayer": lambda: (8, 2, 16),
    "TransformerEncoderLayer": lambda: (8, 2, 16),
    "Unflatten": lambda: (1, (2, 2)),
}
_ATTEMPTS: tuple[tuple[Any, ...], ...] = ((), (4,), (4, 4), (4, 4, 3), (4, 2, 2), ((2, 2),))


def _every_layer() -> Iterator[tuple[str, nn.Module]]:
    for name in sorted(nn.modules.__all__):
        cls = getattr(nn.modules, name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue
        for args in (_SPECIAL[name](),) if name in _SPECIAL else _ATTEMPTS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # constructors warning about their settings
                    yield name, cls(*args)
                break
            except (TypeError, ValueError, AssertionError, RuntimeError):
                continue
        else:
            raise AssertionError(f"cannot build {name}: add it to _SPECIAL")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_every_torch_nn_layer_audits_clean(device: str) -> None:
    with torch.device(device):
        layers = dict(_every_layer())
    assert len(layers) > 150
    assert {"MultiheadAttention", "LSTM", "Transformer", "BatchNorm2d"} <= set(layers)
    for name, layer in layers.items():
        assert audit(layer, info=True) == [], name
    assert audit(nn.Sequential(*layers.values()), info=True) == []


class _Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def _symmetric() -> nn.Module:
    model = nn.Linear(3, 3)
    nn.utils.parametrize.register_parametrization(model, "weight", _Symmetric())
    return model


_OTHER_TORCH_MODELS: dict[str, Any] = {
    "weight_norm": lambda: nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)),
    "spectral_norm": lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)),
    "orthogonal": lambda: nn.utils.parametrizations.orthogonal(nn.Linear(3, 3)),
    "register_parametrization": _symmetric,
    "lazy": lambda: nn.Sequential(nn.LazyLinear(3), nn.LazyConv2d(2, 3), nn.LazyBatchNorm1d()),
    "lstm-projections": lambda: nn.LSTM(4, 4, num_layers=2, proj_size=2, bidirectional=True),
    "fx": lambda: torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU())),
    "jit.script": lambda: torch.jit.script(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))),
    "jit.trace": lambda: torch.jit.trace(  # type: ignore[no-untyped-call]
        nn.Linear(3, 3), torch.ones(1, 3)
    ),
    "compile": lambda: torch.compile(nn.Linear(3, 3)),
    "DataParallel": lambda: nn.DataParallel(nn.Linear(3, 3)),
    "quantized": lambda: torch.ao.nn.quantized.Linear(3, 3),  # type: ignore[no-untyped-call]
    "dynamic-quantized": lambda: torch.ao.nn.quantized.dynamic.LSTM(  # type: ignore[no-untyped-call]
        3, 3
    ),
}


@pytest.mark.parametrize("name", list(_OTHER_TORCH_MODELS))
def test_torch_utilities_audit_clean(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        model = _OTHER_TORCH_MODELS[name]()
    assert audit(model, info=True) == []


def test_torch_geometric_layers_audit_clean() -> None:
    geometric = pytest.importorskip("torch_geometric.nn")
    built = {}
    for family in (geometric.conv, geometric.norm, geometric.aggr, geometric.pool):
        for name in family.__all__:
            cls = getattr(family, name)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                continue
            for args in ((4, 4), (4,), (), (4, 4, 2)):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        built[name] = cls(*args)
                    break
                except Exception:  # a constructor wanting other arguments
                    continue
    assert len(built) > 80
    assert {"GCNConv", "GATConv", "SAGEConv", "GINConv", "BatchNorm"} <= set(built)
    for name, layer in built.items():
        assert audit(layer, info=True) == [], name


def _tiny_hugging_face_models() -> Iterator[tuple[str, Any]]:
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    gpt2.bos_token_id = gpt2.eos_token_id = 0
    llama = transformers.LlamaConfig(
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    bert = transformers.BertConfig(
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        vocab_size=64,
    )
    t5 = transformers.T5Config(
        num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, d_kv=8, num_heads=2, vocab_size=64
    )
    yield "gpt2", lambda: transformers.GPT2LMHeadModel(gpt2)
    yield "llama", lambda: transformers.LlamaForCausalLM(llama)
    yield "bert", lambda: transformers.BertForMaskedLM(bert)
    yield "t5", lambda: transformers.T5ForConditionalGeneration(t5)


@pytest.fixture(scope="module")
def hugging_face() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(_tiny_hugging_face_models())


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5"])
def test_tiny_hugging_face_models_audit_clean(name: str, hugging_face: dict[str, Any]) -> None:
    model = hugging_face[name]()
    assert audit(model) == []
    assert {finding.kind for finding in audit(model, info=True)} <= {"non-persistent-buffer"}
    assert_movable(model)


def test_hugging_face_ties_split(hugging_face: dict[str, Any]) -> None:
    model = hugging_face["gpt2"]()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    (finding,) = audit(model)
    assert finding == AuditFinding(
        path="model.lm_head.weight",
        kind="split-tie",
        message="model.lm_head.weight (f32[64,16] @ cpu) is declared tied to "
        "model.transformer.wte.weight (f32[64,16] @ cpu) by all_tied_weights_keys, but they are "
        "two tensors: training updates them apart.",
        fix="Call model.tie_weights() after loading and placing the model, and keep tied weights "
        "on one device (in a device_map, the same device).",
    )
    model.tie_weights()
    assert audit(model) == []


def test_hugging_face_llama_on_meta(hugging_face: dict[str, Any]) -> None:
    with torch.device("meta"):
        model = hugging_face["llama"]()
    assert [finding.path for finding in audit(model)] == [
        "model.model.rotary_emb.inv_freq",
        "model.model.rotary_emb.original_inv_freq",
    ]
    assert {finding.kind for finding in audit(model)} == {"uninitialised-after-to-empty"}


def test_torch_transformer_audits_clean_on_every_device() -> None:
    model = nn.Transformer(8, 2, 1, 1, 16, batch_first=True)
    assert audit(model, info=True) == []
    assert audit(model.to("meta"), info=True) == []


# --- assert_movable -----------------------------------------------------------------------------


def test_assert_movable() -> None:
    assert assert_movable(Blocks(registered=True)) == []
    with pytest.raises(AuditError) as caught:
        assert_movable(Blocks(), name="net")
    assert isinstance(caught.value, AssertionError)
    assert [finding.path for finding in caught.value.report] == [
        "net.blocks[0].mask",
        "net.blocks[1].mask",
    ]
    assert str(caught.value).splitlines()[0] == "assert_movable(net): 2 errors"


def test_assert_movable_fails_on_warnings_when_asked() -> None:
    split = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to("meta"))
    assert [finding.kind for finding in assert_movable(split)] == ["mixed-devices"]
    with pytest.raises(AuditError, match=r"^assert_movable\(model\): 1 warning\n"):
        assert_movable(split, fail_on="warning")
    with pytest.raises(AuditError, match="non-persistent-buffer"):
        assert_movable(Rotary(alias=False), fail_on="info")


def test_assert_movable_fails_a_pytest_test_with_the_findings(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_model="""
        import torch
        from devicekit.testing import assert_movable

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mask = torch.ones(2)

        def test_net():
            assert_movable(Net())
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--tb=short")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "test_model.py:10: in test_net",
            "    assert_movable(Net())",
            "E   devicekit._errors.AuditError: assert_movable(model): 1 error",
            "E   ?error? plain-attribute-tensor: model.mask is a tensor (f32?2? @ cpu) held *",
        ]
    )
    assert "in assert_movable" not in result.stdout.str()  # its own frame is hidden
