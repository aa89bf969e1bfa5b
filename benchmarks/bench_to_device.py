"""`to_device` against its peers and the per-tensor floor, on the six batch shapes of issue 4.

    python -m benchmarks.bench_to_device              # every shape, to cpu and to meta
    python -m benchmarks.bench_to_device --repeat 25  # steadier medians

Targets: `cpu` (the tensors are already there: the pure cost of walking the batch) and `meta`
(a real dispatch per tensor, without memory traffic). The floor is `[t.to(d) for t in leaves]`
on a list flattened beforehand: what any mover must at least pay. Peers (accelerate,
lightning-utilities, lightning-fabric, optree, torch's pytree) are benchmark extras, never
runtime dependencies; a missing one is shown as `-`. Every figure is a median over repeats,
all taken in this one run; ratios compare figures of the same run only.

A peer result marked `*` did not move every tensor (accelerate leaves dataclasses alone, optree
and torch's pytree do not look inside dataclasses): it was timed anyway.

The "aliasing floor" (shapes 1-3) adds to the floor what any mover that keeps views aliased
and the container's type must pay at the least: one `untyped_storage()` per tensor into a set,
and the new dict. It shows how much of the gap to the floor is that price.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

import devicekit
from benchmarks._timing import format_table, interleaved_median_us

DEPTH = 50
META = torch.device("meta")


class Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    pair: Pair
    label: torch.Tensor
    name: str


def _tensor(i: int) -> torch.Tensor:
    return torch.full((4,), float(i))


def _nested() -> Any:
    value: Any = _tensor(0)
    for _ in range(DEPTH):
        value = {"child": value}
    return value


def _mixed() -> list[Any]:
    leaves: list[Any] = []
    for i in range(500):
        if i % 5 in (0, 1):
            leaves.append(_tensor(i))
        elif i % 5 == 2:
            leaves.append(f"text {i}")
        elif i % 5 == 3:
            leaves.append(i)
        else:
            leaves.append(np.full(4, i))
    return leaves


def _samples() -> list[Sample]:
    return [
        Sample(_tensor(i), Pair(_tensor(i + 1), _tensor(i + 2)), _tensor(i + 3), f"s{i}")
        for i in range(24)
    ]


#: The shapes of issue 4: name and a factory of the batch.
SHAPES: dict[str, Callable[[], Any]] = {
    "1. dict of 8 tensors": lambda: {f"t{i}": _tensor(i) for i in range(8)},
    "2. dict of 256 tensors": lambda: {f"t{i}": _tensor(i) for i in range(256)},
    "3. list of 10,000 tensors": lambda: [_tensor(i) for i in range(10_000)],
    f"4. tensor under {DEPTH} dicts": _nested,
    "5. 500 mixed leaves": _mixed,
    "6. 96 in namedtuples+dataclasses": _samples,
}


def _leaves(batch: Any) -> list[torch.Tensor]:
    """Every tensor in `batch`, flattened once, for the floor."""
    return [
        tensor
        for paths in devicekit.devices_of(batch).values()
        for tensor in _resolve_all(batch, paths)
    ]


def _resolve_all(batch: Any, paths: list[str]) -> list[torch.Tensor]:
    namespace = {"batch": batch}
    return [eval(path, {}, namespace) for path in paths]  # paths are devicekit's own


def _peers(device: torch.device) -> dict[str, Callable[[Any], Any]]:
    """Each peer's mover, as a user would call it; a missing package is left out."""
    peers: dict[str, Callable[[Any], Any]] = {}
    try:
        from accelerate.utils import send_to_device
    except ImportError:
        pass
    else:
        peers["accelerate"] = lambda batch: send_to_device(batch, device)
    try:
        from lightning_utilities.core.apply_func import apply_to_collection
    except ImportError:
        pass
    else:
        peers["lightning-utilities"] = lambda batch: apply_to_collection(
            batch, torch.Tensor, lambda t: t.to(device)
        )
    try:
        from lightning_fabric.utilities.apply_func import move_data_to_device
    except ImportError:
        pass
    else:
        peers["lightning-fabric"] = lambda batch: move_data_to_device(batch, device)
    try:
        import optree
    except ImportError:
        pass
    else:
        peers["optree"] = lambda batch: optree.tree_map(
            lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch
        )
    import torch.utils._pytree as pytree

    peers["torch pytree"] = lambda batch: pytree.tree_map(
        lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch
    )
    return peers


