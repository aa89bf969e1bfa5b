"""`devicekit.deferred` and `devicekit.materialize`: big models built on meta, made real with
ties kept and the values eager construction gives; and `to_device` keeping ties on every move."""

from __future__ import annotations

import copy
import gc
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import devicekit
from benchmarks import bench_materialize
from benchmarks.bench_materialize import MODELS, Rotary, TiedLM, compare, eager, sharing
from devicekit import MaterializeError, MaterializeWarning, deferred, materialize, to_device

CPU = torch.device("cpu")
META = torch.device("meta")


M = TypeVar("M", bound=nn.Module)


def built(build: Callable[[], M], seed: int = 0, device: str = "cpu") -> M:
    torch.manual_seed(seed)
    with deferred(device):
        return build()


def assert_like_eager(build: Callable[[], M], seed: int = 0) -> M:
    model = materialize(built(build, seed), "cpu")
    assert compare(eager(build, CPU, seed), model) == (True, True)
    return model


# --- the ten models -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_ten_models_are_materialised_like_eager_construction(device: str) -> None:
    pytest.importorskip("transformers")  # two of the ten are Hugging Face models (`interop`)
    found = bench_materialize.results(devices=[device], methods=["devicekit"])
    wrong = {name: result for (name, _, _), result in found.items() if result != (True, True)}
    assert not wrong
    assert bench_materialize.count(found, device, "devicekit") == len(MODELS) == 10


def test_the_table_counts_and_prints_every_model() -> None:
    models = {"LM with a tied head": TiedLM, "buffers computed in __init__": Rotary}
    found = bench_materialize.results(["cpu"], ["devicekit"], models)
    text = bench_materialize.table(found, ["cpu"], ["devicekit"])
    assert text.splitlines()[0] == "| model | devicekit (cpu) |"
    assert "| LM with a tied head | ties / identical |" in text
    assert text.splitlines()[-1] == "| **right (ties and values)** | **2/2** |"


def test_the_peers_lose_what_issue_16_says_they_lose() -> None:
    # to_empty() + reset_parameters(): the tie and the buffers computed in __init__ are lost.
    models = {"tied": TiedLM, "rotary": Rotary}
    found = bench_materialize.results(["cpu"], ["to_empty+reset"], models)
    assert found["tied", "cpu", "to_empty+reset"] == (False, False)
    assert found["rotary", "cpu", "to_empty+reset"] == (True, False)


# --- replay ---------------------------------------------------------------------------------------


def test_the_generator_advances_as_in_eager_construction() -> None:
    materialize(built(TiedLM, seed=3), "cpu")
    after_replay = torch.rand(4)
    torch.manual_seed(3)
    TiedLM()
    assert torch.equal(after_replay, torch.rand(4))


def test_different_seeds_give_different_models() -> None:
    first = materialize(built(TiedLM, seed=1), "cpu")
    second = materialize(built(TiedLM, seed=2), "cpu")
    assert not torch.equal(first.embed.weight, second.embed.weight)


@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 40), width=st.integers(1, 12))
def test_any_seed_and_size_replays_bit_identically(seed: int, vocab: int, width: int) -> None:
    def build() -> TiedLM:
        return TiedLM(vocab, width)

    model = assert_like_eager(build, seed)
    assert model.head.weight is model.embed.weight


class Derived(nn.Module):
    """Buffers derived from one another, a view of a parameter, and a tensor attribute."""

    row: torch.Tensor
    scaled: torch.Tensor
    alias: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))
        self.register_buffer("row", self.weight.data[1])  # a view of the parameter
        self.register_buffer("scaled", self.weight.detach() * 2 + torch.arange(6))
        self.register_buffer("alias", self.scaled)  # one tensor, two names
        self.cache = torch.linspace(0, 1, 5)  # not registered: kept on the module


def test_views_aliases_and_tensor_attributes_are_kept() -> None:
    model = assert_like_eager(Derived)
    assert model.alias is model.scaled
    assert model.row.untyped_storage().data_ptr() == model.weight.untyped_storage().data_ptr()
    assert model.row.storage_offset() == 6
    with torch.no_grad():
        model.weight[1, 0] = 100.0
    assert model.row[0] == 100.0  # still a view
    assert model.cache.device == CPU
    torch.manual_seed(0)
    assert torch.equal(model.cache, Derived().cache)


