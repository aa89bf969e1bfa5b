"""`torch.autocast("cuda")` on simulated devices: CUDA's policy, op by op, computed on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import devicekit
from devicekit import _simulate_autocast
from devicekit._simulate_autocast import BANNED, FP32, FP32_UNLESS_DTYPE, LOWER, POLICY, PROMOTE

LOW_DTYPES = [torch.float16, torch.bfloat16]

Case = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# (op name in POLICY, call on a (4, 4) `a`, `b` and a (1, 2, 4, 4) image `img`), all float32.
CASES: list[tuple[str, Case]] = [
    ("mm", lambda a, b, img: torch.mm(a, b)),
    ("matmul", lambda a, b, img: torch.matmul(a, b)),
    ("__matmul__", lambda a, b, img: a @ b),
    ("linear", lambda a, b, img: F.linear(a, b)),
    ("conv2d", lambda a, b, img: F.conv2d(img, img[:, :, :3, :3].expand(3, 2, 3, 3))),
    ("conv_transpose2d", lambda a, b, img: F.conv_transpose2d(img, img[0, :, None, :3, :3])),
    ("bmm", lambda a, b, img: torch.bmm(a[None], b[None])),
    ("addmm", lambda a, b, img: torch.addmm(a, a, b)),
    ("baddbmm", lambda a, b, img: torch.baddbmm(a[None], a[None], b[None])),
    ("mv", lambda a, b, img: torch.mv(a, b[0])),
    ("addmv", lambda a, b, img: torch.addmv(a[0], a, b[0])),
    ("addr", lambda a, b, img: torch.addr(a, a[0], b[0])),
    ("einsum", lambda a, b, img: torch.einsum("ij,jk->ik", a, b)),
    ("linalg_multi_dot", lambda a, b, img: torch.linalg.multi_dot([a, b, a])),
    (
        "scaled_dot_product_attention",
        lambda a, b, img: F.scaled_dot_product_attention(a[None], b[None], a[None]),
    ),
    ("lstm_cell", lambda a, b, img: torch.lstm_cell(a, (a, a), b.repeat(4, 1), b.repeat(4, 1))[0]),
    ("prelu", lambda a, b, img: F.prelu(a, b[0, :1])),
    ("softmax", lambda a, b, img: F.softmax(a @ b, dim=-1)),
    ("log_softmax", lambda a, b, img: torch.log_softmax(a @ b, dim=-1)),
    ("sum", lambda a, b, img: (a @ b).sum()),
    ("cumsum", lambda a, b, img: (a @ b).cumsum(0)),
    ("prod", lambda a, b, img: (a @ b).prod()),
    ("linalg_vector_norm", lambda a, b, img: torch.linalg.vector_norm(a @ b)),
    ("norm", lambda a, b, img: (a @ b).norm()),
    ("exp", lambda a, b, img: torch.exp(a @ b)),
    ("log", lambda a, b, img: (a @ b).abs().log()),
    ("pow", lambda a, b, img: (a @ b) ** 2),
    ("__rpow__", lambda a, b, img: 2 ** (a @ b)),
    ("rsqrt", lambda a, b, img: (a @ b).abs().rsqrt()),
    ("layer_norm", lambda a, b, img: F.layer_norm(a @ b, (4,))),
    ("group_norm", lambda a, b, img: F.group_norm(img @ img, 2)),
    ("rms_norm", lambda a, b, img: F.rms_norm(a @ b, (4,))),
    ("cross_entropy", lambda a, b, img: F.cross_entropy(a @ b, torch.arange(4, device=a.device))),
    ("nll_loss", lambda a, b, img: F.nll_loss(a @ b, torch.arange(4, device=a.device))),
    ("mse_loss", lambda a, b, img: F.mse_loss(a @ b, a @ b)),
    ("l1_loss", lambda a, b, img: F.l1_loss(a @ b, a)),
    (
        "binary_cross_entropy_with_logits",
        lambda a, b, img: F.binary_cross_entropy_with_logits(a @ b, a.sigmoid()),
    ),
    ("cdist", lambda a, b, img: torch.cdist(a @ b, a @ b)),
    ("logsumexp", lambda a, b, img: torch.logsumexp(a @ b, dim=0)),
    ("cosine_similarity", lambda a, b, img: F.cosine_similarity(a @ b, a)),
    ("interpolate", lambda a, b, img: F.interpolate(img @ img, scale_factor=2.0)),
    ("addcmul", lambda a, b, img: torch.addcmul(a, a @ b, a @ b)),
    ("addcmul (all low)", lambda a, b, img: torch.addcmul(a @ b, a @ b, a @ b)),
    ("atan2", lambda a, b, img: torch.atan2(a @ b, a)),
    ("dot", lambda a, b, img: torch.dot((a @ b)[0], a[0])),
    ("scatter_add", lambda a, b, img: torch.scatter_add(a @ b, 0, torch.zeros_like(a).long(), a)),
    ("relu", lambda a, b, img: F.relu(a @ b)),
    ("add", lambda a, b, img: (a @ b) + a),
    ("mean", lambda a, b, img: (a @ b).mean()),
]


def expected_dtype(name: str, low: torch.dtype, inputs: list[torch.dtype]) -> torch.dtype:
    """What CUDA autocast gives: from the policy and the floating dtypes the op received."""
    policy = POLICY.get(name.split()[0], "interpolate" if name == "interpolate" else None)
    if policy == LOWER:
        return low
    if policy in (FP32, FP32_UNLESS_DTYPE, "interpolate"):
        return torch.float32
    if policy == PROMOTE:
        return torch.float32 if torch.float32 in inputs else low
    if policy == BANNED:
        raise AssertionError(name)
    result = inputs[0]  # not autocast: ordinary type promotion
    for dtype in inputs[1:]:
        result = torch.promote_types(result, dtype)
    return result


@pytest.mark.parametrize("low", LOW_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("name", "case"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
)
def test_each_op_gets_cudas_output_dtype(name: str, case: Case, low: torch.dtype) -> None:
    torch.manual_seed(0)
    a, b, img = torch.randn(4, 4), torch.randn(4, 4), torch.randn(1, 2, 4, 4)
    with devicekit.simulated_devices("cuda", 1):
        args = [t.to("cuda") for t in (a, b, img)]
        with torch.autocast("cuda", dtype=low):
            result = case(*args)
        assert result.device == torch.device("cuda", 0)
    # what reached the op: `a @ b` is in the low precision, `a` itself float32
    inputs = _operand_dtypes(name, low)
    assert result.dtype == expected_dtype(name, low, inputs), name


def _operand_dtypes(name: str, low: torch.dtype) -> list[torch.dtype]:
    """The floating dtypes each case hands its op (see CASES: `a @ b` is low, `a` float32)."""
    mixed = {"add", "addcmul", "atan2", "dot", "scatter_add", "l1_loss", "cosine_similarity"}
    return [low, torch.float32] if name in mixed else [low]


def test_table_covers_every_op_torch_registers_for_autocast_cuda() -> None:
    """Every op with an `AutocastCUDA` kernel in this torch build has a policy in the table."""
    registered = {
        op.removeprefix("aten::").split(".")[0]
        for op in torch._C._dispatch_get_all_op_names()
        if op.startswith("aten::")
        and torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA")
    }
    assert registered, "this torch build registers no AutocastCUDA kernels"
    assert registered - POLICY.keys() == set()


@pytest.mark.parametrize("low", LOW_DTYPES, ids=str)
def test_values_are_the_cpu_computing_in_the_low_precision(low: torch.dtype) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    expected_mm = a.to(low) @ b.to(low)
    expected_softmax = torch.softmax(expected_mm.float(), dim=-1)
    with devicekit.simulated_devices("cuda", 1):
        x, y = a.cuda(), b.cuda()
        with torch.autocast("cuda", dtype=low):
            mm = x @ y
            soft = torch.softmax(mm, dim=-1)
        assert torch.equal(mm.cpu(), expected_mm)
        assert torch.equal(soft.cpu(), expected_softmax)


def test_casts_are_differentiable_and_grads_stay_float32() -> None:
    torch.manual_seed(0)
    with devicekit.simulated_devices("cuda", 1):
        model = torch.nn.Linear(4, 3).cuda()
        x = torch.randn(5, 4, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
            loss = F.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1], device="cuda"))
        assert (out.dtype, loss.dtype) == (torch.float16, torch.float32)
        loss.backward()
        assert model.weight.grad is not None
        assert model.weight.grad.dtype == torch.float32
        assert model.weight.grad.device == torch.device("cuda", 0)


def test_real_cpu_tensors_and_float64_are_never_cast() -> None:
    """CUDA autocast casts CUDA tensors only, and never float64."""
    a = torch.randn(3, 3)
    with devicekit.simulated_devices("cuda", 1):
        d = torch.randn(3, 3, dtype=torch.float64, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            assert (a @ a).dtype == torch.float32
            assert (d @ d).dtype == torch.float64
            assert torch.softmax(d, 0).dtype == torch.float64


def test_an_explicit_dtype_wins_over_float32() -> None:
    with devicekit.simulated_devices("cuda", 1):
        x = torch.randn(3, 3, device="cuda", dtype=torch.float16)
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch.softmax(x, 0, dtype=torch.float16).dtype == torch.float16
            assert x.sum(dtype=torch.float16).dtype == torch.float16
            assert torch.softmax(x, 0).dtype == torch.float32


def test_disabled_autocast_and_in_place_ops_cast_nothing() -> None:
    with devicekit.simulated_devices("cuda", 1):
        x = torch.randn(3, 3, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            with torch.autocast("cuda", enabled=False):
                assert (x @ x).dtype == torch.float32
            h = (x @ x).exp_()
            assert h.dtype == torch.float16
        assert (x @ x).dtype == torch.float32


def test_binary_cross_entropy_is_refused_as_on_cuda() -> None:
    with devicekit.simulated_devices("cuda", 1):
        p = torch.rand(4, device="cuda")
        with (
            torch.autocast("cuda", dtype=torch.float16),
            pytest.raises(RuntimeError, match="unsafe to autocast") as caught,
        ):
            F.binary_cross_entropy(p, p)
    assert "binary_cross_entropy_with_logits" in str(caught.value)
    assert POLICY["binary_cross_entropy"] == BANNED


def test_grad_scaler_steps_a_float16_model() -> None:
    torch.manual_seed(0)
    with devicekit.simulated_devices("cuda", 1):
        model = torch.nn.Linear(4, 1).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
        before = model.weight.detach().clone()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(8, 4, device="cuda")).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        assert scaler.get_scale() == 1024.0  # no inf met: the step was taken
        assert not torch.equal(model.weight.detach(), before)
        assert model.weight.device == torch.device("cuda", 0)


def test_outside_a_simulation_autocast_cuda_changes_nothing_on_the_cpu() -> None:
    a = torch.randn(3, 3)
    with pytest.warns(UserWarning, match="CUDA"), torch.autocast("cuda", dtype=torch.float16):
        assert (a @ a).dtype == torch.float32
    assert _simulate_autocast.active(torch.device("cpu")) is False


FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
UNARY = [
    ("exp", torch.exp, FP32),
    ("softmax", lambda t: torch.softmax(t, -1), FP32_UNLESS_DTYPE),
    ("sum", torch.sum, FP32_UNLESS_DTYPE),
    ("matmul", lambda t: t @ t, LOWER),
    ("relu", torch.relu, None),
]


@given(
    op=st.sampled_from(UNARY),
    dtype=st.sampled_from(FLOATS),
    low=st.sampled_from(LOW_DTYPES),
    simulated=st.booleans(),
)
def test_only_simulated_non_float64_operands_are_cast(
    op: tuple[str, Callable[[torch.Tensor], torch.Tensor], str | None],
    dtype: torch.dtype,
    low: torch.dtype,
    simulated: bool,
) -> None:
    """Invariant: a float64 or real CPU operand keeps its dtype; any other gets the policy's."""
    name, call, policy = op
    assert POLICY.get(name) == policy
    with devicekit.simulated_devices("cuda", 1):
        x = torch.rand(3, 3, dtype=dtype, device="cuda" if simulated else "cpu")
        with torch.autocast("cuda", dtype=low):
            result = call(x)
    if not simulated or dtype == torch.float64 or policy is None:
        assert result.dtype == dtype
    elif policy == LOWER:
        assert result.dtype == low
    else:
        assert result.dtype == torch.float32


