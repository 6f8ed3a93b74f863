"""Round wall time and bytes on the wire with and without SecAgg+ at 3, 10 and 30 simulated
enterprises (the ratios measured in this one run), and the largest adapter that completes a
SecAgg+ round.

    python benchmarks/secagg_scale.py [--enterprises 3 10 30] [--rounds 3] [--local-steps 2]
                                      [--ranks 16 128 1024] [--check-limit]

Every cell is a real `fedmoe run` on Flower's simulation engine over the first n enterprises of
the generated many-enterprise federation (demo:many/e00..), default run config otherwise (LoRA
r=16 on every group of the embedded base). The two modes of a size differ only in
`federation.secure_aggregation.enabled`. Bytes are those the coordinator's grid counted for the
round (coordinator/grid.py): every message of it in Flower's serialized form, each way, the budget
handshake, all SecAgg+ stages and federated evaluation included.

The largest adapter: one SecAgg+ round at 3 enterprises for each LoRA rank of `--ranks` (the
config allows up to 1024), then the limit that no rank can pass, computed from Flower's source:
a node's masked vector travels as one serialized object, and no object may exceed 2 GiB.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from fedmoe_run import run_in
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH
from rich.console import Console
from rich.table import Table

from fedmoe.model.base import load_base
from fedmoe.model.corpus import generated_enterprises
from fedmoe.model.lora import attach_lora, get_adapter_vector
from fedmoe.support.secagg_wire import narrow_to_bytes

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


def masked_record_bytes(elements: int) -> int:
    """The serialized size of the record a SecAgg+ node sends its masked update in (Flower 1.41's
    secaggplus_mod: one ConfigRecord of `np.save` bytes, the weight factor then the vector, uint32
    under support/secagg_wire.py)."""
    vector = np.zeros(elements, np.int64)
    masked = [narrow_to_bytes(np.array([1])), narrow_to_bytes(vector)]
    return len(ConfigRecord({Key.MASKED_PARAMETERS: masked}).deflate())


def masked_vector_limit() -> int:
    """The most adapter elements a SecAgg+ node can send. Its masked update is one object on the
    wire (a plain round's arrays are cut into 5 MB chunks, this record is not), and protobuf cannot
    serialize a message over 2 GiB - 1, which is also the gRPC max message length Flower sets."""
    overhead = masked_record_bytes(1024) - 4 * 1024
    # + 1 KB: longer length prefixes near 2 GiB, and the request the object travels in
    return (GRPC_MAX_MESSAGE_LENGTH - overhead - 1024) // 4


def check_limit(limit: int) -> None:
    """Serialize the masked record at the limit and just past it (needs about 10 GB of memory)."""
    for elements in (limit, limit + 1000):
        try:
            size = f"{masked_record_bytes(elements):,} bytes"
        except Exception as err:  # noqa: BLE001 - whatever protobuf raises is the finding
            size = f"failed: {type(err).__name__}: {err}"
        progress(f"masked record of {elements:,} elements: {size}")


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
    parser.add_argument(
        "--check-limit",
        action="store_true",
        help="serialize a masked update at the computed limit and past it (about 10 GB of memory)",
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
    limit = masked_vector_limit()
    console.print(
        "Computed from Flower's source, not measured in a round: a SecAgg+ node's masked vector "
        f"(4 bytes per element) must fit one {GRPC_MAX_MESSAGE_LENGTH:,}-byte object, so the "
        f"adapter can have at most about {limit / 1e6:.1f}M parameters ({limit * 4 / 1e9:.2f} GB "
        "as fp32)"
    )
    if args.check_limit:
        check_limit(limit)


if __name__ == "__main__":
    main()
