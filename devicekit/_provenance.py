"""Where the stray tensor of a cross-device error came from: the line that made it, who holds it.

Recording costs time only while a `device_guard` or a simulation is active, and only on tensor
factory calls (`torch.arange`, `torch.zeros`, `torch.tensor`, ...) and moves (`.to()`, `.cpu()`):
`record` keeps the user's file and line of the call, keyed by the tensor's identity in a table
whose entries go with their tensors, and the set of lines where factories ran. Every other op
costs nothing here. When library code (torch's, an installed package's, the stdlib's) called the
factory, the user's line that called into it is kept instead, with the library function it
called (`w = torch.load(buf)`): the one extra cost on the user's own factory calls is a test of
the calling frame's file name against a fixed tuple of prefixes.

The rest is worked out only when an error is reported (`explain`), from the live stack of the
failing call: the tensor's record (or its view base's); the module, optimizer or variable that
holds it, found by identity among the modules and optimizers the frames run (`self`) or name
(locals); for a variable, the line that assigned it; and for an intermediate result (`mask == 0`),
the names on the failing line it was computed from.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import linecache
import os
import re
import site
import sys
import sysconfig
import textwrap
import weakref
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any, Literal

import torch

from devicekit._describe import _DEVICEKIT_DIR, _INTERNAL, call_site, is_internal, op_name
from devicekit._errors import Provenance

__all__ = ["FACTORIES", "MOVES", "explain", "keep", "made", "module_internals", "record"]


def _existing(owner: object, names: str) -> frozenset[object]:
    return frozenset(getattr(owner, name) for name in names.split() if hasattr(owner, name))


#: The tensor factories whose calls are recorded: each makes a new tensor on the device its
#: `device=` names, the CPU without one (where a forgotten `device=` shows).
FACTORIES = _existing(
    torch,
    "arange range zeros ones empty full tensor as_tensor asarray rand randn randint randperm "
    "linspace logspace eye empty_strided tril_indices triu_indices scalar_tensor "
    "bartlett_window blackman_window hamming_window hann_window kaiser_window "
    # `*_like` follow their input's device, and take `device=` as the others do.
    "zeros_like ones_like empty_like full_like rand_like randn_like randint_like",
)
#: The moves whose results are recorded: a `.cpu()` in the middle of a computation shows here.
MOVES = _existing(torch.Tensor, "to cpu cuda")


class _Entry(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a recorded tensor, with the op that made it and where: the code
    and instruction of the user's frame, turned into a line only when a report needs it
    (attributes are set after creation: a Python `__init__` would cost more than the rest).

    When library code made it (`torch.load`, `default_collate`), `called` is the code of the
    library function the user's line called and `namespace` that line's globals, to name the
    call as the line writes it; neither is set otherwise (read with `getattr`)."""

    __slots__ = ("called", "code", "device", "func", "key", "lasti", "namespace")
    key: int
    func: object
    code: CodeType
    lasti: int
    device: torch.device | None  # as the user sees it, where torch's answer is not that
    called: CodeType
    namespace: dict[str, Any]

    @property
    def filename(self) -> str:
        return self.code.co_filename

    @property
    def lineno(self) -> int:
        for start, end, line in self.code.co_lines():
            if start <= self.lasti < end and line is not None:
                return line
        return self.code.co_firstlineno


#: Recorded tensors by `id`, each entry removed when its tensor is freed.
ENTRIES: dict[int, _Entry] = {}
#: The last record made at each instruction of the user's code: `(id(code), lasti) -> entry`
#: (the entry keeps its code alive, so the id stays its own). Kept after its tensor is freed:
#: it says which lines ran factories (`mask = torch.ones(t, t).tril()`).
SITES: dict[tuple[int, int], _Entry] = {}
_MAX_SITES = 10_000
_getframe = sys._getframe


def _forget(entry: weakref.ref[Any]) -> None:
    key = entry.key  # type: ignore[attr-defined]
    if ENTRIES.get(key) is entry:
        del ENTRIES[key]