def test_python_composites_apply_the_policy_to_each_op_inside() -> None:
    """As on CUDA, where composites decompose below autocast: the ops inside get their policy."""
    torch.manual_seed(0)
    with devicekit.simulated_devices("cuda", 1):
        x = torch.randn(2, 5, 8, device="cuda")
        attention = nn.MultiheadAttention(8, 2, batch_first=True).cuda()
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            out, weights = attention(x, x, x)
            normalized = F.normalize(x @ x.transpose(1, 2), dim=-1)
            encoded = layer(x)
        # projections (linear, bmm) low; softmax, norm and layer_norm float32, as CUDA gives
        assert (out.dtype, weights.dtype) == (torch.float16, torch.float32)
        assert normalized.dtype == torch.float32
        assert (encoded.dtype, encoded.device) == (torch.float32, torch.device("cuda", 0))
        out.float().sum().backward()
        grad = attention.in_proj_weight.grad
        assert grad is not None
        assert (grad.dtype, grad.device) == (torch.float32, torch.device("cuda", 0))


def test_random_ops_draw_the_same_under_autocast() -> None:
    """Autocast changes dtypes only: dropout draws from the device's generator either way."""
    with devicekit.simulated_devices("cuda", 1):
        x = torch.ones(4, 8, device="cuda")
        layer = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).cuda()
        draws = []
        for enabled in (False, True):
            torch.cuda.manual_seed(0)
            with torch.autocast("cuda", dtype=torch.float16, enabled=enabled):
                masks = (F.dropout(x, 0.5) == 0, layer(x[None], x[None], x[None])[1] == 0)
            draws.append([mask.cpu() for mask in masks])
        assert torch.equal(draws[0][0], draws[1][0])
        assert torch.equal(draws[0][1], draws[1][1])
