"""Compact descriptions for messages: tensors, torch ops, their arguments and the user's line.

These run only when devicekit reports a problem, never on a fast path, and each answer about an op
is cached, so describing the same op twice costs a dictionary lookup.
"""

from __future__ import annotations

import inspect
import linecache
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

__all__ = [
    "CallSite",
    "call_site",
    "called_at",
    "describe_tensor",
    "is_internal",
    "labelled_tensors",
    "op_name",
    "op_name_at",
    "torch_sentence",
    "user_call_site",
    "user_frame",
]

_DTYPES = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.complex64: "c64",
    torch.complex128: "c128",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "bool",
}


def describe_tensor(tensor: torch.Tensor, device: torch.device | None = None) -> str:
    """The compact form of a tensor: dtype, shape and device, as in `f32[32,64] @ cuda:0`.

    `device` overrides `tensor.device` (a simulated tensor's device, say).

    Example:
        >>> import torch
        >>> describe_tensor(torch.zeros(2, 3, dtype=torch.int64, device="meta"))
        'i64[2,3] @ meta'
    """
    dtype = _DTYPES.get(tensor.dtype) or str(tensor.dtype).removeprefix("torch.")
    try:
        shape = ",".join(str(size) for size in tensor.shape)
    except Exception:  # a nested tensor of the strided layout has no one shape
        shape = f"nested, {_components(tensor)}"
    return f"{dtype}[{shape}] @ {tensor.device if device is None else device}"


def torch_sentence(devices: Sequence[torch.device]) -> str:
    """torch's own sentence for operands on different devices, which programs and test suites
    match (`"Expected all tensors to be on the same device"`): devicekit's messages about
    mixed devices start with it and add their detail after it.

    Example:
        >>> torch_sentence([torch.device("cuda", 0), torch.device("cpu")])
        'Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!'
    """  # noqa: E501
    found = " and ".join(str(device) for device in devices[:2])
    return (
        f"Expected all tensors to be on the same device, but found at least two devices, {found}!"
    )


def _components(tensor: torch.Tensor) -> str:
    try:
        return f"{tensor.size(0)} tensors"
    except Exception:
        return "? tensors"


# Where users reach torch's functions, most specific first: `torch.nn.functional.conv2d` is the
# same object as `torch.conv2d`, and users of `nn.functional` write the former.
_NAMESPACES: tuple[tuple[str, object], ...] = (
    ("torch.nn.functional", torch.nn.functional),
    ("torch", torch),
    ("torch.linalg", torch.linalg),
    ("torch.special", torch.special),
    ("torch.fft", torch.fft),
)
_names: dict[object, str] = {}


def op_name(func: Callable[..., Any]) -> str:
    """The name of a torch op as users write it: `torch.add`, `Tensor.__matmul__`.

    Example:
        >>> import torch
        >>> op_name(torch.nn.functional.linear), op_name(torch.Tensor.__matmul__)
        ('torch.nn.functional.linear', 'Tensor.__matmul__')
    """
    name = _names.get(func)
    if name is None:
        name = _names[func] = _find_name(func)
    return name


# Operators reach torch function modes as the method they run: `a @ b` as `Tensor.matmul`.
_OPERATORS = {
    "add": ("__add__", "+"),
    "sub": ("__sub__", "-"),
    "mul": ("__mul__", "*"),
    "div": ("__truediv__", "/"),
    "floor_divide": ("__floordiv__", "//"),
    "remainder": ("__mod__", "%"),
    "pow": ("__pow__", "**"),
    "matmul": ("__matmul__", "@"),
    "bitwise_and": ("__and__", "&"),
    "bitwise_or": ("__or__", "|"),
    "bitwise_xor": ("__xor__", "^"),
    "lt": ("__lt__", "<"),
    "le": ("__le__", "<="),
    "gt": ("__gt__", ">"),
    "ge": ("__ge__", ">="),
    "ne": ("__ne__", "!="),
    "add_": ("__iadd__", "+="),
    "sub_": ("__isub__", "-="),
    "mul_": ("__imul__", "*="),
    "div_": ("__itruediv__", "/="),
}


def op_name_at(func: Callable[..., Any], line: str) -> str:
    """The op's name as written on `line`: `Tensor.__matmul__` for `a @ b`, else `op_name`.

    Example:
        >>> import torch
        >>> op_name_at(torch.Tensor.matmul, "y = x @ w")
        'Tensor.__matmul__'
        >>> op_name_at(torch.Tensor.matmul, "y = x.matmul(w)")
        'Tensor.matmul'
    """
    name = op_name(func)
    method = name.removeprefix("Tensor.")
    operator = _OPERATORS.get(method)
    if operator is not None and name != method:
        dunder, symbol = operator
        if f".{method}(" not in line and symbol in line:
            return f"Tensor.{dunder}"
    return name


def _find_name(func: Callable[..., Any]) -> str:
    short = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__self__", None)
    if type(owner) is type(torch.Tensor.grad):  # a property accessor: `Tensor.grad.__set__`
        return f"Tensor.{getattr(owner, '__name__', '?')}.{short}"
    if getattr(torch.Tensor, short, None) is func:
        return f"Tensor.{short}"
    for prefix, namespace in _NAMESPACES:
        if getattr(namespace, short, None) is func:
            return f"{prefix}.{short}"
    module = getattr(func, "__module__", None)
    return f"{module}.{short}" if module else short