def _remember(
    result: torch.Tensor, func: object, code: CodeType, lasti: int, device: Any
) -> _Entry:
    entry = _Entry(result, _forget)
    entry.key = key = id(result)
    entry.func, entry.code, entry.lasti, entry.device = func, code, lasti, device
    ENTRIES[key] = entry
    if len(SITES) > _MAX_SITES:
        SITES.clear()
    SITES[id(code), lasti] = entry
    return entry


def _library_prefixes() -> tuple[str, ...]:
    """Where code the user did not write lives: the standard library and installed packages
    (`site-packages`, `dist-packages`), torch among them, as written and as resolved."""
    paths = {sysconfig.get_paths().get(key) for key in ("stdlib", "purelib", "platlib")}
    paths.update(getattr(site, "getsitepackages", list)())
    paths.add(getattr(site, "getusersitepackages", str)())
    paths.update(path for path in sys.path if path.endswith(("site-packages", "dist-packages")))
    found = set(_INTERNAL)
    for path in paths:
        if path:
            found.update(os.path.join(p, "") for p in (path, os.path.realpath(path)))
    ordered = sorted(found)  # a prefix inside another adds nothing (torch's, in site-packages)
    return tuple(p for p in ordered if not any(p.startswith(q) and p != q for q in ordered))


#: Prefixes of the files of library code (torch's, installed packages', the stdlib's): a
#: factory such code calls is reported as the user's call into it (`torch.load`).
LIBRARY = _library_prefixes()
#: Names of the functions through which torch hands a call to a mode: not a library call.
_DISPATCH = frozenset({"__torch_function__", "__torch_dispatch__"})


def record(
    func: object, result: object, device: torch.device | None = None, depth: int = 2
) -> None:
    """Remember where the factory or move `func` made `result` (a tensor, else nothing), on
    `device` as the user sees it (`None`: where torch says it is). The user's frame is the
    first outside torch and devicekit from `depth` frames up (2: the caller's caller, which
    is the user's when a torch function mode calls this for a C function the user called).

    When the factory's caller is library code (torch's, an installed package's, the stdlib's),
    the record is the user's call into it instead: the user's line, and the library function
    it called (`w = torch.load(buf)`), never the factory the user did not write."""
    if not isinstance(result, torch.Tensor):
        return
    frame = _getframe(depth)
    code = frame.f_code
    if not code.co_filename.startswith(LIBRARY):  # the user called the factory: one test
        _remember(result, func, code, frame.f_lasti, device)
    else:
        _record_from_library(func, result, device, frame)


def _record_from_library(
    func: object, result: torch.Tensor, device: torch.device | None, frame: FrameType | None
) -> None:
    """`record` where `frame` is devicekit's, torch's or another library's: past devicekit's
    frames (a mode's) and torch's dispatch to a mode, the user's line and what it called."""
    outer: FrameType | None = None  # the outermost library frame passed, devicekit's aside
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(LIBRARY):
            break
        if not filename.startswith(_DEVICEKIT_DIR):
            outer = frame
        frame = frame.f_back
    else:
        return  # no user code on the stack (a library's own thread): nothing to say
    entry = _remember(result, func, frame.f_code, frame.f_lasti, device)
    if outer is not None and outer.f_code.co_name not in _DISPATCH:
        entry.called, entry.namespace = outer.f_code, frame.f_globals


def keep(func: object, source: torch.Tensor, result: torch.Tensor) -> None:
    """Record `result` of `source.to(...)` (or `.cpu()`, `.cuda()`): as moved there when it
    changed devices, else as made where `source` was made (`torch.arange(t).to(x.dtype)`)."""
    try:
        moved = result.device != source.device
    except Exception:  # a tensor whose device cannot be read: nothing to say
        return
    if moved:
        record(func, result, None, 3)
        return
    entry = _entry_of(source)
    if entry is not None:
        kept = _remember(result, entry.func, entry.code, entry.lasti, entry.device)
        called = getattr(entry, "called", None)
        if called is not None:
            kept.called, kept.namespace = called, entry.namespace


