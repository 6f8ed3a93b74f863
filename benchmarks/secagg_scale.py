"""Round wall time and bytes on the wire with and without SecAgg+ at 3, 10 and 30 simulated
enterprises (the ratios measured in this one run), and the largest adapter that completes a
SecAgg+ round.

    python benchmarks/secagg_scale.py [--enterprises 3 10 30] [--rounds 3] [--local-steps 2]
                                      [--ranks 16 128 1024]

Every cell is a real `fedmoe run` on Flower's simulation engine over the first n enterprises of
the generated many-enterprise federation (demo:many/e00..), default run config otherwise (LoRA
r=16 on every group of the embedded base). The two modes of a size differ only in
`federation.secure_aggregation.enabled`. Bytes are those the coordinator's grid counted for the
round (coordinator/round/grid.py): every message of it in Flower's serialized form, each way, the budget
handshake, all SecAgg+ stages and federated evaluation included.

The largest adapter: one SecAgg+ round at 3 enterprises for each LoRA rank of `--ranks` (the
config allows up to 1024), and the largest object its masked vector crosses the wire as. Flower's
SecAgg+ mod would send it as one object, which protobuf caps at 2 GiB; packed by the node
(contract/secagg_transport.py), it travels in chunks like any adapter.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from fedmoe_run import run_in
from flwr.app import ConfigRecord, RecordDict
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from rich.console import Console
from rich.table import Table

from fedmoe.contract.secagg_transport import pack
from fedmoe.model.base import load_base
from fedmoe.model.corpus import generated_enterprises
from fedmoe.model.lora import attach_lora, get_adapter_vector

TARGETS = {"time": 1.5, "bytes": 1.3}  # SecAgg+ over plain, at 10 enterprises
MB = 1e6


def progress(text: str) -> None:
    print(f"[secagg_scale] {text}", flush=True)


def run_fedmoe(workdir: Path, enterprises: int, secagg: bool, rounds: int, **overrides) -> dict:
    names = generated_enterprises("many")[:enterprises]
    config, total, store = run_in(
        workdir,
        {
            "federation.enterprises": [{"name": n, "data": f"demo:many/{n}"} for n in names],
            "federation.rounds": rounds,
            "federation.secure_aggregation.enabled": secagg,
            **overrides,
        },
    )
    records = store.rounds(1)
    return {
        "total": total,
        "walls": [(r.ended_at - r.started_at).total_seconds() for r in records],
        "down": [r.bytes_down for r in records],
        "up": [r.bytes_up for r in records],
        "config": config,
    }


def later(values: list[float]) -> float:
    """The median of the rounds after the first (round 1 pays Ray's start and the imports)."""
    return statistics.median(values[1:] or values)


def adapter_size(config) -> int:
    return int(get_adapter_vector(attach_lora(load_base(config.model.path), config.lora)).size)


def largest_wire_object(elements: int) -> int:
    """The largest object, in bytes, that a masked vector of `elements` crosses the wire as, once
    the node packs it (contract/secagg_transport.py): Flower's own ConfigRecord would make it one
    object, and protobuf caps an object at 2 GiB."""
    vector = ndarray_to_bytes(np.zeros(elements, np.int64))
    configs = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(np.array([1])), vector]})
    content = RecordDict({RECORD_KEY_CONFIGS: configs})
    pack(content)
    return max(len(o.deflate()) for o in get_all_nested_objects(content).values())


def scale_table(results: dict, args) -> Table:
    table = Table(
        title=f"SecAgg+ vs plain, {args.rounds} rounds x {args.local_steps} local steps, "
        "simulation engine (same machine, same run)"
    )
    for col in (
        "enterprises", "mode", "round 1 s", "later rounds s (median)", "MB down / round",
        "MB up / round", "MB / round", "time vs plain", "bytes vs plain",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col == "mode" else "right")
    for n in args.enterprises:
        plain = results[n, False]
        for secagg in (False, True):
            r = results[n, secagg]
            ratio = ("1.00x", "1.00x")
            if secagg:
                ratio = (
                    f"{later(r['walls']) / later(plain['walls']):.2f}x",
                    f"{later(total_bytes(r)) / later(total_bytes(plain)):.2f}x",
                )
            table.add_row(
                str(n),
                "SecAgg+" if secagg else "plain",
                f"{r['walls'][0]:.2f}",
                f"{later(r['walls']):.2f}",
                f"{later(r['down']) / MB:.2f}",
                f"{later(r['up']) / MB:.2f}",
                f"{later(total_bytes(r)) / MB:.2f}",
                *ratio,
            )
    return table