def _is_method(func: Callable[..., Any]) -> bool:
    return op_name(func).startswith("Tensor.")


_positional_names: dict[object, tuple[str, ...] | None] = {}


def _schema_names(func: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, ...] | None:
    """Positional parameter names from the ATen schema that fits `args`, for builtin ops."""
    name = getattr(func, "__name__", "")
    if name.startswith("__r") and name.endswith("__"):  # `2 @ t` runs `t.__rmatmul__(2)`
        return None
    aten = name.strip("_")
    try:
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{aten}")
    except RuntimeError:
        return None
    for schema in schemas:
        params = [arg for arg in schema.arguments if not arg.kwarg_only]
        if len(params) < len(args):
            continue
        if all(_fits(value, str(param.type)) for value, param in zip(args, params, strict=False)):
            names = tuple(param.name for param in params)
            if not _is_method(func) and names and names[0] == "self":
                names = ("input", *names[1:])  # the Python binding renames `self`
            return names
    return None


def _fits(value: object, schema_type: str) -> bool:
    if isinstance(value, torch.Tensor):
        return schema_type.startswith(("Tensor", "Optional[Tensor]"))
    if isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return "List[Tensor]" in schema_type or "List[Optional[Tensor]]" in schema_type
    return not schema_type.startswith("Tensor")


def _signature_names(func: Callable[..., Any]) -> tuple[str, ...] | None:
    """Positional parameter names of a Python function; `None` where there is no signature.

    A `*args` parameter ends the tuple as `"*args"`.
    """
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    names: list[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
        elif param.kind is param.VAR_POSITIONAL:
            names.append(f"*{param.name}")
    return tuple(names)


def _names_for(func: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, ...] | None:
    key = (func, len(args))
    if key in _positional_names:
        return _positional_names[key]
    names = _signature_names(func)
    if names is None:
        names = _schema_names(func, args)
    _positional_names[key] = names
    return names


def labelled_tensors(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor argument of an op call with its label: `input`, `tensors[1]`, `argument 2`.

    Tensors nested one level in a list or tuple (`torch.cat([a, b])`) get an index suffix.

    Example:
        >>> import torch
        >>> t = torch.ones(2)
        >>> [label for label, _ in labelled_tensors(torch.cat, ([t, t],), {"out": t})]
        ['tensors[0]', 'tensors[1]', 'out']
    """
    names = _names_for(func, args) or ()
    varargs = names[-1][1:] if names and names[-1].startswith("*") else None
    named = len(names) - (varargs is not None)
    for position, value in enumerate(args):
        if position < named:
            label = names[position]
        elif varargs is not None:
            label = f"{varargs}[{position - named}]"
        else:
            label = f"argument {position}"
        yield from _labelled(label, value)
    for key, value in kwargs.items():
        yield from _labelled(key, value)


def _labelled(label: str, value: object) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield label, value
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                yield f"{label}[{index}]", item


@dataclass(frozen=True)
class CallSite:
    """Where the user's code called into torch: the first frame outside torch and devicekit."""

    filename: str
    lineno: int
    line: str

    def __str__(self) -> str:
        where = f"{self.filename}:{self.lineno}"
        return f"{where}: {self.line}" if self.line else where


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_DEVICEKIT_DIR = os.path.dirname(__file__) + os.sep


_INTERNAL = (_TORCH_DIR, _DEVICEKIT_DIR)
#: The name of functions devicekit compiles "at" a user's line, so that torch's warnings name
#: it (`_simulate_async.RacingMode`): devicekit's frames, whatever file they name.
PASS_THROUGH = "__devicekit_pass_through__"


def is_internal(filename: str) -> bool:
    """Whether `filename` is torch's or devicekit's own code, not the user's."""
    return filename.startswith(_INTERNAL)


def user_frame(depth: int = 1) -> FrameType | None:
    """The innermost frame of the current stack outside torch and devicekit, `depth` frames up
    from the caller's; `None` if there is none. Reads no source: cheap enough for every
    factory call while provenance is recorded.

    Example:
        >>> frame = user_frame()
        >>> frame is not None and frame.f_lineno > 0
        True
    """
    frame: FrameType | None = sys._getframe(depth)
    internal = _INTERNAL
    while frame is not None and (
        frame.f_code.co_filename.startswith(internal) or frame.f_code.co_name == PASS_THROUGH
    ):
        frame = frame.f_back
    return frame


def call_site(filename: str, lineno: int) -> CallSite:
    """The `CallSite` of `filename:lineno`, with its source text."""
    return CallSite(filename, lineno, linecache.getline(filename, lineno).strip())


def called_at(site: CallSite | None) -> str:
    """The "called at ..." line of devicekit's messages about the op at `site`.

    Example:
        >>> called_at(None)
        'called at an unknown line'
    """
    return f"called at {site}" if site is not None else "called at an unknown line"


def user_call_site() -> CallSite | None:
    """The first frame of the current stack outside torch and devicekit, `None` if there is none.

    Example:
        >>> site = user_call_site()
        >>> site is not None and site.lineno > 0
        True
    """
    frame = user_frame(2)
    return None if frame is None else call_site(frame.f_code.co_filename, frame.f_lineno)