class Replaced(nn.Module):
    """Initialisation drawn and then thrown away, and a parent re-initialising children."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.first.weight = nn.Parameter(torch.empty(3, 3))  # the drawn weight is discarded
        nn.init.orthogonal_(self.first.weight)
        self.second = nn.Linear(3, 3)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.bias, std=0.5, a=-0.1, b=0.1)  # rejects samples


def test_discarded_draws_and_parent_init_are_replayed() -> None:
    assert_like_eager(Replaced)


def test_deepcopies_made_while_building_are_replayed() -> None:
    def build() -> nn.ModuleList:
        layer = nn.Linear(4, 4)
        return nn.ModuleList([copy.deepcopy(layer) for _ in range(3)])

    model = assert_like_eager(build)
    assert model[0].get_parameter("weight") is not model[1].get_parameter("weight")


def test_materialising_part_then_the_whole_gives_the_eager_model() -> None:
    def build() -> nn.Sequential:
        return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), TiedLM())

    model = built(build, seed=5)
    materialize(model[1], "cpu")
    assert model[0].get_parameter("weight").is_meta
    torch.rand(3)  # the user draws meanwhile: the replay of the rest is unaffected
    materialize(model, "cpu")
    assert compare(eager(build, CPU, 5), model) == (True, True)


def test_materialize_is_idempotent_and_in_place() -> None:
    model = built(TiedLM)
    assert materialize(model, "cpu") is model
    tensors = dict(model.named_parameters())
    state = torch.get_rng_state()
    assert materialize(model, "cpu") is model
    assert dict(model.named_parameters()) == tensors
    assert all(tensors[name] is t for name, t in model.named_parameters())
    assert torch.equal(state, torch.get_rng_state())


def test_a_module_not_on_meta_is_moved_as_to_device_moves_it() -> None:
    model = TiedLM()
    weight = model.embed.weight
    assert materialize(model, "cpu") is model
    assert model.embed.weight is weight
    materialize(model, "meta")
    assert model.embed.weight.is_meta
    assert model.head.weight is model.embed.weight


def test_parameter_flags_and_attributes_are_kept() -> None:
    with deferred():
        model = nn.Linear(2, 2)
        model.bias.requires_grad_(False)
        model.weight.note = "kept"  # type: ignore[attr-defined]
    materialize(model, "cpu")
    assert isinstance(model.weight, nn.Parameter)
    assert model.weight.requires_grad
    assert not model.bias.requires_grad
    assert model.weight.note == "kept"  # type: ignore[attr-defined]


def test_on_a_simulated_device_the_device_generator_is_used() -> None:
    with devicekit.simulated_devices("cuda", 1):
        torch.manual_seed(0)
        with deferred("cuda:0"):
            model = TiedLM()
        cpu_state = torch.get_rng_state()
        materialize(model, "cuda:0")
        assert torch.equal(cpu_state, torch.get_rng_state())  # the CPU's generator is untouched
        assert model.embed.weight.device == torch.device("cuda:0")
        reference = eager(TiedLM, torch.device("cuda:0"), 0)
        assert compare(reference, model) == (True, True)


# --- what building sees ---------------------------------------------------------------------------


def test_the_default_dtype_while_building_is_replayed() -> None:
    class Half(nn.Module):
        scale: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                self.weight = nn.Parameter(torch.randn(3))
                self.register_buffer("scale", torch.arange(4) / 3)  # the default dtype too
            finally:
                torch.set_default_dtype(previous)

    model = assert_like_eager(Half)
    assert model.weight.dtype == model.scale.dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32


def test_code_being_built_sees_the_device_it_is_built_for() -> None:
    seen: dict[str, object] = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))
            seen["device"] = self.weight.device
            seen["is_meta"] = self.weight.is_meta
            seen["default"] = torch.get_default_device()
            self.follows = nn.Buffer(torch.zeros(2, device=self.weight.device))

    with deferred("cpu"):
        model = Probe()
    assert seen == {"device": CPU, "is_meta": False, "default": CPU}
    assert model.weight.is_meta
    assert model.follows.is_meta
    assert torch.get_default_device() == CPU
    materialize(model, "cpu")
    assert torch.equal(model.follows, torch.zeros(2))


def test_only_the_calling_thread_records() -> None:
    found = {}

    def other() -> None:
        found["device"] = torch.zeros(1).device

    with deferred():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert found["device"] == CPU


def test_nn_init_is_restored_after_the_block() -> None:
    code = nn.init.trunc_normal_.__code__
    outside = torch.empty(3)
    with deferred():
        assert nn.init.trunc_normal_.__code__ is not code
        nn.init.trunc_normal_(outside, std=0.1)  # a real tensor: the function itself runs
    assert nn.init.trunc_normal_.__code__ is code
    assert bool((outside.abs() <= 2).all())


def test_init_functions_referenced_before_the_block_are_recorded_as_one_op() -> None:
    captured = nn.init.trunc_normal_  # as transformers keeps them, in a table of its own

    class Captured(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(8, 8))
            captured(self.weight, std=0.5, a=-0.2, b=0.2)

    assert_like_eager(Captured)


def test_a_recording_is_let_go_once_its_modules_are_materialised() -> None:
    from devicekit._deferred import recording_of

    source = torch.ones(64, 64)
    with deferred():
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(2, 2))
        with torch.no_grad():  # the recording holds `source` for the replay
            model[0].get_parameter("weight").copy_(source)
    found = recording_of(model[0].get_parameter("weight"))
    assert found is not None
    recording = weakref.ref(found)
    del found
    materialize(model[1], "cpu")
    gc.collect()
    assert recording() is not None  # model[0] still needs it
    materialize(model, "cpu")
    gc.collect()
    assert recording() is None
    assert torch.equal(model[0].get_parameter("weight"), source)


def test_a_recording_lives_as_long_as_its_modules() -> None:
    from devicekit._deferred import recording_of

    with deferred():
        model = nn.Linear(2, 2)
    found = recording_of(model.weight)
    assert found is not None
    recording = weakref.ref(found)
    del found
    del model
    gc.collect()
    assert recording() is None


# --- errors ---------------------------------------------------------------------------------------


def test_data_dependent_init_raises_naming_the_module_and_op() -> None:
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.factor = float(self.scale.sum().item())

    with pytest.raises(MaterializeError) as caught, deferred():
        Reads()
    assert caught.value.op == "Tensor.item"
    assert caught.value.path == "Reads.__init__"
    message = str(caught.value)
    assert message.startswith("deferred(): Reads.__init__ ran Tensor.item on f32[] @ meta at ")
    assert "cannot be recorded: compute the value from Python numbers" in message
    assert isinstance(caught.value.__cause__, (RuntimeError, NotImplementedError))
    # the block ended with the error: nothing of it is left behind
    assert torch.zeros(1).device == CPU
    assert nn.init.trunc_normal_.__code__.co_name == "trunc_normal_"


def test_deferred_is_also_a_decorator() -> None:
    @deferred()
    def build() -> nn.Linear:
        return nn.Linear(2, 2)

    model = build()
    assert model.weight.is_meta
    assert torch.zeros(1).device == CPU
    materialize(model, "cpu")
    assert not model.weight.is_meta


def test_a_parameter_assigned_after_the_block_raises_naming_its_path() -> None:
    model = built(TiedLM)
    model.body[0].weight = nn.Parameter(torch.empty(16, 16, device="meta"))
    with pytest.raises(MaterializeError) as caught:
        materialize(model, "cpu")
    assert caught.value.path == "model.body.0.weight"
    assert str(caught.value).startswith(
        "materialize(cpu): model.body.0.weight (f32[16,16] @ meta) was replaced after the "
        "deferred() block (assigned a new tensor?), and only what runs inside a "
        "devicekit.deferred() block is recorded"
    )
    assert "Fix: assign it inside the block, or materialise first and assign after" in str(
        caught.value
    )
    assert "pass init='reset'" in str(caught.value)


def test_a_cast_after_the_block_raises_naming_the_cast_and_the_fix() -> None:
    model = built(TiedLM).to(torch.bfloat16)
    with pytest.raises(MaterializeError) as caught:
        materialize(model, "cpu")
    assert caught.value.path == "model.embed.weight"
    assert caught.value.op == "Module.to"
    assert str(caught.value) == (
        "materialize(cpu): model.embed.weight (bf16[64,16] @ meta) was replaced after the "
        "deferred() block (cast from torch.float32 to torch.bfloat16, by Module.to or "
        "Tensor.to?), and only what runs inside a devicekit.deferred() block is recorded, so "
        "its values cannot be replayed. Fix: do the cast inside the block (`with "
        "devicekit.deferred(): model = Net().to(torch.bfloat16)`), or materialise first and "
        "cast after (`devicekit.materialize(model, 'cpu').to(torch.bfloat16)`); or pass "
        "init='reset' or init=None."
    )


def test_the_cast_inside_the_block_is_replayed_like_eager() -> None:
    torch.manual_seed(0)
    with deferred():
        model = TiedLM().to(torch.bfloat16)
    materialize(model, "cpu")
    torch.manual_seed(0)
    expected = TiedLM().to(torch.bfloat16)
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.dtype == torch.bfloat16
    for (name, value), (_, wanted) in zip(
        model.state_dict().items(), expected.state_dict().items(), strict=True
    ):
        assert torch.equal(value, wanted), name


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_a_deepcopy_after_the_block_raises_naming_the_copy(dtype: torch.dtype | None) -> None:
    original = built(TiedLM)
    model = copy.deepcopy(original)
    if dtype is not None:
        model.to(dtype)
    with pytest.raises(MaterializeError) as caught:
        materialize(model, "cpu")
    assert caught.value.op == "copy.deepcopy"
    cast = "" if dtype is None else " and cast from torch.float32 to torch.float16"
    described = "f32[64,16]" if dtype is None else "f16[64,16]"
    assert str(caught.value).startswith(
        f"materialize(cpu): model.embed.weight ({described} @ meta) was made after the "
        "deferred() block: its Embedding matches one built in the block, so it is most "
        f"likely a copy of it (copy.deepcopy?{cast}), and only what runs inside a "
        "devicekit.deferred() block is recorded, so its values cannot be replayed. Fix: copy "
        "inside the block"
    )
    materialize(original, "cpu")  # the original itself is still replayed
    assert not original.embed.weight.is_meta


def test_a_change_in_place_after_the_block_raises() -> None:
    model = built(TiedLM)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    with pytest.raises(MaterializeError, match=r"model\.embed\.weight .* changed in place after"):
        materialize(model, "cpu")


def test_a_model_built_under_torch_meta_needs_reset_or_none() -> None:
    with torch.device("meta"):
        model = TiedLM()
    with pytest.raises(MaterializeError, match=r"model\.embed\.weight"):
        materialize(model, "cpu")
    state = torch.get_rng_state()
    materialize(model, "cpu", init=None)
    assert model.head.weight is model.embed.weight
    assert not model.embed.weight.is_meta
    assert torch.equal(state, torch.get_rng_state())  # nothing drawn


def test_a_failing_replayed_op_names_the_op_and_the_tensor_it_feeds() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(2, 2))
            nn.init.normal_(self.weight)

    model = built(Failing)

    from devicekit._deferred import recording_of

    recording = recording_of(model.weight)
    assert recording is not None
    op = next(op for op in recording.ops if op.name == "torch.nn.init.normal_")
    op.kwargs = {**op.kwargs, "std": "wrong"}
    with pytest.raises(MaterializeError) as caught:
        materialize(model, "cpu")
    assert caught.value.op == "torch.nn.init.normal_"
    assert caught.value.path == "model.weight"
    assert "replaying torch.nn.init.normal_ (recorded op" in str(caught.value)
    assert caught.value.__cause__ is not None


def test_bad_arguments_raise_invalid_argument_error() -> None:
    with pytest.raises(devicekit.InvalidArgumentError, match=r"init='zeros'"):
        materialize(nn.Linear(1, 1), "cpu", init="zeros")  # type: ignore[arg-type]
    with pytest.raises(devicekit.InvalidArgumentError, match=r"expected an nn\.Module"):
        materialize(torch.ones(1), "cpu")  # type: ignore[type-var]


# --- init="reset" and None ------------------------------------------------------------------------


def test_reset_calls_reset_parameters_and_warns_about_the_rest() -> None:
    def build() -> nn.Sequential:
        return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), Rotary())

    model = built(build)
    with pytest.warns(MaterializeWarning) as caught:
        materialize(model, "cpu", init="reset")
    assert caught[0].message.paths == ("model.2",)  # type: ignore[union-attr]
    assert "model.2 (Rotary)" in str(caught[0].message)
    assert torch.equal(model[1].get_buffer("running_var"), torch.ones(2))
    assert not model[2].get_buffer("inv_freq").is_meta


def test_reset_keeps_ties_and_allocates_each_storage_once() -> None:
    with torch.device("meta"):
        model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        materialize(model, "cpu", init="reset")
    assert sharing(model) == sharing(TiedLM())


# --- to_device keeps ties -------------------------------------------------------------------------


@given(
    layers=st.integers(2, 5),
    ties=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=4),
    target=st.sampled_from(["meta", "cpu"]),
)
def test_to_device_and_materialize_keep_any_tie_structure(
    layers: int, ties: list[tuple[int, int]], target: str
) -> None:
    def build() -> nn.Sequential:
        model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(layers)))
        for source, destination in ties:
            model[destination % layers].weight = model[source % layers].get_parameter("weight")
        shared = torch.zeros(2)
        model.register_buffer("shared", shared)
        model[0].register_buffer("shared", shared)
        return model

    expected = sharing(build())
    model = to_device(build(), "meta")
    assert sharing(model) == expected
    to_device(model, "meta")
    assert sharing(model) == expected
    deferred_model = materialize(built(build), target)
    assert sharing(deferred_model) == expected


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="peak memory is read from Linux /proc"
)
def test_materialising_holds_at_most_one_extra_tensor() -> None:
    measured = bench_materialize.peak_memory("tied LM, 40 MiB", "devicekit")
    largest = 16.0  # the 8192 x 512 float embedding, in MiB
    assert measured["model_mib"] == pytest.approx(40.03, abs=0.01)
    assert measured["peak_mib"] <= measured["model_mib"] + largest + 4


def test_blocks_are_replayed_in_the_order_they_ran() -> None:
    torch.manual_seed(4)
    with deferred():
        first = nn.Linear(3, 3)
    with deferred():
        second = nn.Linear(3, 3)
    model = materialize(nn.Sequential(second, first), "cpu")  # met second first
    torch.manual_seed(4)
    first_eager, second_eager = nn.Linear(3, 3), nn.Linear(3, 3)
    assert torch.equal(model[1].get_parameter("weight"), first_eager.weight)
    assert torch.equal(model[0].get_parameter("weight"), second_eager.weight)


def test_to_device_of_a_meta_model_points_to_materialize() -> None:
    with deferred():
        model = TiedLM()
    with pytest.raises(devicekit.MoveError) as caught:
        to_device(model, "cpu")
    assert "give them memory with devicekit.materialize(model, 'cpu')" in str(caught.value)


class Swapped(nn.Module):
    """`param.data = other` swaps a parameter's storage after ops recorded the old one."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))
        nn.init.uniform_(self.weight)
        self.weight.data = torch.zeros(2, 2)
        nn.init.normal_(self.weight)


