"""A corpus of small, realistic device bugs, each with its fix, and what devicekit says of them.

Each case is a tiny program written the way such bugs are written in the wild (a tensor made in
`forward` without `device=`, a mask kept as a plain attribute, labels left on the CPU, a
submodule on another GPU, ...), runnable as the buggy version and as the fixed one. `run(case)`
runs both under `devicekit.simulated_devices("cuda", 2)`, where the bugs fail as on real CUDA,
audits the objects the case hands over with `devicekit.audit` before the failing step, and
records what the error says: whether it names the line that made the stray tensor (the
statement below the comment `# <- <case name>` in the case's source), the attribute that holds
it, and the fix.

`benchmarks/bug_corpus.py` prints the table; `tests/test_bug_corpus.py` asserts the targets.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import devicekit
from devicekit import CrossDeviceError

__all__ = ["CASES", "Case", "Held", "Outcome", "run", "table"]


@dataclass
class Held:
    """What a program hands over to be audited before its failing step (`held.audit = model`)."""

    audit: Any = None


#: A program: `program(fixed, held)` runs the buggy (`fixed=False`) or fixed version.
Program = Callable[[bool, Held], object]


@dataclass(frozen=True)
class Case:
    """One bug of the corpus.

    Attributes:
        name: A short identifier; the statement that makes the stray tensor is marked by a
            comment `# <- name` above it.
        pattern: The family of bug (`"forward-made"`, `"plain attribute"`, ...).
        program: The program, buggy and fixed.
        fix: Words the message's fix must contain to be the right fix for this bug.
        owner: The attribute path the message must name as the tensor's holder, for a tensor
            a module, an optimizer or a batch holds.
        forward: A tensor made inside a forward pass: the message must name its line.
        held: The stray tensor is held by a module attribute (`audit` should flag it).
        static: The bug is in the objects' state, visible without running anything (`audit`
            should flag it); implied by `held`.
    """

    name: str
    pattern: str
    program: Program
    fix: str
    owner: str | None = None
    forward: bool = False
    held: bool = False
    static: bool = False

    @property
    def lines(self) -> range | None:
        """The lines of the statement below the comment `# <- name` in the case's module."""
        module = sys.modules[self.program.__module__]
        source = Path(module.__file__ or "").read_text()
        marker = re.compile(rf"^\s*#\s*<-\s*{re.escape(self.name)}\b")
        for number, text in enumerate(source.splitlines(), start=1):
            if marker.search(text):
                for node in ast.walk(ast.parse(source)):
                    if isinstance(node, ast.stmt) and node.lineno == number + 1:
                        return range(node.lineno, (node.end_lineno or node.lineno) + 1)
        return None


@dataclass
class Outcome:
    """What devicekit made of one case."""

    case: Case
    error: CrossDeviceError | None = None
    other: BaseException | None = None  # an exception that is no CrossDeviceError
    audit: Any = None  # the `AuditReport` of the buggy version, or None
    clean_error: BaseException | None = None
    clean_audit: Any = None
    lines: list[int] = field(default_factory=list)  # lines the provenance names

    @property
    def caught(self) -> bool:
        return self.error is not None

    @property
    def names_line(self) -> bool:
        span = self.case.lines
        return span is not None and any(line in span for line in self.lines)

    @property
    def names_owner(self) -> bool:
        if self.error is None or self.case.owner is None:
            return False
        return any(found.owner == self.case.owner for found in self.error.provenance)

    @property
    def right_fix(self) -> bool:
        if self.error is None:
            return False
        fix = next((line for line in str(self.error).splitlines() if line.startswith("Fix:")), "")
        return self.case.fix in fix

    @property
    def audit_flags(self) -> bool:
        return bool(self.audit)

    @property
    def false_alarm(self) -> bool:
        """The fixed version raised, or its audit found an error."""
        errors = [] if self.clean_audit is None else self.clean_audit.at_least("error")
        return self.clean_error is not None or bool(errors)


def _audit(held: Held) -> Any:
    return None if held.audit is None else devicekit.audit(held.audit, name="model")


def run(case: Case) -> Outcome:
    """Run `case`, buggy and fixed, under `simulated_devices("cuda", 2)`."""
    outcome = Outcome(case)
    with devicekit.simulated_devices("cuda", 2):
        held = Held()
        try:
            case.program(False, held)
        except CrossDeviceError as error:
            outcome.error = error
        except Exception as error:  # reported in the table as "not caught"
            outcome.other = error
        outcome.audit = _audit(held)
        clean = Held()
        try:
            case.program(True, clean)
        except Exception as error:  # a false alarm, reported
            outcome.clean_error = error
        outcome.clean_audit = _audit(clean)
    if outcome.error is not None:
        for found in outcome.error.provenance:
            match = re.match(r".*?:(\d+): ", found.location or "")
            if match:
                outcome.lines.append(int(match.group(1)))
    return outcome


def _load() -> list[Case]:
    from tests.bug_corpus import backward, forward, held, losses, optim, parallel

    return [
        *forward.CASES,
        *held.CASES,
        *losses.CASES,
        *optim.CASES,
        *parallel.CASES,
        *backward.CASES,
    ]


CASES: list[Case] = _load()


def _mark(value: bool, applies: bool = True) -> str:
    if not applies:
        return "-"
    return "yes" if value else "**no**"


def table(outcomes: list[Outcome]) -> str:
    """The corpus as a markdown table, and the totals against the targets."""
    rows = [
        "| case | pattern | caught by simulation | flagged by audit | names the creation line "
        "| names the owner | right fix | fixed version clean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        case = outcome.case
        if outcome.audit is None:
            audit = "n/a"
        elif case.held or case.static:
            audit = _mark(outcome.audit_flags)
        else:  # nothing to see without running it: "no" is the expected answer
            audit = "yes" if outcome.audit_flags else "no"
        rows.append(
            f"| {case.name} | {case.pattern} | {_mark(outcome.caught)} | {audit} "
            f"| {_mark(outcome.names_line, case.lines is not None)} "
            f"| {_mark(outcome.names_owner, case.owner is not None)} "
            f"| {_mark(outcome.right_fix)} | {_mark(not outcome.false_alarm)} |"
        )
    forward = [o for o in outcomes if o.case.forward]
    held = [o for o in outcomes if o.case.held]
    owned = [o for o in outcomes if o.case.owner is not None]
    static = [o for o in outcomes if o.case.static and not o.case.held]
    totals = [
        f"- cases: {len(outcomes)}; caught by the simulation: {sum(o.caught for o in outcomes)}",
        f"- forward-pass bugs whose creation line is named: "
        f"{sum(o.names_line for o in forward)} of {len(forward)} "
        f"({_percent(sum(o.names_line for o in forward), len(forward))}; target 90%)",
        f"- owner named: {sum(o.names_owner for o in owned)} of {len(owned)} cases with a "
        f"holder, {sum(o.names_owner for o in held)} of {len(held)} attribute-held tensors "
        "(target: all)",
        f"- attribute-held tensors flagged by audit: {sum(o.audit_flags for o in held)} of "
        f"{len(held)} (target: all); other bugs in the objects' state: "
        f"{sum(o.audit_flags for o in static)} of {len(static)}",
        f"- right fix: {sum(o.right_fix for o in outcomes)} of {len(outcomes)}",
        f"- false alarms on the fixed versions: {sum(o.false_alarm for o in outcomes)} (target: 0)",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(totals)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"