def made(func: object, result: Any, device: torch.device | None = None) -> Any:
    """`result`, recorded first when `func` is a tensor factory (the simulation's hook; a
    simulated tensor's `device` is given)."""
    if func in FACTORIES:
        record(func, result, device, 3)
    return result


# --- explaining one operand -----------------------------------------------------------------------


def explain(
    label: str,
    tensor: torch.Tensor,
    device: torch.device,
    frame: FrameType | None,
    device_of: Callable[[torch.Tensor], torch.device],
) -> Provenance:
    """Where `tensor` (operand `label`, on `device`) came from, seen from the user's `frame`."""
    context = _Context(frame, device, device_of)
    first = context.identify(label, tensor, via=None)
    if first is not None and _known(first):
        return first
    # An intermediate result (`self.mask[:t] == 0`): what the failing line computed it from.
    for name, value in context.named_on_line():
        if value is not tensor:
            found = context.identify(label, value, via=name)
            if found is not None and _known(found):
                return found
    site = context.line_site()
    if site is not None:  # made on the failing line itself: `x + torch.arange(t)`
        entry, where = site
        return Provenance(label, str(device), *_origin(entry), str(where))
    return first if first is not None else Provenance(label, str(device), "outside")


def _how(func: object) -> Literal["made", "moved"]:
    return "moved" if func in MOVES else "made"


def _origin(entry: _Entry) -> tuple[Literal["made", "moved", "returned"], str]:
    """How the record `entry` says its tensor came to be, and the op that did it: the
    library function the user's line called where library code ran the factory."""
    called = getattr(entry, "called", None)
    if called is not None:
        return "returned", _called_name(entry, called)
    return _how(entry.func), _op(entry.func)


_LOAD = torch.serialization.load.__code__


def _called_name(entry: _Entry, called: CodeType) -> str:
    """The call on the user's line that ran the library function `called`, as the line
    writes it (`torch.load`, `default_collate`, `model`); the first call on the line where
    none can be told apart; the function's own name where the line has none."""
    if called is _LOAD:
        return "torch.load"
    line = linecache.getline(entry.filename, entry.lineno)
    first = None
    for match in _CALL.finditer(line):
        text = match.group(1)
        first = first or text
        value = _lookup(entry.namespace, text)
        if value is not _MISSING and called in _codes(value):
            return text
    return first or called.co_name


def _lookup(namespace: dict[str, Any], dotted: str) -> object:
    """What the dotted name `dotted` (`torch.load`, `self.mask`) of a line refers to, its first
    part looked up in `namespace` and then the builtins; `_MISSING` where a part is missing."""
    first, *rest = dotted.split(".")
    value: object = namespace.get(first, _MISSING)
    if value is _MISSING:
        value = getattr(builtins, first, _MISSING)
    for part in rest:
        if value is _MISSING:
            break
        value = getattr(value, part, _MISSING)
    return value


def _codes(value: object) -> list[object]:
    """The code objects that a call of `value` runs first: a function's or method's own, a
    callable object's `__call__`'s, a class's `__init__`'s."""
    target = getattr(value, "__func__", value)
    found = [getattr(target, "__code__", None)]
    for name in ("__call__", "__init__"):
        method = getattr(value if isinstance(value, type) else type(value), name, None)
        found.append(getattr(getattr(method, "__func__", method), "__code__", None))
    return found


def _op(func: object) -> str:
    return op_name(func) if callable(func) else str(func)


def _known(found: Provenance) -> bool:
    return found.origin != "outside" or found.owner is not None