def test_a_storage_swapped_by_data_assignment_is_replayed() -> None:
    model = assert_like_eager(Swapped)
    assert model.weight.shape == (2, 2)


def _hugging_face(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    small = {"num_attention_heads": 2, "intermediate_size": 37, "vocab_size": 99}
    if name == "vit":
        config = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, image_size=16, patch_size=8, **small
        )
        return transformers.ViTModel(config)  # type: ignore[no-any-return]
    if name == "from_config":
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, **small)
        return transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-any-return]
    if name == "from_config_bf16":
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, **small)
        bf16: nn.Module = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16
        )
        return bf16
    if name == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, **small)
        return transformers.BertForMaskedLM(config)  # type: ignore[no-any-return]
    config = transformers.T5Config(d_model=32, d_ff=37, num_layers=1, num_heads=2, d_kv=8)
    return transformers.T5ForConditionalGeneration(config)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["vit", "bert", "t5", "from_config", "from_config_bf16"])
def test_more_hugging_face_models_materialise_like_eager(name: str) -> None:
    # ViT initialises with trunc_normal_ taken from transformers' own table of nn.init functions;
    # BERT swaps a storage with `.data =`; T5 ties three embeddings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_like_eager(lambda: _hugging_face(name))


def test_to_device_keeps_ties_when_torch_overwrites_parameters() -> None:
    model = TiedLM()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        to_device(model, "cpu", dtype=torch.float64)  # Module.to alone unties them here
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.dtype == torch.float64
    assert sharing(model) == sharing(TiedLM())


