"""CUDA's autocast policy for simulated devices: `torch.autocast("cuda", dtype=...)`.

Entering `torch.autocast("cuda")` switches on torch's `AutocastCUDA` dispatch key, which only
CUDA tensors reach; simulated tensors are CPU tensors, so nothing would be cast (float16
silently computing in float32). CPU autocast is no substitute: its op lists disagree with CUDA's
(`softmax`, `layer_norm`, `exp`, `sum` ... stay in the low precision there, `mv` and
`lstm_cell` stay float32) and it would cast real CPU tensors, which CUDA autocast never does.

So the simulation applies CUDA's policy itself, in its function mode, above autograd (the casts
are recorded and differentiable, as CUDA's are): `POLICY` names each op's cast policy, as
registered for the `AutocastCUDA` key in torch's `aten/src/ATen/autocast_mode.cpp` (and
`cudnn/AutocastRNN.cpp` for the fused RNNs), keyed by the name the op has in Python. Only
floating tensors on a simulated device are cast, float64 never, as CUDA does.

Composites decompose below autocast on CUDA, so the ops inside them get their own policy. The
Python composites of `torch.nn.functional` and `torch.functional` that are not in the table
(`F.multi_head_attention_forward`, `F.normalize`) therefore run with the mode on. Known limit:
where torch decomposes a composite below Python (`_VF.lstm`, `F.cross_entropy`), the mode sees
only the outer call; the table gives those names the dtype their CUDA result has.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import torch

from devicekit import _simulate_mode, _simulate_rng

__all__ = ["BANNED", "FP32", "FP32_UNLESS_DTYPE", "LOWER", "POLICY", "PROMOTE", "active", "wrap"]

#: Cast floating operands to the autocast dtype (`lower_precision_fp`).
LOWER = "lower_precision_fp"
#: Cast floating operands to float32 (`fp32`).
FP32 = "fp32"
#: Run in float32 unless the call names a `dtype` (`fp32_set_opt_dtype`, `fp32_append_dtype`).
FP32_UNLESS_DTYPE = "fp32_set_opt_dtype"
#: Cast floating operands to the widest floating type among them (`promote`).
PROMOTE = "promote"
#: Refused under autocast (`binary_cross_entropy`).
BANNED = "banned"

_LOWER_OPS = (
    # convolutions
    "_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d "
    "conv_transpose3d convolution cudnn_convolution cudnn_convolution_transpose prelu "
    # matrix products
    "addmm addmv addr matmul __matmul__ __rmatmul__ einsum mm mv linalg_vecdot vecdot linear "
    "addbmm baddbmm bmm chain_matmul linalg_multi_dot multi_dot "
    # recurrent cells, and the fused RNNs (cudnn's AutocastRNN casts their weights and input)
    "_thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell "
    "lstm gru rnn_tanh rnn_relu "
    # attention
    "_scaled_dot_product_flash_attention scaled_dot_product_attention"
)
_FP32_OPS = (
    # pointwise
    "acos arccos asin arcsin cosh erfinv special_erfinv exp expm1 special_expm1 log log10 log2 "
    "log1p reciprocal rsqrt sinh tan pow __rpow__ softplus "
    # norms
    "layer_norm native_layer_norm group_norm rms_norm frobenius_norm nuclear_norm "
    "cosine_similarity dist pdist cdist renorm logsumexp "
    # losses (cross_entropy is log_softmax and nll_loss, both float32 on CUDA)
    "poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div "
    "l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss "
    "soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits "
    "cross_entropy "
    # upsampling (F.interpolate: see _interpolate)
    "upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d "
    "upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d "
    "_upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa"
)
_FP32_UNLESS_DTYPE_OPS = (
    "prod softmax log_softmax _softmax _log_softmax cumprod cumsum linalg_vector_norm "
    "vector_norm linalg_matrix_norm matrix_norm sum norm"
)
_PROMOTE_OPS = (
    "addcdiv addcmul atan2 arctan2 bilinear cross dot vdot grid_sampler grid_sample index_put "
    "tensordot scatter_add"
)


def _table() -> dict[str, str]:
    table: dict[str, str] = {}
    for policy, names in (
        (LOWER, _LOWER_OPS),
        (FP32, _FP32_OPS),
        (FP32_UNLESS_DTYPE, _FP32_UNLESS_DTYPE_OPS),
        (PROMOTE, _PROMOTE_OPS),
        (BANNED, "binary_cross_entropy"),
    ):
        for name in names.split():
            table[name] = policy
    return table


#: Each op's CUDA autocast policy, by the name the function mode sees (`func.__name__`).
POLICY: dict[str, str] = _table()

# F.interpolate's modes that reach an upsample kernel (float32 on CUDA); "area" pools instead.
_UPSAMPLING = frozenset({"nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear"})

_BANNED_MESSAGE = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using "
    "torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast."
)


def active(device: torch.device) -> bool:
    """Whether CUDA autocast is on for an op whose operands are on simulated `device`."""
    return device.type == "cuda" and torch.is_autocast_enabled("cuda")


def policy_of(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """The CUDA autocast policy of a call of the op named `name`, or `None` (run as is)."""
    if name == "interpolate":
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        return FP32 if mode in _UPSAMPLING else None
    if name.endswith("_") and not name.endswith("__"):
        return None  # in-place ops are not autocast
    return POLICY.get(name)


def wrap(func: Callable[..., Any], name: str, device: torch.device) -> Callable[..., Any]:
    """`func` as CUDA autocast runs it on simulated `device`: operands cast by the op's policy.

    `func` itself when CUDA autocast is off (another device type's autocast may be on).
    """
    if not active(device):
        return func

    @functools.wraps(func)  # keeps the op's name, which later steps (random ops) look up
    def autocast(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return call(func, name, device, *args, **kwargs)

    return autocast


def call(
    func: Callable[..., Any], name: str, device: torch.device, /, *args: Any, **kwargs: Any
) -> Any:
    """Run `func(*args, **kwargs)` as CUDA autocast would: operands cast by the op's policy.

    Only floating tensors on a simulated device are cast (CUDA casts only CUDA tensors), and
    float64 ones never.
    """
    __tracebackhide__ = True
    policy = policy_of(name, args, kwargs)
    if policy is None:
        if _is_composite(func):
            return _call_composite(func, name, device, args, kwargs)
        return func(*args, **kwargs)
    if policy == BANNED:
        raise RuntimeError(_BANNED_MESSAGE)
    if policy == LOWER:
        target = torch.get_autocast_dtype("cuda")
    elif policy == FP32:
        target = torch.float32
    elif policy == FP32_UNLESS_DTYPE:
        first = next((value for value in args if isinstance(value, torch.Tensor)), None)
        names_dtype = kwargs.get("dtype") is not None or any(
            isinstance(value, torch.dtype) for value in args
        )
        if names_dtype or first is None or not _castable(first):
            return func(*args, **kwargs)
        target = torch.float32
    else:  # PROMOTE: float32 wins over the low precision; float64 is left out, as on CUDA
        target = torch.get_autocast_dtype("cuda")
        for _, value in _simulate_mode._operands(args, kwargs):
            if _castable(value):
                target = torch.promote_types(target, value.dtype)

    def cast(value: Any) -> Any:
        if _castable(value):
            return value if value.dtype is target else value.to(target)
        if isinstance(value, (list, tuple)) and any(_castable(item) for item in value):
            cast_items = [cast(item) for item in value]
            return cast_items if isinstance(value, list) else tuple(cast_items)
        return value

    return func(*[cast(value) for value in args], **{k: cast(v) for k, v in kwargs.items()})


_COMPOSITE_MODULES = frozenset({"torch.nn.functional", "torch.functional"})
_DISPATCH_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def _is_composite(func: object) -> TypeGuard[types.FunctionType]:
    """A Python function of `torch.nn.functional`/`torch.functional` that dispatches itself."""
    return (
        isinstance(func, types.FunctionType)
        and func.__module__ in _COMPOSITE_MODULES
        and any(name in func.__code__.co_names for name in _DISPATCH_CHECKS)
    )


def _call_composite(
    func: types.FunctionType,
    name: str,
    device: torch.device,
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> Any:
    """Run a Python composite with the simulation's mode on, so that each op inside it gets its
    own policy, as on CUDA, where composites decompose below autocast.

    Its own first dispatch check is answered "no" (it would hand the call straight back to the
    mode): a copy of the function runs with its own globals, in which that check is one-shot.
    """
    session = _simulate_mode._active
    mode = None if session is None else session.mode
    if mode is None:
        return func(*args, **kwargs)
    namespace = dict(func.__globals__)

    def once(check_name: str) -> Callable[..., bool]:
        def check(*values: Any) -> bool:
            namespace[check_name] = func.__globals__[check_name]  # later checks are torch's
            return False

        return check

    for check_name in _DISPATCH_CHECKS:
        if check_name in namespace:
            namespace[check_name] = once(check_name)
    body = types.FunctionType(
        func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
    )
    body.__kwdefaults__ = func.__kwdefaults__
    with mode:
        result = body(*args, **kwargs)
    if name in _simulate_rng.RANDOM_OPS:
        # The whole call drew from the device's generator (lent as torch's default one), and so
        # did each random op inside it, lending it again: hand its latest state back up.
        generator = _simulate_rng.generator_for(device)
        if generator is not None:
            torch.default_generator.set_state(generator.get_state())
    return result


def _castable(value: object) -> bool:
    """A floating, non-float64 tensor on a simulated device: what CUDA autocast casts."""
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype is not torch.float64
        and _simulate_mode._simulated(value) is not None
    )
