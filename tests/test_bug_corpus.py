"""The bug corpus (`tests/bug_corpus`) meets issue 15's targets: every bug caught under
simulated CUDA, the creation line named for at least 90% of the forward-pass bugs, the holder
named for every tensor a module, optimizer or batch holds, `audit` flagging every
attribute-held tensor, the right fix, and no false alarm on any fixed version."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.bug_corpus import CASES, Case, Outcome, run, table

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the corpus simulates CUDA; on a CUDA machine it is real"
)


@functools.cache
def outcome(name: str) -> Outcome:
    return run(next(case for case in CASES if case.name == name))


def test_the_corpus_has_at_least_30_bugs_of_every_pattern() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)
    patterns = {case.pattern for case in CASES}
    for pattern in (
        "forward-made",
        "plain attribute",
        "tensor in a list",
        "labels on the CPU",
        "loss weight as a plain tensor",
        "optimizer state",
        "model parallel",
        "backward pass",
    ):
        assert pattern in patterns
    for case in CASES:
        if case.forward:
            assert case.lines is not None, f"{case.name}: no statement marked `# <- {case.name}`"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_bug_is_caught_with_the_right_fix_and_its_fix_is_clean(case: Case) -> None:
    found = outcome(case.name)
    assert found.caught, f"{case.name}: not caught ({found.other!r})"
    assert found.right_fix, f"{case.name}: expected {case.fix!r} in the fix:\n{found.error}"
    assert not found.false_alarm, (
        f"{case.name}: the fixed version raised {found.clean_error!r} "
        f"or audits with errors: {found.clean_audit}"
    )
    if case.owner is not None:
        assert found.names_owner, f"{case.name}: expected holder {case.owner}:\n{found.error}"
    if case.held:
        assert found.audit_flags, f"{case.name}: audit found nothing"


def test_the_creation_line_is_named_for_90_percent_of_forward_pass_bugs() -> None:
    forward = [outcome(case.name) for case in CASES if case.forward]
    named = [found for found in forward if found.names_line]
    assert len(named) >= 0.9 * len(forward), [f.case.name for f in forward if not f.names_line]


def test_the_table_reports_the_totals() -> None:
    text = table([outcome(case.name) for case in CASES])
    assert text.startswith("| case | pattern | caught by simulation | flagged by audit |")
    assert f"- cases: {len(CASES)}; caught by the simulation: {len(CASES)}" in text
    assert "- false alarms on the fixed versions: 0 (target: 0)" in text