def test_moves_to_the_device_being_built_for_stay_recorded() -> None:
    class Moves(nn.Module):
        positions: torch.Tensor
        doubled: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("positions", torch.arange(4).cpu().float())
            self.register_buffer("doubled", self.positions.to("cpu") * 2)

    model = assert_like_eager(Moves)
    assert torch.equal(model.doubled, torch.arange(4).float() * 2)


def test_an_op_reading_a_meta_tensor_from_outside_the_block_raises() -> None:
    outside = torch.empty(3, device="meta")  # built under no recording: its values are unknown
    with deferred():
        model = nn.Linear(3, 2)
        with torch.no_grad():
            model.bias.copy_(outside[:2])
    with pytest.raises(MaterializeError) as caught:
        materialize(model, "cpu")
    assert caught.value.op == "Tensor.__getitem__"  # the slice of it, copied into the bias
    assert caught.value.path == "model.bias"
    assert str(caught.value).startswith(
        "materialize(cpu): the recorded Tensor.__getitem__ reads a meta tensor that was not made "
        "inside its devicekit.deferred() block, so its value is unknown (it feeds model.bias)."
    )


def test_bad_devices_fail_where_they_are_given() -> None:
    with pytest.raises(devicekit.InvalidDeviceSpecError, match="cuda:x"):
        deferred("cuda:x")
    with pytest.raises(devicekit.DeviceUnavailableError):
        materialize(nn.Linear(1, 1), "cuda:99")


