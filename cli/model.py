"""Commands that build what ships in the repo: the embedded base model and the demo data."""

from __future__ import annotations

from pathlib import Path

from fedmoe.cli.common import UsageError, console, fraction, positive_float, positive_int


def cmd_pretrain(args) -> int:
    from fedmoe.model.base import EMBEDDED_BASE_DIR
    from fedmoe.model.pretrain import pretrain

    pretrain(Path(args.out) if args.out else EMBEDDED_BASE_DIR, steps=args.steps, log=console.print)
    return 0


def cmd_build_demo_data(args) -> int:
    from fedmoe.model import corpus

    if args.federation == "small":
        out = Path(args.out) if args.out else corpus.DEMO_DATA_DIR
        corpus.build_demo_federation(out)
    else:
        root = Path(args.out) if args.out else corpus.generated_data_home()
        out = corpus.build_generated_federation(args.federation, root)
    console.print(f"the {args.federation} demo federation is in {out}")
    return 0


def cmd_split(args) -> int:
    from fedmoe.model.corpus import write_jsonl
    from fedmoe.model.data import dirichlet_partition, read_records

    records = read_records(Path(args.input))
    missing = [i for i, r in enumerate(records) if args.label not in r]
    if missing:
        raise UsageError(f"--label {args.label!r} missing in record {missing[0]} of {args.input}")
    parts = dirichlet_partition(
        [str(r[args.label]) for r in records], args.clients, args.alpha, args.seed
    )
    for i, idx in enumerate(parts):
        chosen = [records[j] for j in idx]
        cut = max(1, int(len(chosen) * (1 - args.heldout))) if chosen else 0
        write_jsonl(chosen[:cut], Path(args.out) / f"enterprise-{i}" / "train.jsonl")
        write_jsonl(chosen[cut:], Path(args.out) / f"enterprise-{i}" / "heldout.jsonl")
        console.print(f"enterprise-{i}: {len(chosen)} records")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="rebuild the embedded base model and tokenizer from our corpus"
    )
    p.add_argument("--out", help="output directory (default: the embedded base inside the package)")
    p.add_argument("--steps", type=positive_int, default=1500)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "build-demo-data",
        help="regenerate the demo federation's data files, or build a larger one",
    )
    p.add_argument(
        "--federation",
        choices=("small", "large", "many"),
        default="small",
        help="small: the bundled 3 x 400 records; large: 3 x 30,000 (record-level DP); many: "
        "36 non-IID enterprises (enterprise-level DP). Runs build large and many on first use "
        '(data = "demo:large/finance")',
    )
    p.add_argument(
        "--out",
        help="output directory (default: the bundled demo data; for large and many "
        "$FEDMOE_DEMO_DATA or ~/.cache/fedmoe/demo-data)",
    )
    p.set_defaults(func=cmd_build_demo_data)

    p = sub.add_parser(
        "split", help="split one dataset into N non-IID enterprises (Dirichlet over a label)"
    )
    p.add_argument("input", help="JSONL/CSV/Parquet file")
    p.add_argument("--label", required=True, help="record field to split on, e.g. domain")
    p.add_argument("--clients", type=positive_int, required=True)
    p.add_argument(
        "--alpha",
        type=positive_float,
        default=0.5,
        help="Dirichlet concentration; smaller is more skewed",
    )
    p.add_argument(
        "--heldout", type=fraction, default=0.2, help="share of each enterprise's records held out"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_split)
