"""Random numbers on simulated devices, kept apart from the CPU's, as CUDA keeps them.

Each simulated device has its own generator (a CPU generator underneath). A random op whose
tensors are on a simulated device draws from that device's generator: the mode calls `draw`,
which lends the device's state to torch's default CPU generator for the one call. So
`torch.cuda.manual_seed_all` reproduces cuda draws, seeding the CPU does not change them, and
cuda draws do not advance the CPU generator. Values differ from a real GPU's (CUDA's kernels
draw differently); the independence and the reproducibility are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "RANDOM_OPS",
    "Generators",
    "draw",
    "generator_class",
    "generator_for",
    "refuse_on_cpu",
    "seeded",
]

_REAL_GENERATOR = torch._C.Generator

#: The ops (by Python name) that draw random numbers: torch's `nondeterministic_seeded` aten ops
#: and the Python functions that call them in one torch-function call (`F.dropout2d`,
#: `nn.init.*`, `F.gumbel_softmax`).
RANDOM_OPS = frozenset(
    {
        "alpha_dropout",
        "alpha_dropout_",
        "bernoulli",
        "bernoulli_",
        "binomial",
        "cauchy",
        "cauchy_",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "dropout_",
        "exponential",
        "exponential_",
        "feature_alpha_dropout",
        "feature_alpha_dropout_",
        "feature_dropout",
        "feature_dropout_",
        "geometric",
        "geometric_",
        "gru",
        "gumbel_softmax",
        "kaiming_normal_",
        "kaiming_uniform_",
        "log_normal",
        "log_normal_",
        "lstm",
        "multi_head_attention_forward",
        "multinomial",
        "native_dropout",
        "normal",
        "normal_",
        "orthogonal_",
        "poisson",
        "rand",
        "rand_like",
        "randint",
        "randint_like",
        "randn",
        "randn_like",
        "random",
        "random_",
        "randperm",
        "rnn_relu",
        "rnn_tanh",
        "rrelu",
        "rrelu_",
        "scaled_dot_product_attention",
        "sparse_",
        "trunc_normal_",
        "uniform",
        "uniform_",
        "xavier_normal_",
        "xavier_uniform_",
        "_standard_gamma",
        "_sample_dirichlet",
    }
)


def generator_for(device: torch.device) -> torch.Generator | None:
    """The generator of the simulated `device` in the active simulation, or `None`."""
    generators = active
    if generators is None or device.type != generators.type:
        return None
    index = device.index or 0
    return generators.all[index] if index < len(generators.all) else None


class Generators:
    """The generators of one simulation's devices, seeded as CUDA seeds its own.

    They start from `torch.initial_seed()`: CUDA's generators take the seed of the last
    `torch.manual_seed` call before CUDA was first used, and the same default otherwise.
    """

    def __init__(self, device_type: str, count: int) -> None:
        seed = torch.initial_seed()
        self.type = device_type
        self.all: tuple[torch.Generator, ...] = tuple(
            _simulated_generator(torch.device(device_type, index), seed) for index in range(count)
        )

    def manual_seed(self, index: int, seed: int) -> None:
        self.all[index].manual_seed(int(seed))

    def manual_seed_all(self, seed: int) -> None:
        for generator in self.all:
            generator.manual_seed(int(seed))

    def seed(self, index: int) -> None:
        self.all[index].seed()

    def seed_all(self) -> None:
        seed = self.all[0].seed()
        for generator in self.all[1:]:
            generator.manual_seed(seed)

    def get_state(self, index: int) -> torch.Tensor:
        return self.all[index].get_state()

    def set_state(self, index: int, state: torch.Tensor) -> None:
        self.all[index].set_state(state.clone())

    def get_state_all(self) -> list[torch.Tensor]:
        return [generator.get_state() for generator in self.all]

    def set_state_all(self, states: Iterable[torch.Tensor]) -> None:
        for generator, state in zip(self.all, states, strict=False):
            generator.set_state(state.clone())


#: The active simulation's generators (set while it is active, by `_simulate_patches`).
active: Generators | None = None


def draw(
    generator: torch.Generator,
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> Any:
    """Run the random op `func` drawing from `generator` instead of the CPU's default one.

    A call that names its own `generator=` keeps it, if it is a generator of the same device
    type: CUDA refuses a CPU generator for a cuda op, and so does the simulation.
    """
    given = kwargs.get("generator")
    if given is not None:
        wanted = getattr(generator, "device", None)
        found = getattr(given, "device", None)
        if (
            isinstance(wanted, torch.device)
            and isinstance(found, torch.device)
            and found.type != wanted.type
        ):
            raise RuntimeError(
                f"Expected a '{wanted.type}' device type for generator but found "
                f"'{found.type}'. (devicekit: {getattr(func, '__name__', func)} runs on "
                f"simulated {wanted}; make the generator with "
                f"torch.Generator(device={str(wanted)!r}).)"
            )
        return func(*args, **kwargs)
    default = torch.default_generator
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        return func(*args, **kwargs)
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)


def refuse_on_cpu(
    func: Callable[..., Any],
    generator: object,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    resolve: Callable[[object], torch.device | None],
) -> None:
    """Raise as CUDA does when a simulated device's `generator` is given to an op that runs
    on the CPU (`torch.randn(3, generator=torch.Generator(device="cuda"))`).

    The op runs on a simulated device when its `device=` names one or, without `device=`,
    when a tensor argument is on one or, without tensor arguments, the default device is one.
    `resolve` maps a device spec to its simulated device, or `None`.
    """
    if not isinstance(generator, _SimulatedGenerator):
        return
    spec = kwargs.get("device")
    if spec is None:
        from devicekit._simulate_mode import _operands, _simulated, _torch_default_device

        operands = _operands(args, kwargs)
        if any(_simulated(tensor) is not None for _, tensor in operands):
            return
        spec = None if operands else _torch_default_device()
    if isinstance(spec, torch.Tensor) or resolve(spec) is not None:
        return
    found = generator.device
    raise RuntimeError(
        f"Expected a 'cpu' device type for generator but found '{found.type}'. (devicekit: "
        f"{getattr(func, '__name__', func)} runs on the CPU here, and the generator belongs "
        f"to simulated {found}; give the op device={str(found)!r} or a tensor on {found}, "
        "or make the generator with torch.Generator().)"
    )


def seeded(func: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """`func`, drawing from `device`'s generator when it is a random op (the mode calls this
    for each op on a simulated device)."""
    if getattr(func, "__name__", "") not in RANDOM_OPS:
        return func
    generator = generator_for(device)
    if generator is None:
        return func
    return lambda *args, **kwargs: draw(generator, func, args, kwargs)


class _GeneratorType(type(_REAL_GENERATOR)):  # type: ignore[misc]
    """`isinstance(g, torch.Generator)` stays true for every generator while patched."""

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, _REAL_GENERATOR)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, _REAL_GENERATOR)


class _SimulatedGenerator(_REAL_GENERATOR):
    """A generator of a simulated device: a CPU generator that reports the simulated device."""

    _devicekit_device: torch.device

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._devicekit_device

    def __repr__(self) -> str:
        return f"<torch._C.Generator object (devicekit: {self._devicekit_device})>"


def _simulated_generator(device: torch.device, seed: int | None = None) -> torch.Generator:
    generator: _SimulatedGenerator = _REAL_GENERATOR.__new__(_SimulatedGenerator, "cpu")  # type: ignore[call-arg]
    generator._devicekit_device = device
    if seed is not None:
        generator.manual_seed(seed)
    return generator


def generator_class(resolve: Callable[[object], torch.device | None]) -> type:
    """The class to put in place of `torch.Generator`: a simulated device's generator for
    `torch.Generator(device="cuda:1")`, a real one for any other device.

    `resolve` maps a device spec to its simulated device, or `None`.
    """

    def __new__(cls: type, device: object = "cpu") -> torch.Generator:
        simulated = resolve(device)
        if simulated is None:
            return _REAL_GENERATOR(device)  # type: ignore[arg-type]
        return _simulated_generator(simulated)

    return _GeneratorType(
        "Generator", (_REAL_GENERATOR,), {"__new__": __new__, "__module__": "torch"}
    )