def _identities(model: nn.Module) -> list[list[str]]:
    """The parameter and buffer slots of `model` grouped by the tensor object they hold."""
    groups: dict[int, list[str]] = {}
    for prefix, submodule in model.named_modules(remove_duplicate=False):
        for kind, entries in (("param", submodule._parameters), ("buffer", submodule._buffers)):
            for name, tensor in entries.items():
                if tensor is not None:
                    groups.setdefault(id(tensor), []).append(f"{kind}:{prefix}.{name}")
    return sorted(sorted(group) for group in groups.values())


def _storages(model: nn.Module) -> list[list[str]]:
    """The parameter and buffer slots of `model` grouped by the storage they live in."""
    groups: dict[int, list[str]] = {}
    for prefix, submodule in model.named_modules(remove_duplicate=False):
        for kind, entries in (("param", submodule._parameters), ("buffer", submodule._buffers)):
            for name, tensor in entries.items():
                if tensor is not None:
                    key = int(tensor.untyped_storage()._cdata)
                    groups.setdefault(key, []).append(f"{kind}:{prefix}.{name}")
    return sorted(sorted(group) for group in groups.values())


def _shared_buffers_model() -> nn.Module:
    parent = nn.Module()
    parent.m1, parent.m2 = nn.Module(), nn.Module()
    shared = torch.ones(3)
    parent.register_buffer("a", shared)
    parent.register_buffer("b", shared)
    parent.m1.register_buffer("x", shared)
    parent.m2.register_buffer("x", shared)
    weight = nn.Parameter(torch.ones(2))
    parent.m1.weight = weight
    parent.m2.register_buffer("w", weight)  # a parameter registered as a buffer elsewhere
    return parent


