"""The one report of a cross-device error: what `device_guard`, simulated devices and
`colocate` raise (and the guard's warnings say), built here and nowhere else.

```text
Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!
Tensor.__add__ got tensors on different devices (cuda:0, cpu):
  self: f32[2,8,16] @ cuda:0
  other: i64[8] @ cpu
    made by torch.arange at model.py:41: pos = torch.arange(t)
called at model.py:42: return x + pos
Fix: create it on the device where it is used: `torch.arange(..., device=x.device)`.
```

The first line is torch's own sentence, which programs and test suites match; then the op, each
operand, where each offending operand came from (`devicekit._provenance`), the user's line, and
one fix chosen for the pattern found.
"""

from __future__ import annotations

import linecache
import re
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch

from devicekit._describe import (
    CallSite,
    call_site,
    called_at,
    describe_tensor,
    is_internal,
    torch_sentence,
    user_frame,
)
from devicekit._errors import CrossDeviceError, Provenance
from devicekit._provenance import explain

__all__ = ["Report", "end_at_user_line"]

#: How each kind of block is named in "came from outside the ... block".
_BLOCKS = {"device_guard": "guarded", "simulated_devices": "simulated_devices"}
#: The holders that are the user's own variables, named in the fix (`labels = labels.to(...)`).
_VARIABLES = ("local variable", "argument")
_LOSSES = ("cross_entropy", "nll_loss", "binary_cross_entropy", "multilabel_soft_margin_loss")


def _device(tensor: torch.Tensor) -> torch.device:
    return tensor.device


