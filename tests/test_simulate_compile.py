"""`torch.compile` under a simulation: compiled code gives the CPU results on simulated devices."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import devicekit
from devicekit import CrossDeviceError

CUDA1 = torch.device("cuda", 1)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (dynamo's caches are process-wide)."""
    yield
    torch._dynamo.reset()


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    out.sum().backward()
    grad = next(model.parameters()).grad
    assert grad is not None
    return out.detach().cpu(), grad.cpu()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_trains_on_a_simulated_device_with_the_cpu_results(backend: str) -> None:
    x = torch.randn(5, 4)
    expected = run(torch.compile(small_model(), backend=backend), x)
    torch._dynamo.reset()
    with devicekit.simulated_devices("cuda", 2):
        model = small_model().to("cuda:1")
        compiled = torch.compile(model, backend=backend)
        out = compiled(x.to("cuda:1"))
        assert out.device == CUDA1
        out.sum().backward()
        grad = next(model.parameters()).grad
        assert grad is not None
        assert grad.device == CUDA1
        assert torch.equal(out.detach().cpu(), expected[0])
        assert torch.equal(grad.cpu(), expected[1])


def test_compiled_functions_decorators_and_module_compile() -> None:
    with devicekit.simulated_devices("cuda", 2):

        @torch.compile(backend="eager")
        def scaled(a: torch.Tensor) -> torch.Tensor:
            return torch.sin(a) * 2 + 1

        x = torch.randn(6, device="cuda:1")
        assert scaled.__name__ == "scaled"
        result = scaled(x)
        assert result.device == CUDA1
        assert torch.equal(result.cpu(), torch.sin(x.cpu()) * 2 + 1)
        model = small_model().cuda()
        model.compile(backend="eager")
        out = model(torch.randn(3, 4, device="cuda"))
        assert out.device == torch.device("cuda", 0)


def test_a_cross_device_bug_inside_a_compiled_forward_names_the_op() -> None:
    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)
            self.register_buffer("shift", torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.add(self.linear(x), self.shift)

    with devicekit.simulated_devices("cuda", 2):
        model = Shifted().to("cuda:1")
        model.shift = model.shift.to("cuda:0")  # the bug: one buffer left behind
        compiled = torch.compile(model, backend="aot_eager")
        with pytest.raises(CrossDeviceError, match="cuda:1 and cuda:0") as caught:
            compiled(torch.randn(3, 4, device="cuda:1"))
    assert "add" in caught.value.op
    assert "Expected all tensors to be on the same device" in str(caught.value)


def test_code_naming_a_simulated_device_inside_the_compiled_region_runs_eagerly() -> None:
    with devicekit.simulated_devices("cuda", 1):
        compiled = torch.compile(lambda a: a + torch.ones(3, device="cuda"), backend="eager")
        x = torch.zeros(3, device="cuda")
        for _ in range(2):  # the first call falls back, the second goes straight to eager
            result = compiled(x)
            assert result.device == torch.device("cuda", 0)
            assert result.cpu().tolist() == [1.0, 1.0, 1.0]


def test_under_cuda_autocast_a_compiled_model_computes_in_the_low_precision() -> None:
    with devicekit.simulated_devices("cuda", 1):
        compiled = torch.compile(small_model().cuda(), backend="aot_eager")
        x = torch.randn(3, 4, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert compiled(x).dtype == torch.bfloat16
        assert compiled(x).dtype == torch.float32


def test_a_model_compiled_before_the_simulation_runs_inside_it() -> None:
    model = small_model()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 4)
    expected = model(x)
    with devicekit.simulated_devices("cuda", 1):
        model.cuda()
        out = compiled(x.cuda())
        assert out.device == torch.device("cuda", 0)
        assert torch.equal(out.detach().cpu(), expected.detach())
    # code dynamo compiled for the simulation is not reused outside it (see the docs)
    torch._dynamo.reset()
    model.cpu()
    assert torch.equal(compiled(x), expected)


def test_after_the_simulation_torch_compile_is_torchs_own() -> None:
    original = torch.compile
    with devicekit.simulated_devices("cuda", 1):
        assert torch.compile is not original
    assert torch.compile is original


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiles_for_the_cpu_and_gives_its_results() -> None:
    """One tiny model through inductor's C++ backend (tens of seconds on two cores)."""
    x = torch.randn(5, 4)
    expected = run(torch.compile(small_model()), x)
    torch._dynamo.reset()
    with devicekit.simulated_devices("cuda", 1):
        model = small_model().cuda()
        out, grad = run(torch.compile(model), x.cuda())
        assert next(model.parameters()).device == torch.device("cuda", 0)
    assert torch.equal(out, expected[0])
    assert torch.equal(grad, expected[1])


def test_an_autocast_region_inside_compiled_code_gets_cudas_dtypes() -> None:
    """Compiled for the CPU, an autocast("cuda") region inside the compiled code would compute
    in float32: code that enters autocast itself runs eagerly under the simulation instead."""

    def scores(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.float16):
            product = a @ b
            return product, product.softmax(-1)

    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(AutocastLinear())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    with devicekit.simulated_devices("cuda", 2):
        a = torch.ones(2, 2, device="cuda:1")
        product, probabilities = torch.compile(scores, backend="eager")(a, a)
        assert (product.dtype, probabilities.dtype) == (torch.float16, torch.float32)
        assert product.device == CUDA1
        model = torch.compile(Half().to("cuda:1"), backend="aot_eager")
        assert model(a).dtype == torch.bfloat16  # a submodule's forward enters autocast
        plain = torch.compile(small_model().to("cuda:1"), backend="eager")
        assert plain(torch.ones(1, 4, device="cuda:1")).dtype == torch.float32


class AutocastLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.linear(x)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_code_compiled_in_a_simulation_runs_again_after_it(backend: str) -> None:
    """What dynamo compiled inside asked the simulated accelerator for its stream: the
    simulation resets dynamo's caches when it ends, so no `torch._dynamo.reset()` is needed."""

    def double(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2

    model = small_model()
    with devicekit.simulated_devices("cuda", 2):
        function = torch.compile(double, backend=backend)
        assert function(torch.ones(3, device="cuda:1")).device == CUDA1
        module = torch.compile(model.to("cuda:0"), backend=backend)
        module(torch.ones(1, 4, device="cuda:0")).sum().backward()
    model.cpu()
    assert torch.equal(function(torch.zeros(3)), torch.zeros(3))
    assert module(torch.ones(1, 4)).device.type == "cpu"