@pytest.mark.parametrize("target", ["meta", "cuda:1", "cpu"])
def test_to_device_keeps_buffers_registered_twice_or_by_two_modules(target: str) -> None:
    with devicekit.simulated_devices("cuda", 2):
        model = _shared_buffers_model()
        weight = model.get_parameter("m1.weight")
        to_device(model, target)
        buffer = model.get_buffer
        assert buffer("a") is buffer("b") is buffer("m1.x") is buffer("m2.x")
        assert buffer("m2.w") is model.get_parameter("m1.weight")
        assert isinstance(model.get_parameter("m1.weight"), nn.Parameter)
        assert buffer("a").device == torch.device(target)
        if target != "meta":  # torch keeps a parameter's identity where it moves in place
            assert model.get_parameter("m1.weight") is weight


_SLOTS = st.lists(
    st.tuples(st.integers(0, 3), st.booleans(), st.integers(0, 5)), min_size=1, max_size=10
)


@given(
    slots=_SLOTS,
    parameters=st.lists(
        st.sampled_from(["parameter", "tensor", "data", "view"]), min_size=6, max_size=6
    ),
    target=st.sampled_from(["meta", "cuda:1"]),
)
def test_to_device_keeps_any_sharing_of_parameters_and_buffers(
    slots: list[tuple[int, bool, int]], parameters: list[str], target: str
) -> None:
    # Six tensors (a Parameter, a tensor, or the `.data` or a view of the first tensor),
    # registered in up to four submodules, as a parameter (Parameters only) or a buffer, under
    # numbered names. Identities and shared storages come back as they were.
    with devicekit.simulated_devices("cuda", 2):
        first = nn.Parameter(torch.arange(4.0))
        made = {
            "parameter": lambda: nn.Parameter(torch.ones(2)),
            "tensor": lambda: torch.ones(2),
            "data": lambda: first.data,
            "view": lambda: first.data[1:3],
        }
        pool: list[torch.Tensor] = [first, *(made[kind]() for kind in parameters[1:])]
        model = nn.Module()
        children = [nn.Module() for _ in range(3)]
        for index, child in enumerate(children):
            model.add_module(f"c{index}", child)
        owners = [model, *children]
        model.first = first  # the views' base is always moved too (else each view is a copy)
        for number, (owner, as_buffer, which) in enumerate(slots):
            tensor = pool[which]
            if as_buffer or not isinstance(tensor, nn.Parameter):
                owners[owner].register_buffer(f"b{number}", tensor)
            else:
                owners[owner].register_parameter(f"p{number}", tensor)
        expected, storages = _identities(model), _storages(model)
        values = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
        to_device(model, target)
        assert _identities(model) == expected
        assert _storages(model) == storages
        if target != "meta":
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                assert torch.equal(tensor.cpu(), values[name]), name
        assert all(
            t.device == torch.device(target) for t in (*model.parameters(), *model.buffers())
        )