class Report:
    """A cross-device error under construction: its operands, their provenance, and the fix.

    Args:
        op: The op as users write it.
        operands: `(label, tensor)` of each operand to list, or `(label, text)` where there is
            no one tensor to describe; `("", text)` for a line of its own (`and 9 more on
            cuda:1`).
        devices: The distinct devices that met, in order.
        target: Where the op should run; `None` where that is ambiguous.
        block: `"device_guard"`, `"simulated_devices"` or `"colocate"`: which kind of check
            found it (provenance is looked up only inside the first two).
        device_of: Where a tensor is as the user sees it (a simulated device under a
            simulation).
        strays: The labels of the offending operands; `None` for those not on `target` (all
            of them when `target` is `None`).
    """

    def __init__(
        self,
        op: str,
        operands: Sequence[tuple[str, torch.Tensor | str]],
        *,
        devices: Sequence[torch.device],
        target: torch.device | None,
        block: str,
        device_of: Callable[[torch.Tensor], torch.device] = _device,
        strays: Sequence[str] | None = None,
    ) -> None:
        self.op = op
        self.devices = list(devices)
        self.target = target
        self.block = block
        self.frame: FrameType | None = user_frame(2)
        self.site: CallSite | None = (
            None
            if self.frame is None
            else call_site(self.frame.f_code.co_filename, self.frame.f_lineno)
        )
        self.lines: list[tuple[str, str]] = []
        self.strays: list[str] = []
        provenance: dict[str, Provenance] = {}
        on_target: list[torch.Tensor] = []
        for label, value in operands:
            if isinstance(value, str):
                self.lines.append((label, value))
                continue
            device = device_of(value)
            self.lines.append((label, describe_tensor(value, device)))
            if target is not None and device == target:
                on_target.append(value)
            if (label not in strays) if strays is not None else device == target:
                continue
            self.strays.append(label)
            if block in _BLOCKS:
                try:
                    provenance[label] = explain(label, value, device, self.frame, device_of)
                except Exception:  # an object on the stack that cannot be looked at: say less
                    continue
        self.provenance = provenance
        self._on_target = on_target
        self._device_of = device_of

    @property
    def location(self) -> str | None:
        return None if self.site is None else str(self.site)

    def body(self, fix: str | None = None) -> str:
        """The message without torch's sentence (what the guard's warnings say)."""
        devices = ", ".join(str(device) for device in self.devices)
        lines = [f"{self.op} got tensors on different devices ({devices}):"]
        for label, text in self.lines:
            lines.append(f"  {label}: {text}" if label else f"  {text}")
            found = self.provenance.get(label)
            if found is not None:
                lines.extend(f"    {line}" for line in self._explained(found))
        lines.append(called_at(self.site))
        lines.append(fix if fix is not None else self.fix())
        return "\n".join(lines)

    def error(self, fix: str | None = None, note: str | None = None) -> CrossDeviceError:
        """The error to raise, its first line torch's own sentence."""
        text = f"{torch_sentence(self.devices)}\n{self.body(fix)}"
        if note:
            text = f"{text}\n{note}"
        return CrossDeviceError(
            text,
            op=self.op,
            operands=tuple(line for line in self.lines if line[0]),
            devices=tuple(self.devices),
            location=self.location,
            provenance=tuple(self.provenance.values()),
        )

    # -- provenance lines ---------------------------------------------------------------------

    def _explained(self, found: Provenance) -> list[str]:
        head = f"computed from {found.via}, " if found.via is not None else ""
        named = found.owner_kind in _VARIABLES
        if found.origin in ("made", "moved"):
            line = f"{head}{found.origin} by {found.op} at {found.location}"
        elif found.origin == "returned":
            line = f"{head}made inside {found.op}, called at {found.location}"
        elif found.origin == "assigned":
            line = f"{head}assigned at {found.location}"
        elif found.origin == "argument":
            where = f" by {found.location}" if found.location is not None else ""
            line = f"{head}passed in as the argument {found.owner}{where}"
        elif found.owner is not None and not named:  # made before the block; its holder says
            return [f"{head}held by {found.owner} ({_held(found)})"]
        else:
            block = _BLOCKS.get(self.block, self.block)
            line = (
                f"{head}came from outside the {block} block (passed in, loaded or made before it)"
            )
            if named:
                line += f"; here it is {found.owner}"
        lines = [line]
        if found.owner is not None and not named:
            lines.append(f"held by {found.owner} ({_held(found)})")
        return lines

    # -- the fix ------------------------------------------------------------------------------

    def fix(self) -> str:
        """The fix for the most specific pattern among the offending operands: who holds one,
        then a loss's labels or weight, then where one was made, then where one entered; else
        the generic fix."""
        found = list(self.provenance.values())
        for rule in (self._fix_holder, self._fix_loss, self._fix_origin, self._fix_entry):
            for item in found:
                text = rule(item)
                if text is not None:
                    return f"Fix: {text}"
        return f"Fix: {self._generic()}"

    def _fix_holder(self, found: Provenance) -> str | None:
        target, kind, owner = self.target, found.owner_kind, found.owner or ""
        attribute = owner.rsplit(".", 1)[-1]
        if kind == "attribute":
            return (
                f'register {attribute} as a buffer, which Module.to moves: `self.register_buffer("'
                f'{attribute}", ..., persistent=False)` in __init__ instead of `self.{attribute} '
                "= ...`."
            )
        if kind in ("list item", "dict item"):
            container = owner.rsplit("[", 1)[0].rsplit(".", 1)[-1]
            return (
                f"register each tensor of {container} as a buffer (`self.register_buffer(name, "
                f"t, persistent=False)`) instead of keeping them in a plain "
                f"{kind.split()[0]}: Module.to does not look inside it."
            )
        if kind == "unregistered module":
            container = owner.rsplit("[", 1)[0].rsplit(".", 1)[-1]
            return (
                f"hold the modules of {container} in `nn.ModuleList` (or `nn.ModuleDict`) "
                "instead of a plain list or dict, so that Module.to moves them."
            )
        if kind in ("parameter", "buffer"):
            module = owner.rsplit(".", 1)[0]
            if target is not None:
                return (
                    f'move {module} to {target} with the other operands: `{module}.to("{target}")` '
                    "(Module.to moves its parameters and buffers)."
                )
            other = next((d for d in self.devices if str(d) != found.device), None)
            return (
                f"put both on one device: move the input to {found.device} before calling "
                f'{module} (`x.to("{found.device}")`), or `{module}.to("{other}")`; with two '
                "models, put both models on one device."
            )
        if kind == "optimizer state":
            return (
                "create the optimizer after moving the model (`model.to(device)` first), or move "
                "its state to the parameters' devices with "
                "`optimizer.load_state_dict(optimizer.state_dict())`."
            )
        return None

    def _fix_loss(self, found: Provenance) -> str | None:
        target = self.target
        if target is None or not any(loss in self.op for loss in _LOSSES):
            return None
        if found.label.endswith("weight"):
            return (
                "move the weight with the model: pass it to the loss module "
                f"(`nn.CrossEntropyLoss(weight=w)` registers it as a buffer) and move that with "
                f'`.to("{target}")`, or pass `w.to("{target}")`.'
            )
        if found.label == "target":
            named = found.owner_kind in _VARIABLES
            name = found.owner if named and found.owner is not None else "labels"
            return (
                f'move the labels to {target} with the batch: `devicekit.to_device(batch, "'
                f'{target}")`, or `{name} = {name}.to("{target}")`.'
            )
        return None

    def _fix_origin(self, found: Provenance) -> str | None:
        target = self.target
        if found.origin == "made":
            where = self._where()
            return f"create it on the device where it is used: `{found.op}(..., device={where})`."
        if found.origin == "returned":
            return self._fix_returned(found)
        if found.origin == "moved" and target is not None:
            return (
                f"keep it on {target}: drop the {found.op} at {found.location}, or move the "
                "result back before this op."
            )
        return None

    def _fix_returned(self, found: Provenance) -> str:
        """A library function the user called made it (`torch.load`, `default_collate`): move
        what it returns, or have it load there; never `device=` on a factory the user did not
        call."""
        target = self.target or self.devices[0]
        named = found.owner_kind in _VARIABLES and found.owner is not None
        root = (found.owner or "").split("[", 1)[0] if named else "result"
        moved = f'`{root} = devicekit.to_device({root}, "{target}")`'
        if found.op == "torch.load":
            reference = self._reference()
            where = f'"{target}"' if reference is None else f"{reference}.device"
            return (
                f"load it onto the device where it is used: `torch.load(..., map_location="
                f"{where})`, or move it after loading: {moved}."
            )
        reference = self._reference()
        also = "" if reference is None else f" (or `.to({reference}.device)`)"
        return f"move what {found.op} returns to {target} before using it: {moved}{also}."

    def _fix_entry(self, found: Provenance) -> str | None:
        target = self.target
        if target is None or found.owner_kind not in _VARIABLES:
            return None
        name = found.owner
        return (
            f'move it to {target} where it enters, with the batch: `devicekit.to_device(batch, "'
            f'{target}")`, or `{name} = {name}.to("{target}")`.'
        )

    def _where(self) -> str:
        """What a `device=` should say: a variable of the failing line on the target device
        (`x.device`), else a neutral stand-in for the operand already there; the device
        itself where no operand's device is the right one."""
        reference = self._reference()
        if reference is not None:
            return f"{reference}.device"
        if self.target is not None:
            return "<the other operand>.device"
        return f'"{self.devices[0]}"'

    def _reference(self) -> str | None:
        """The name of a variable on the failing line that holds a tensor on the target
        device (an operand first), else `None`: a variable the line does not use may be
        anything (`logits` of an earlier step)."""
        if self.frame is None or self.target is None:
            return None
        line = linecache.getline(self.frame.f_code.co_filename, self.frame.f_lineno)
        used = set(re.findall(r"(?<![\w.])[A-Za-z_]\w*", line))
        try:
            names = {k: v for k, v in self.frame.f_locals.items() if k != "self" and k in used}
        except Exception:
            names = {}
        for name, value in names.items():
            if any(value is tensor for tensor in self._on_target):
                return name
        for name, value in names.items():
            if isinstance(value, torch.Tensor) and self._device_of(value) == self.target:
                return name
        return None

    def _generic(self) -> str:
        guard = self.block == "device_guard"
        if self.target is None:
            first = str(self.devices[0])
            if guard:
                return (
                    f'choose the device, e.g. `devicekit.device_guard("move", target="{first}")`, '
                    "or move the operands to one device with `devicekit.to_device` first."
                )
            return (
                f"put the operands on one device first, e.g. `devicekit.to_device(x, "
                f'"{first}")`; with two models, put both models on one device.'
            )
        labels = self.strays or [label for label, _ in self.lines]
        example = "tensor" if labels[0].startswith(("argument ", "args[")) else labels[0]
        text = (
            f"move {', '.join(labels)} to {self.target} first, e.g. "
            f'`devicekit.to_device({example}, "{self.target}")`'
        )
        if guard:
            return f'{text}, or let `devicekit.device_guard("move")` move operands for you.'
        return f"{text}."


def end_at_user_line(excinfo: Any) -> None:
    """End a pytest `ExceptionInfo`'s traceback at the user's last frame, dropping the torch
    and devicekit frames after it, so that `--tb=line` and `--tb=short` report the user's line
    (`F.cross_entropy` and `nn.Module` calls run Python code of torch's before devicekit's).

    The raw traceback is cut (pytest rebuilds its entries from it), at the end of a failed test.
    """
    last = None
    tb = excinfo.tb
    while tb is not None:
        if not is_internal(tb.tb_frame.f_code.co_filename):
            last = tb
        tb = tb.tb_next
    if last is not None and last.tb_next is not None:
        last.tb_next = None
        excinfo.traceback = type(excinfo.traceback)(excinfo.tb)


def _held(found: Provenance) -> str:
    kind = found.owner_kind
    if kind == "attribute":
        return "a plain attribute, not a registered buffer: Module.to does not move it"
    if kind in ("list item", "dict item"):
        return (
            f"in a plain {kind.split()[0]} attribute, not a registered buffer: Module.to does "
            "not move it"
        )
    if kind == "unregistered module":
        return (
            "of a module in a plain list or dict, not a registered submodule: Module.to does "
            "not move it"
        )
    return f"{kind}, on {found.device}"
