"""The GPU check's dry run: a GPU is lent for minutes, once, so its one script must already work
end to end on a CPU (toy sizes, the same code paths) before the loan starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e  # its fedmoe run starts real Flower processes


def _rows(table: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell (the check), header and rule left out."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| check |"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_dry_run_fills_every_row_with_ok_or_a_reason_to_skip(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert table == result.stdout  # one table, to the file and to stdout
    assert "dry run" in table and "torch" in table
    rows = _rows(table)
    status = {check: cells[6] for check, cells in rows.items()}
    modes = ["transformers", "sparse", "sparse DP", "sparse int8 experts", "sparse nf4 experts"]
    others = [
        "routed experts, unquantized",
        "routed experts int8, ours",
        "routed experts NF4, ours",
        "routed experts int8, bitsandbytes",
        "routed experts NF4, bitsandbytes",
        "fedmoe run",
    ]
    for mode in modes:
        assert any(check.endswith(f"MoE block(s): {mode}") for check in rows), (mode, table)
    for what in others:
        assert any(what in check for check in rows), (what, table)
    assert len(rows) == len(modes) + len(others), table
    assert all(s == "ok" or s.startswith("skipped: ") for s in status.values()), table
    bnb = [s for check, s in status.items() if "bitsandbytes" in check]
    assert bnb == ["skipped: no CUDA"] * 2, table
    (run,) = [cells for check, cells in rows.items() if check.startswith("fedmoe run")]
    assert run[6] == "ok" and run[7].startswith("result: round 1"), table
    # The benchmarks measured something: a step time on every row that ran.
    assert all(cells[3] != "-" for cells in rows.values() if cells[6] == "ok"), table