class _Context:
    """What the stack of the failing call offers: its modules, optimizers and variables."""

    def __init__(
        self,
        frame: FrameType | None,
        device: torch.device,
        device_of: Callable[[torch.Tensor], torch.device],
    ) -> None:
        self.frame = frame
        self.device = device
        self.device_of = device_of
        self._roots: list[tuple[str, object]] | None = None

    # -- one tensor ---------------------------------------------------------------------------

    def identify(
        self, label: str, value: object, via: str | None, depth: int = 0
    ) -> Provenance | None:
        """The provenance of `value`, `None` when it is no tensor on the operand's device."""
        tensor = _tensor_on(value, self.device, self.device_of)
        if tensor is None:
            return None
        device = str(self.device)
        owner = self.owner(tensor)
        local = self.local(tensor)
        kind: str | None = None if owner is None else owner[1]
        where: str | None = None if owner is None else owner[0]
        if owner is None and local is not None:
            where, kind = local[0], "argument" if local[2] else "local variable"
        entry = _entry_of(tensor)
        if entry is not None:
            location = str(call_site(entry.filename, entry.lineno))
            return Provenance(label, device, *_origin(entry), location, via, where, kind)
        if owner is not None or local is None:  # a holder made it before: its path says more
            return Provenance(label, device, "outside", None, None, via, where, kind)
        name, frame, is_argument = local
        if is_argument:
            caller = _user_caller(frame)
            passed = None if caller is None else str(caller)
            return Provenance(label, device, "argument", None, passed, via, where, kind)
        lineno = _assigned_at(frame, name.split("[", 1)[0])
        if lineno is None:
            return Provenance(label, device, "outside", None, None, via, where, kind)
        filename = frame.f_code.co_filename
        location = str(call_site(filename, lineno))
        site = self.made_at(filename, lineno)
        if site is not None:
            return Provenance(label, device, *_origin(site), location, via, where, kind)
        if depth < 2:
            # `future = steps[None] > steps[:, None]`: what the assigning line computed it from.
            for named, found_value in self.named_on_line(frame, lineno):
                if found_value is not tensor and named != name:
                    found = self.identify(label, found_value, via or named, depth + 1)
                    if found is not None and found.origin in ("made", "moved", "returned"):
                        return found
        called = self.made_in_call(frame, lineno)
        if called is not None:  # `mask = causal_mask(t)`: a factory ran in `causal_mask`
            entry, at = called
            return Provenance(label, device, *_origin(entry), str(at), via, where, kind)
        return Provenance(label, device, "assigned", None, location, via, where, kind)

    # -- who holds it -------------------------------------------------------------------------

    def roots(self) -> list[tuple[str, object]]:
        """The modules and optimizers on the stack, named as the user's code names them where
        it does, the outermost first."""
        if self._roots is None:
            self._roots = _roots(sys._getframe(1))
        return self._roots

    def owner(self, tensor: torch.Tensor) -> tuple[str, str] | None:
        """The attribute path that holds `tensor` (or the tensor it is a view of), and how."""
        targets = _with_bases(tensor)
        roots = self.roots()
        for name, root in roots:
            if isinstance(root, torch.nn.Module):
                found = _in_module(root, name, targets)
            else:
                found = _in_optimizer(root, name, targets, roots)
            if found is not None:
                return found
        return None

    def local(self, tensor: torch.Tensor) -> tuple[str, FrameType, bool] | None:
        """The user's variable that holds `tensor`, in the innermost user frame that has one:
        `(name, frame, whether it is an argument of the function)`."""
        targets = _with_bases(tensor)
        for frame in _user_frames(self.frame, limit=8):
            code = frame.f_code
            arguments = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            holders = [
                (name, found)
                for name, value in _locals(frame).items()
                if (found := _holding(name, value, targets)) is not None
            ]
            if holders:
                # The holder the running line names (`batch["labels"]`), else the first.
                line = linecache.getline(code.co_filename, frame.f_lineno)
                name, found = next(
                    (pair for pair in holders if re.search(rf"\b{pair[0]}\b", line)), holders[0]
                )
                return found, frame, name in arguments and not _assigned_at(frame, name)
        return None

    # -- the failing line ---------------------------------------------------------------------

    def named_on_line(
        self, frame: FrameType | None = None, lineno: int | None = None
    ) -> Iterator[tuple[str, object]]:
        """The values the names on a line of `frame` (the failing line by default) refer to
        (`self.mask`, `pos`), in order."""
        frame = frame or self.frame
        if frame is None:
            return
        line = linecache.getline(frame.f_code.co_filename, lineno or frame.f_lineno)
        f_locals = _locals(frame)
        seen: set[str] = set()
        for match in _NAME.finditer(line):
            name = match.group(0)
            if name in seen:
                continue
            seen.add(name)
            parts = name.split(".")
            if parts[0] not in f_locals:
                continue
            value: object = f_locals[parts[0]]
            for part in parts[1:]:
                value = _attribute(value, part)
                if value is _MISSING:
                    break
            if value is not _MISSING:
                yield name, value

    def made_in_call(self, frame: FrameType, lineno: int) -> tuple[_Entry, Any] | None:
        """A factory recorded inside a Python function that the line `lineno` of `frame`
        calls (by name), that made a tensor on the operand's device: `(record, site)`."""
        line = linecache.getline(frame.f_code.co_filename, lineno)
        namespace = {**frame.f_globals, **_locals(frame)}
        for match in _CALL.finditer(line):
            value = _lookup(namespace, match.group(1))
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if not isinstance(code, CodeType):
                continue
            lines = [line for _, _, line in code.co_lines() if line is not None]
            if not lines:
                continue
            first, last = min(lines), max(lines)
            for entry in reversed(list(SITES.values())):
                if (
                    entry.filename == code.co_filename
                    and first <= entry.lineno <= last
                    and self._on_device(entry)
                ):
                    return entry, call_site(entry.filename, entry.lineno)
        return None

    def line_site(self) -> tuple[_Entry, Any] | None:
        """The record of a factory run on the failing line, with the line."""
        frame = self.frame
        if frame is None:
            return None
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        entry = self.made_at(filename, lineno)
        return None if entry is None else (entry, call_site(filename, lineno))

    def made_at(self, filename: str, lineno: int) -> _Entry | None:
        """The record of the factory or move last run on a line that made a tensor on the
        operand's device, else `None`."""
        for entry in reversed(list(SITES.values())):
            if entry.filename == filename and entry.lineno == lineno and self._on_device(entry):
                return entry
        return None

    def _on_device(self, entry: _Entry) -> bool:
        """Whether the tensor `entry` records was on the operand's device (a freed one may
        have been: it is not ruled out)."""
        if entry.device is not None:
            return entry.device == self.device
        tensor = entry()
        if tensor is None:
            return True
        try:
            return self.device_of(tensor) == self.device
        except Exception:
            return False