def _aliasing_floor(batch: Any, leaves: list[torch.Tensor], device: torch.device) -> Any:
    """For a flat dict or list: the floor plus what keeping aliasing and the container's type
    costs at the least (one storage per tensor into a set, and the new dict); else `None`."""
    storage = torch.Tensor.untyped_storage
    values = batch.values() if type(batch) is dict else batch
    if type(values) not in (list, type({}.values())) or any(
        type(value) is not torch.Tensor for value in values
    ):
        return None
    if type(batch) is dict:
        keys = list(batch)
        return lambda: (
            len(set(map(storage, leaves))) == len(leaves),
            dict(zip(keys, [t.to(device) for t in leaves])),  # noqa: B905 (strict= costs)
        )
    return lambda: (
        len(set(map(storage, leaves))) == len(leaves),
        [t.to(device) for t in leaves],
    )


def _moved_everything(result: Any, device: torch.device) -> bool:
    found = devicekit.devices_of(result)
    return set(found) <= {device}


def measure(repeat: int, targets: Sequence[str]) -> tuple[list[list[object]], list[str]]:
    """Rows of microseconds per call, and the peers' names, in column order."""
    rows: list[list[object]] = []
    names: list[str] = []
    for target_name in targets:
        device = torch.device(target_name)
        peers = _peers(device)
        checks = _peers(META)  # does the peer reach every tensor? (moving to meta tells)
        names = list(peers)
        for shape, make in SHAPES.items():
            batch = make()
            leaves = _leaves(batch)
            assert _moved_everything(devicekit.to_device(batch, META), META), shape
            functions: dict[str, Callable[[], object]] = {
                "devicekit": lambda b=batch, d=device: devicekit.to_device(b, d),
                "floor": lambda leaves=leaves, d=device: [t.to(d) for t in leaves],
            }
            aliasing = _aliasing_floor(batch, leaves, device)
            if aliasing is not None:
                functions["aliasing floor"] = aliasing
            for name, peer in peers.items():
                functions[name] = lambda peer=peer, batch=batch: peer(batch)
            timings = interleaved_median_us(functions, repeat=repeat)
            ours, floor = timings["devicekit"], timings["floor"]
            row: list[object] = [shape, target_name, ours, floor, ours / floor]
            if aliasing is None:
                row += ["-", "-"]
            else:
                row += [timings["aliasing floor"], ours / timings["aliasing floor"]]
            for name in peers:
                mark = "" if _moved_everything(checks[name](batch), META) else "*"
                row.append(f"{timings[name]:.2f}{mark}")
            rows.append(row)
    return rows, names


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--target", nargs="+", default=["cpu", "meta"])
    args = parser.parse_args(argv)
    rows, peers = measure(args.repeat, args.target)
    headers = [
        "shape",
        "to",
        "devicekit us",
        "floor us",
        "x floor",
        "aliasing floor us",
        "x aliasing floor",
        *(f"{p} us" for p in peers),
    ]
    print(format_table(headers, rows))
    print()
    ratio_rows = []
    for row in rows:
        ours = float(row[2])  # type: ignore[arg-type]
        ratios = [ours / float(str(cell).rstrip("*")) for cell in row[7:]]
        per_level = f"{ours / DEPTH:.3f} us/level" if row[0].startswith("4.") else ""  # type: ignore[union-attr]
        ratio_rows.append([row[0], row[1], *ratios, max(ratios), per_level])
    print("devicekit time / peer time (below 1: devicekit is faster)")
    print(format_table(["shape", "to", *peers, "worst", "shape 4"], ratio_rows))
    print("\n* this peer left some tensors where they were (it was timed anyway).")
    print(
        "aliasing floor (flat dicts and lists): the floor, plus one `untyped_storage()` per tensor"
        "\ninto a set (the least a mover that keeps views aliased must add) and the new dict."
    )


if __name__ == "__main__":
    main()