def total_bytes(r: dict) -> list[int]:
    return [d + u for d, u in zip(r["down"], r["up"], strict=True)]


def verdict(results: dict, n: int) -> str:
    plain, secagg = results[n, False], results[n, True]
    time_ratio = later(secagg["walls"]) / later(plain["walls"])
    bytes_ratio = later(total_bytes(secagg)) / later(total_bytes(plain))
    parts = []
    for name, ratio in (("time", time_ratio), ("bytes", bytes_ratio)):
        met = "met" if ratio <= TARGETS[name] else "MISSED"
        parts.append(f"{name} {ratio:.2f}x (target <= {TARGETS[name]}x: {met})")
    return f"at {n} enterprises: " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enterprises", type=int, nargs="*", default=[3, 10, 30])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument(
        "--ranks", type=int, nargs="*", default=[16, 128, 1024], help="LoRA ranks to try"
    )
    args = parser.parse_args()
    if args.enterprises and not 2 <= min(args.enterprises) <= max(args.enterprises) <= 36:
        parser.error("--enterprises: 2 to 36 (the many-enterprise federation has 36)")
    console = Console(width=180)
    results, ladder = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.enterprises:
            for secagg in (False, True):
                mode = "SecAgg+" if secagg else "plain"
                progress(f"{n} enterprises, {mode}: {args.rounds} rounds ...")
                r = run_fedmoe(
                    tmp / f"{n}-{mode}", n, secagg, args.rounds,
                    **{"train.local_steps": args.local_steps},
                )  # fmt: skip
                results[n, secagg] = r
                progress(
                    f"{n} enterprises, {mode}: later rounds {later(r['walls']):.2f} s, "
                    f"{later(total_bytes(r)) / MB:.2f} MB per round ({r['total']:.0f} s in all)"
                )
        for rank in args.ranks:
            progress(f"largest adapter: LoRA r={rank}, one SecAgg+ round at 3 enterprises ...")
            try:
                r = run_fedmoe(
                    tmp / f"r{rank}", 3, True, 1, **{"train.local_steps": 1, "lora.r": rank}
                )
            except SystemExit as failed:
                ladder.append((rank, None, None, str(failed)))
                progress(f"r={rank}: FAILED ({failed})")
                break
            ladder.append((rank, adapter_size(r["config"]), r, None))
    if results:
        console.print(scale_table(results, args))
    if 10 in args.enterprises:
        console.print(verdict(results, 10))
    if ladder:
        table = Table(title="one SecAgg+ round at 3 enterprises, growing adapter (1 local step)")
        for col in ("LoRA r", "adapter params", "fp32 MB", "round s", "MB up", "completed"):
            table.add_column(col, justify="right")
        for rank, size, r, error in ladder:
            if r is None:
                table.add_row(str(rank), "-", "-", "-", "-", f"no: {error}")
                continue
            table.add_row(
                str(rank), f"{size / 1e6:.2f}M", f"{size * 4 / MB:.1f}", f"{r['walls'][0]:.2f}",
                f"{r['up'][0] / MB:.1f}", "yes",
            )  # fmt: skip
        console.print(table)
    if ladder and ladder[-1][1]:
        size = ladder[-1][1]
        console.print(
            f"The largest object a masked vector of {size / 1e6:.2f}M elements crosses the wire "
            f"as: {largest_wire_object(size) / MB:.2f} MB (Flower's own record would be one "
            f"object of {size * 8 / MB:.0f} MB, and protobuf caps an object at 2 GiB)"
        )


if __name__ == "__main__":
    main()