def test_the_timing_table_times_eager_against_record_and_materialise() -> None:
    tiny = {"GPT-2 tiny": bench_materialize._gpt2_sized(16, 1, 2, 64)}
    text = bench_materialize.timing(tiny, repeats=1)
    header, rule, row = text.splitlines()
    assert rule == "|---|---|---|---|---|---|"
    assert header == (
        "| model | parameters | eager s | record s | materialise s | record + materialise s |"
    )
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:2] == ["GPT-2 tiny", "0.0M"]
    eager, record, replay, total = map(float, cells[2:])
    assert min(eager, record, replay) > 0
    assert total == pytest.approx(record + replay, abs=0.0015)
    assert set(bench_materialize.TIMED_MODELS) == {
        "GPT-2 2 layers, width 128",
        "GPT-2 6 layers, width 512",
    }


@pytest.mark.parametrize("target", ["meta", "cuda:1"])
def test_to_device_keeps_buffers_that_alias_or_view_a_parameter(target: str) -> None:
    with devicekit.simulated_devices("cuda", 2):
        model = nn.Linear(2, 3)
        model.register_buffer("alias", model.weight.data)
        model.register_buffer("row", model.weight.data[1])
        to_device(model, target)
        storage = model.weight.untyped_storage()._cdata
        assert model.get_buffer("alias").untyped_storage()._cdata == storage
        assert model.get_buffer("row").untyped_storage()._cdata == storage
        assert model.get_buffer("row").storage_offset() == 2
        assert isinstance(model.weight, nn.Parameter)
        if target != "meta":
            with torch.no_grad():
                model.weight[1].fill_(7.0)
            assert model.get_buffer("row").cpu().tolist() == [7.0, 7.0]


def test_a_buffer_registered_after_the_block_raises_saying_so() -> None:
    model = built(TiedLM)
    model.body[0].register_buffer("late", torch.zeros(2, device="meta"))
    with pytest.raises(MaterializeError) as caught:
        materialize(model, "cpu")
    assert caught.value.path == "model.body.0.late"
    assert caught.value.op is None
    assert str(caught.value).startswith(
        "materialize(cpu): model.body.0.late (f32[2] @ meta) was assigned after the deferred() "
        "block (it held no meta tensor there), and only what runs inside a devicekit.deferred() "
        "block is recorded, so its values cannot be replayed. Fix: assign it inside the block"
    )
