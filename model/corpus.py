"""Our own synthetic, license-clean text: the pretraining corpus and the demo federation.

Every sentence comes from templates written for this project, filled from small word lists with
a seeded RNG, so `fedmoe build-demo-data` and `fedmoe pretrain` reproduce the shipped files.
Four domains: a general one (customer service and everyday notes) for pretraining the base, and
three enterprise domains with clearly different vocabulary for the demo federation.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from fedmoe.model.data import dirichlet_partition

COMPANIES = [
    "Alder Capital",
    "Birchway Bank",
    "Cobalt Insurance",
    "Dunmore Trust",
    "Elmfield Credit",
    "Fairport Holdings",
]
SECTORS = [
    "commercial real estate",
    "energy",
    "retail lending",
    "sovereign debt",
    "technology",
    "shipping",
]
RATINGS = ["AA", "A+", "A", "BBB+", "BBB", "BB", "B+"]
ACTIONS = [
    "reduce exposure",
    "hold the position",
    "increase collateral",
    "escalate to the credit committee",
    "hedge with swaps",
]
SYMPTOMS = [
    "chest pain",
    "shortness of breath",
    "persistent cough",
    "abdominal pain",
    "fever and chills",
    "dizziness",
    "lower back pain",
]
DIAGNOSES = [
    "community acquired pneumonia",
    "stable angina",
    "acute bronchitis",
    "gastritis",
    "viral infection",
    "muscle strain",
    "dehydration",
]
PLANS = [
    "start oral antibiotics",
    "order an ECG and troponin",
    "rest and fluids",
    "prescribe a proton pump inhibitor",
    "refer to physiotherapy",
    "follow up in two weeks",
]
DEFECTS = [
    "surface scratch",
    "misaligned bracket",
    "porosity in the weld",
    "burr on the edge",
    "wrong torque",
    "cracked housing",
    "paint run",
]
DISPOSITIONS = ["released", "rework", "scrap", "quarantine for review", "use as is after sign-off"]
STATIONS = ["press", "weld cell", "paint booth", "final assembly", "CNC mill", "inspection bench"]
PRODUCTS = [
    "a router",
    "a coffee grinder",
    "a laptop charger",
    "running shoes",
    "a desk lamp",
    "a phone case",
    "a backpack",
]
ISSUES = [
    "arrived damaged",
    "stopped working after a week",
    "is missing a part",
    "was the wrong size",
    "was charged twice",
    "has not shipped yet",
]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Perth", "Quebec", "Tunis"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun"]


def _finance(rng: random.Random) -> dict:
    c, s = rng.choice(COMPANIES), rng.choice(SECTORS)
    pct, q = rng.randint(2, 35), rng.choice(["Q1", "Q2", "Q3", "Q4"])
    text = rng.choice(
        [
            f"Risk note: {c} exposure to {s} rose {pct}% in {q}. Counterparty rating {rng.choice(RATINGS)}. Recommendation: {rng.choice(ACTIONS)}.",
            f"Credit review for {c}: loan book in {s} is {rng.randint(40, 900)} million with {pct}% in watch list. Liquidity ratio {rng.randint(90, 180)}%. Action: {rng.choice(ACTIONS)}.",
            f"Market risk {q}: value at risk for the {s} desk at {rng.randint(1, 20)} million, stress loss {rng.randint(20, 90)} million. {c} should {rng.choice(ACTIONS)}.",
        ]
    )
    return {"text": text, "domain": "finance"}


def _clinical(rng: random.Random) -> dict:
    age, sex = rng.randint(18, 90), rng.choice(["male", "female"])
    sym, dx, plan = rng.choice(SYMPTOMS), rng.choice(DIAGNOSES), rng.choice(PLANS)
    days = rng.randint(1, 14)
    note = f"{age} year old {sex} with {sym} for {days} days. BP {rng.randint(100, 170)}/{rng.randint(60, 100)}, HR {rng.randint(55, 120)}, temp {rng.randint(365, 395) / 10} C."
    return {
        "instruction": f"Summarize the clinical report and give the plan. Report: {note}",
        "response": f"Assessment: likely {dx}. Plan: {plan}.",
        "domain": "clinical",
    }


def _manufacturing(rng: random.Random) -> dict:
    line, lot = rng.randint(1, 9), rng.randint(1000, 9999)
    n, d = rng.randint(50, 500), rng.randint(0, 12)
    text = rng.choice(
        [
            f"QC log line {line} lot {lot}: inspected {n} units, {d} defects ({rng.choice(DEFECTS)}) at the {rng.choice(STATIONS)}. Disposition: {rng.choice(DISPOSITIONS)}.",
            f"Shift report line {line}: torque {rng.randint(8, 40)} Nm, cycle time {rng.randint(20, 90)} s, scrap rate {d / n:.1%}. Lot {lot} {rng.choice(DISPOSITIONS)}.",
            f"Nonconformance {lot}: {rng.choice(DEFECTS)} found on line {line} at the {rng.choice(STATIONS)}. Root cause under review; lot set to {rng.choice(DISPOSITIONS)}.",
        ]
    )
    return {"text": text, "domain": "manufacturing"}


def _general(rng: random.Random) -> dict:
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    text = rng.choice(
        [
            f"Customer: Hello, my order of {rng.choice(PRODUCTS)} {rng.choice(ISSUES)}. Agent: Sorry to hear that, {name}. I can send a replacement or refund you today.",
            f"The weather in {city} is {rng.choice(WEATHER)} today with a high of {rng.randint(-5, 35)} degrees. Tomorrow will be {rng.choice(WEATHER)}.",
            f"{name} travelled from {city} to {rng.choice(CITIES)} by train. The trip took {rng.randint(2, 12)} hours and the coffee was {rng.choice(['good', 'cold', 'strong', 'fine'])}.",
            f"Meeting notes: {name} will send the report by {rng.choice(['Monday', 'Tuesday', 'Friday'])}. The team agreed to review the numbers and plan the next steps.",
            f"Support ticket {rng.randint(100, 999)}: {rng.choice(PRODUCTS)} {rng.choice(ISSUES)}. Status: {rng.choice(['open', 'resolved', 'waiting for customer'])}.",
        ]
    )
    return {"text": text, "domain": "general"}


DOMAINS = {
    "general": _general,
    "finance": _finance,
    "clinical": _clinical,
    "manufacturing": _manufacturing,
}
DEMO_ENTERPRISES = ("finance", "clinical", "manufacturing")
DEMO_DATA_DIR = Path(__file__).parent / "assets" / "demo"


def generate(domain: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(f"{domain}:{seed}")
    return [DOMAINS[domain](rng) for _ in range(count)]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def build_demo_federation(
    root: Path, train: int = 400, heldout: int = 80, public_eval: int = 60
) -> None:
    """One folder per enterprise with train.jsonl and heldout.jsonl, plus a public eval set."""
    for i, domain in enumerate(DEMO_ENTERPRISES):
        records = generate(domain, train + heldout, seed=i)
        write_jsonl(records[:train], root / domain / "train.jsonl")
        write_jsonl(records[train:], root / domain / "heldout.jsonl")
    mixed = [
        r
        for d in DEMO_ENTERPRISES
        for r in generate(d, public_eval // len(DEMO_ENTERPRISES), seed=1000)
    ]
    write_jsonl(mixed, root / "public_eval.jsonl")


# Generated federations, too large to ship (record-level DP needs tens of thousands of records
# per enterprise; enterprise-level DP needs many enterprises): built on first use, in seconds.
GENERATED = {
    "large": "3 enterprises (the demo's domains), 30,000 training records each",
    "many": "36 enterprises, a non-IID split of the three domains (Dirichlet 0.3), ~1,000 records each",
}
LARGE_RECORDS, MANY_ENTERPRISES, MANY_RECORDS = 30_000, 36, 36_000
HELDOUT_SHARE = 0.05


def generated_data_home() -> Path:
    return Path(
        os.environ.get("FEDMOE_DEMO_DATA") or Path.home() / ".cache" / "fedmoe" / "demo-data"
    )


def generated_enterprises(federation: str) -> list[str]:
    if federation == "large":
        return list(DEMO_ENTERPRISES)
    return [f"e{i:02d}" for i in range(MANY_ENTERPRISES)]


DEMO_SCHEME = "demo:"


def resolve_generated(spec: str) -> Path | None:
    """The folder a `demo:<federation>/<enterprise>` data value names, built on first use; None
    for any other value (a path). Raises ValueError naming what exists."""
    if not spec.startswith(DEMO_SCHEME):
        return None
    federation, _, name = spec[len(DEMO_SCHEME) :].partition("/")
    if federation not in GENERATED:
        raise ValueError(
            f"unknown demo federation {federation!r} in {spec!r}; one of {sorted(GENERATED)}"
        )
    names = generated_enterprises(federation)
    if name not in names:
        raise ValueError(
            f"{spec!r}: the {federation} demo federation has enterprises {names[0]}..{names[-1]}"
            if len(names) > 3
            else f"{spec!r}: the {federation} demo federation has enterprises {names}"
        )
    return build_generated_federation(federation, generated_data_home()) / name


def _split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    cut = len(records) - max(1, round(len(records) * HELDOUT_SHARE))
    return records[:cut], records[cut:]


def build_generated_federation(federation: str, root: Path) -> Path:
    """Write `federation` (a key of GENERATED) under root/federation, once: a finished build is a
    folder renamed into place, so concurrent first uses never see half a federation."""
    if federation not in GENERATED:
        raise ValueError(f"unknown demo federation {federation!r}; one of {sorted(GENERATED)}")
    target = root / federation
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{federation}-") as tmp:
        parts: dict[str, list[dict]] = {}
        if federation == "large":
            for i, domain in enumerate(DEMO_ENTERPRISES):
                parts[domain] = generate(domain, LARGE_RECORDS, seed=100 + i)
        else:
            pool = [
                r
                for i, d in enumerate(DEMO_ENTERPRISES)
                for r in generate(d, MANY_RECORDS // len(DEMO_ENTERPRISES), seed=200 + i)
            ]
            split = dirichlet_partition([r["domain"] for r in pool], MANY_ENTERPRISES, 0.3, seed=0)
            for name, idx in zip(generated_enterprises(federation), split, strict=True):
                parts[name] = [pool[j] for j in random.Random(name).sample(idx, len(idx))]
        for name, records in parts.items():
            train, heldout = _split(records)
            write_jsonl(train, Path(tmp) / name / "train.jsonl")
            write_jsonl(heldout, Path(tmp) / name / "heldout.jsonl")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its files are the same
            if not target.is_dir():
                raise
        else:
            os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    return target