_NAME = re.compile(r"(?<![\w.'\"])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_CALL = re.compile(r"(?<![\w.'\"])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\(")
_MISSING = object()


def _attribute(value: object, name: str) -> object:
    """`value.name` for a module's or a plain object's own attribute, never a property."""
    if isinstance(value, torch.nn.Module):
        for table in ("_parameters", "_buffers", "_modules"):
            found = value.__dict__.get(table, {})
            if name in found:
                return found[name]
    try:
        return vars(value).get(name, _MISSING)
    except TypeError:
        return _MISSING


def _tensor_on(
    value: object, device: torch.device, device_of: Callable[[torch.Tensor], torch.device]
) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        try:
            return value if device_of(value) == device else None
        except Exception:
            return None
    return None


def _with_bases(tensor: torch.Tensor) -> list[torch.Tensor]:
    """`tensor` and the tensors it is a view of (`pos[None]` is a view of `pos`)."""
    found = [tensor]
    base = tensor._base
    while base is not None and len(found) < 8:
        found.append(base)
        base = base._base
    return found


def _entry_of(tensor: torch.Tensor) -> _Entry | None:
    for candidate in _with_bases(tensor):
        entry = ENTRIES.get(id(candidate))
        if entry is not None and entry() is candidate:
            return entry
    return None


def _is(value: object, targets: list[torch.Tensor]) -> bool:
    return any(value is target for target in targets)


def _holding(name: str, value: object, targets: list[torch.Tensor]) -> str | None:
    """`name`, or `name[key]`, when `value`, or an item of it (a list, tuple or dict), is one
    of `targets`."""
    if isinstance(value, torch.Tensor):
        return name if _is(value, targets) else None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value[:1000]):
            if isinstance(item, torch.Tensor) and _is(item, targets):
                return f"{name}[{index}]"
    elif isinstance(value, dict):
        for key, item in list(value.items())[:1000]:
            if isinstance(item, torch.Tensor) and _is(item, targets):
                return f"{name}[{key!r}]"
    return None


def _locals(frame: FrameType) -> dict[str, Any]:
    try:
        return dict(frame.f_locals)
    except Exception:
        return {}


def _user_frames(frame: FrameType | None, limit: int) -> Iterator[FrameType]:
    while frame is not None and limit > 0:
        if not is_internal(frame.f_code.co_filename):
            yield frame
            limit -= 1
        frame = frame.f_back


def _user_caller(frame: FrameType) -> object:
    """The user's line that called the function running in `frame`."""
    caller = next(_user_frames(frame.f_back, limit=1), None)
    return None if caller is None else call_site(caller.f_code.co_filename, caller.f_lineno)


_assignments: dict[CodeType, dict[str, list[int]]] = {}


def _assigned_at(frame: FrameType, name: str) -> int | None:
    """The last line of `frame`'s function, up to the running one, that assigns `name`."""
    lines = _assignment_lines(frame.f_code).get(name, [])
    before = [line for line in lines if line <= frame.f_lineno]
    return before[-1] if before else None


def _assignment_lines(code: CodeType) -> dict[str, list[int]]:
    found = _assignments.get(code)
    if found is not None:
        return found
    found = {}
    try:
        lines = linecache.getlines(code.co_filename)
        first = code.co_firstlineno
        block = inspect.getblock(lines[first - 1 :]) if code.co_name != "<module>" else lines
        offset = first - 1 if code.co_name != "<module>" else 0
        tree = ast.parse(textwrap.dedent("".join(block)))
    except Exception:  # no source (a REPL, exec'd code), or source that does not parse
        tree, offset = None, 0
    if tree is not None:
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(
                node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr, ast.For, ast.comprehension)
            ):
                targets = [node.target]
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                targets = [node.optional_vars]
            for target in targets:
                for named in ast.walk(target):
                    if isinstance(named, ast.Name):
                        line: int = getattr(node, "lineno", None) or target.lineno
                        found.setdefault(named.id, []).append(line + offset)
        for values in found.values():
            values.sort()
    if len(_assignments) > 1000:
        _assignments.clear()
    _assignments[code] = found
    return found


# --- the modules and optimizers on the stack ------------------------------------------------------


def _roots(frame: FrameType | None) -> list[tuple[str, object]]:
    """The modules and optimizers that the stack's functions run (`self`) or hold in variables,
    named by the user's variable where one holds them, outermost first."""
    named: list[tuple[str, object]] = []
    running: list[object] = []
    depth = 0
    while frame is not None and depth < 200:
        depth += 1
        user = not is_internal(frame.f_code.co_filename)
        for name, value in _locals(frame).items():
            if isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
                if user and name != "self":
                    named.append((name, value))
                else:
                    running.append(value)
            elif user and name == "self":
                for attribute, held in _plain_attributes(value):
                    if isinstance(held, (torch.nn.Module, torch.optim.Optimizer)):
                        named.append((f"self.{attribute}", held))
        frame = frame.f_back
    found: list[tuple[str, object]] = []
    seen: set[int] = set()
    for name, root in [*reversed(named), *((_default_name(r), r) for r in reversed(running))]:
        if id(root) not in seen:
            seen.add(id(root))
            found.append((name, root))
    return found


def _plain_attributes(value: object) -> list[tuple[str, object]]:
    try:
        return list(vars(value).items())
    except TypeError:
        return []


def _default_name(root: object) -> str:
    return "optimizer" if isinstance(root, torch.optim.Optimizer) else "model"


@functools.cache
def module_internals() -> frozenset[str]:
    """What every `nn.Module` keeps in its `__dict__` (hooks, the registries): not user
    attributes (built on first use, not at import)."""
    return frozenset(vars(torch.nn.Module()))


def _in_module(
    root: torch.nn.Module, name: str, targets: list[torch.Tensor]
) -> tuple[str, str] | None:
    """Where in `root` one of `targets` is held: a parameter, a buffer, a plain attribute, an
    item of a list, tuple or dict attribute, or a parameter or buffer of a module held in one
    (an "unregistered module": `Module.to` does not reach it)."""
    stack: list[tuple[str, torch.nn.Module, bool]] = [(name, root, False)]
    seen: set[int] = set()
    while stack:
        path, module, unregistered = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = module.__dict__
        internals = module_internals()
        for table, what in (("_parameters", "parameter"), ("_buffers", "buffer")):
            for key, value in state.get(table, {}).items():
                if value is not None and _is(value, targets):
                    return f"{path}.{key}", "unregistered module" if unregistered else what
        children: list[tuple[str, torch.nn.Module, bool]] = []
        for key, value in state.items():
            if key in internals:
                continue
            found = _holding(f"{path}.{key}", value, targets)
            if found is not None:
                kind = "attribute" if isinstance(value, torch.Tensor) else "dict item"
                if isinstance(value, (list, tuple)):
                    kind = "list item"
                return found, kind
            children.extend(
                (step, held, True) for step, held in _modules_in(f"{path}.{key}", value)
            )
        children[:0] = [
            (_child_path(path, module, key), child, unregistered)
            for key, child in state.get("_modules", {}).items()
            if child is not None
        ]
        stack.extend(reversed(children))
    return None


def _modules_in(path: str, value: object) -> list[tuple[str, torch.nn.Module]]:
    """The modules in a plain list, tuple or dict attribute, with their paths."""
    if isinstance(value, (list, tuple)):
        pairs: list[tuple[object, object]] = list(enumerate(value[:1000]))
        return [
            (f"{path}[{key}]", item) for key, item in pairs if isinstance(item, torch.nn.Module)
        ]
    if isinstance(value, dict):
        pairs = list(value.items())[:1000]
        return [
            (f"{path}[{key!r}]", item) for key, item in pairs if isinstance(item, torch.nn.Module)
        ]
    return []


def _child_path(path: str, parent: torch.nn.Module, key: str) -> str:
    if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)) and key.isdigit():
        return f"{path}[{key}]"
    if isinstance(parent, torch.nn.ModuleDict):
        return f"{path}[{key!r}]"
    return f"{path}.{key}"


def _in_optimizer(
    optimizer: Any, name: str, targets: list[torch.Tensor], roots: list[tuple[str, object]]
) -> tuple[str, str] | None:
    """Where in `optimizer.state` one of `targets` is held, the parameter named by its path in
    a module on the stack where one holds it."""
    try:
        state = list(optimizer.state.items())
    except Exception:
        return None
    for parameter, values in state:
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and _is(value, targets):
                return f"{name}.state[{_parameter_name(optimizer, parameter, roots)}][{key!r}]", (
                    "optimizer state"
                )
    return None


def _parameter_name(optimizer: Any, parameter: object, roots: list[tuple[str, object]]) -> str:
    for root_name, root in roots:
        if isinstance(root, torch.nn.Module) and isinstance(parameter, torch.Tensor):
            found = _in_module(root, root_name, [parameter])
            if found is not None:
                return found[0]
    for number, group in enumerate(getattr(optimizer, "param_groups", [])):
        for index, candidate in enumerate(group.get("params", [])):
            if candidate is parameter:
                return f"<param_groups[{number}]['params'][{index}]>"
    return "<parameter>"
