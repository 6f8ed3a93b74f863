"""The checks that need a GPU, in one run that fits a short loan of one (under 8 minutes).

    bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]

Development machines have no GPU, and a lent one comes for minutes, once: every CUDA-only claim
of the project is measured by this one script, prepared and smoke-tested on a CPU beforehand
(`--dry-run`, which tests/test_gpu_check.py runs). It writes one markdown table, a row a check:

1. MoE blocks at DeepSeek-V2-Lite's shapes in bf16 (benchmarks/moe_scale.py): transformers' own
   experts, our sparse expert LoRA, its DP-SGD step, and it over int8 and NF4 experts; time
   between `torch.cuda.synchronize()` calls, memory the allocator's peak above what the step
   started with.
2. Quantized routed experts, one V2-Lite layer's 64 experts alone: ours (model/quantize.py, int8
   and NF4) against bitsandbytes' Linear8bitLt and Linear4bit (nf4), one Linear per expert, the
   same tokens routed alike; forward and backward to the input, as under LoRA. bitsandbytes
   quantizes `nn.Linear` only, not transformers' fused 3-D experts: this is the comparable part.
3. `fedmoe run`, 2 rounds, the embedded base and the demo federation, with its clients on CUDA.
   Each simulated client reserves a quarter of the GPU (`federation.gpus_per_client`; Ray hides
   the GPU from a client that reserves none) and picks CUDA when it sees it (`device = "auto"`);
   that the clients used the GPU is checked, by the device's memory rising during the run.

Each benchmark runs in a child process of its own (its own peak memory; a CUDA error cannot
poison the next). A check that fails or times out becomes a `failed` row and the others go on;
the exit status is 1 if any check that was not skipped failed. `--dry-run` runs the same checks
on the CPU at toy sizes, the benchmarks in one child (imports dominate there) alongside the run;
rows that need CUDA say `skipped: no CUDA`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = "GPU_CHECK_RESULT "  # how a child prints a check's outcome, one JSON per line

MOE_MODES = [
    # (mode, what it is compared with)
    ("transformers", None),
    ("sparse", "transformers"),
    ("sparse DP", "sparse"),
    ("sparse int8 experts", "sparse"),
    ("sparse nf4 experts", "sparse"),
    # "dense" is left out: in bf16 it fails (its LoRA einsums mix the bf16 base's activations
    # with the float32 factors), and it is a test reference only, used by no client.
]
EXPERT_KINDS = [
    ("experts", None),
    ("ours int8", "experts"),
    ("ours nf4", "experts"),
    ("bnb int8", "ours int8"),
    ("bnb nf4", "ours nf4"),
]
EXPERT_LABELS = {
    "experts": "routed experts, unquantized (ours, sparse)",
    "ours int8": "routed experts int8, ours (model/quantize.py)",
    "ours nf4": "routed experts NF4, ours (model/quantize.py)",
    "bnb int8": "routed experts int8, bitsandbytes Linear8bitLt",
    "bnb nf4": "routed experts NF4, bitsandbytes Linear4bit",
}


@dataclass(frozen=True)
class Sizes:
    """What one invocation measures at: the real shapes on a GPU, toy ones in a dry run."""

    device: str
    dtype: str
    toy: bool
    layers: int
    batch: int
    seq_len: int
    steps: int
    deadline_s: float  # every check, the run included
    run_reserve_s: float  # kept for the run while the benchmarks go

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


FULL = Sizes("cuda", "bfloat16", False, 1, 8, 512, 5, deadline_s=450, run_reserve_s=180)
# About a minute on an idle 2-core machine; the deadline only guards against a hang.
DRY = Sizes("cpu", "bfloat16", True, 2, 2, 16, 1, deadline_s=240, run_reserve_s=0)


@dataclass
class Row:
    what: str
    device: str
    dtype: str
    step: str = "-"
    memory: str = "-"
    ratio: str = "-"
    status: str = "ok"
    notes: str = ""
    key: str = ""
    baseline: str | None = None
    result: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


# ---- the children: one benchmark each (or all of them, in a dry run) ----


class Skipped(Exception):
    """A check that cannot run here, with the reason."""


def expert_step(kind: str, sizes: Sizes) -> dict:
    """One V2-Lite layer's routed experts (or a toy layer's), stored as `kind`: forward and
    backward to the input over the same routed tokens; median step, weights and peak memory."""
    import torch
    import torch.nn.functional as F

    from fedmoe.model.expert_lora import group_by_expert, routed_experts_forward
    from fedmoe.model.quantize import quantize

    hidden, width, experts, top_k = (64, 32, 8, 2) if sizes.toy else (2048, 1408, 64, 6)
    device, dtype = torch.device(sizes.device), getattr(torch, sizes.dtype)
    on_gpu = device.type == "cuda"
    if kind.startswith("bnb"):
        if not on_gpu:
            raise Skipped("no CUDA")
        try:
            import bitsandbytes as bnb
        except (ImportError, OSError, RuntimeError) as err:
            raise Skipped(f"bitsandbytes does not import ({type(err).__name__})") from None
    torch.set_num_threads(2)

    def allocated() -> int:
        return torch.cuda.memory_allocated() if on_gpu else 0

    start = allocated()
    g = torch.Generator(device).manual_seed(0)
    gate_up = torch.randn(experts, 2 * width, hidden, generator=g, device=device) * 0.02
    down = torch.randn(experts, hidden, width, generator=g, device=device) * 0.02
    gate_up, down = gate_up.to(dtype), down.to(dtype)
    held: list[torch.Tensor] = [gate_up, down]
    if kind.startswith("ours"):
        scheme = kind.split()[1]
        gate_up, down = quantize(gate_up, scheme), quantize(down, scheme)
        held = [gate_up.values, gate_up.scales, down.values, down.scales]
    elif kind.startswith("bnb"):
        # bitsandbytes quantizes what it finds on the CPU as it moves it to the GPU.
        cpu_gate_up, cpu_down = gate_up.cpu(), down.cpu()
        gate_up = down = None
        held = []

        def linear(weight: torch.Tensor):
            out, inputs = weight.shape
            if kind == "bnb int8":
                module = bnb.nn.Linear8bitLt(inputs, out, bias=False, has_fp16_weights=False)
            else:
                module = bnb.nn.Linear4bit(
                    inputs, out, bias=False, compute_dtype=dtype, compress_statistics=False,
                    quant_type="nf4",
                )  # fmt: skip
            module.load_state_dict({"weight": weight})
            return module.to(device)

        gate_up_mods = [linear(w) for w in cpu_gate_up.unbind(0)]
        down_mods = [linear(w) for w in cpu_down.unbind(0)]
    if on_gpu:
        torch.cuda.synchronize()
    weights = allocated() - start if on_gpu else sum(t.numel() * t.element_size() for t in held)

    def bnb_forward(x, top_k_index, top_k_weights):
        """routed_experts_forward's grouping, each expert an nn.Linear of bitsandbytes."""
        groups = group_by_expert(top_k_index, top_k_weights, experts)
        outs = []
        for e, rows in enumerate(x[groups.token].split(groups.counts)):
            if len(rows):
                gate, up = gate_up_mods[e](rows).chunk(2, dim=-1)
                outs.append(down_mods[e](F.silu(gate) * up))
        # Linear8bitLt may hand back float16 (it multiplies in it); the sum is in x's dtype.
        out = torch.cat(outs).to(x.dtype) * groups.weight.to(x.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, groups.token, out)

    def forward(x, top_k_index, top_k_weights):
        if kind.startswith("bnb"):
            return bnb_forward(x, top_k_index, top_k_weights)
        return routed_experts_forward(x, top_k_index, top_k_weights, gate_up, down, F.silu)

    tokens = sizes.tokens
    x = torch.randn(tokens, hidden, generator=g, device=device).to(dtype).requires_grad_()
    target = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    logits = torch.randn(tokens, experts, generator=g, device=device)
    top_k_weights, top_k_index = logits.softmax(dim=-1).topk(top_k, dim=-1)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(sizes.steps + 1):  # the first warms up kernels and caches
        x.grad = None
        if on_gpu:
            torch.cuda.synchronize()
        began = time.perf_counter()
        (forward(x, top_k_index, top_k_weights) * target).mean().backward()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return {
        "step_s": statistics.median(times[1:]),
        "weights_mb": weights / 2**20,
        # The peak of the layer's experts: weights plus the step's activations.
        "mem_mb": (torch.cuda.max_memory_allocated() - start) / 2**20 if on_gpu else None,
    }


def moe_step(mode: str, sizes: Sizes) -> dict:
    from moe_scale import measure

    return measure(
        mode, sizes.layers, sizes.batch, sizes.seq_len, sizes.steps,
        sizes.device, sizes.dtype, sizes.toy, dp_step="optimizer",
    )  # fmt: skip


def child(specs: list[dict]) -> None:
    """Run `specs` in this process, printing each one's outcome as it ends."""
    for spec in specs:
        sizes = Sizes(**spec["sizes"])
        try:
            if spec["kind"] == "moe":
                out = {"result": moe_step(spec["name"], sizes)}
            else:
                out = {"result": expert_step(spec["name"], sizes)}
        except Skipped as reason:
            out = {"skipped": str(reason)}
        except Exception as err:  # noqa: BLE001 - any failure is this check's row, not the run's
            out = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            traceback.print_exc()
        print(RESULT + json.dumps({"key": spec["key"], **out}), flush=True)


# ---- the parent: what runs where, the run, the table ----


def rows_to_run(sizes: Sizes) -> list[Row]:
    where = "CPU" if sizes.device == "cpu" else sizes.device
    shape = "toy" if sizes.toy else "V2-Lite"
    rows = []
    for group, checks in (("moe", MOE_MODES), ("experts", EXPERT_KINDS)):
        for name, baseline in checks:
            what = (
                f"{sizes.layers} {shape} MoE block(s): {name}"
                if group == "moe"
                else f"{shape} layer's {EXPERT_LABELS[name]}"
            )
            key, base = f"{group}:{name}", baseline and f"{group}:{baseline}"
            rows.append(Row(what, where, sizes.dtype, key=key, baseline=base))
    return rows


def spec_of(row: Row, sizes: Sizes) -> dict:
    kind, name = row.key.split(":", 1)
    return {"key": row.key, "kind": kind, "name": name, "sizes": sizes.__dict__}


def precheck(row: Row, sizes: Sizes) -> str | None:
    """Why `row` is skipped before any child starts, if it is."""
    if row.key.startswith("experts:bnb"):
        if sizes.device == "cpu":
            return "no CUDA"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes not installed"
    return None


def run_children(groups: list[list[Row]], sizes: Sizes, started: float, log) -> None:
    """Each group of rows in one child process, one group after another."""
    for group in groups:
        left = started + sizes.deadline_s - sizes.run_reserve_s - time.monotonic()
        if left < 10:
            for row in group:
                row.status = "skipped: out of time"
            continue
        timeout = left if sizes.toy else min(left, 150.0)  # one hung child leaves time to others
        specs = [spec_of(row, sizes) for row in group]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(specs)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
            stdout, stderr, why = proc.stdout, proc.stderr, f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired as err:
            stdout, stderr = _text(err.stdout), _text(err.stderr)
            why = f"timed out after {timeout:.0f} s"
        outcomes = {}
        for line in stdout.splitlines():
            if line.startswith(RESULT):
                outcome = json.loads(line[len(RESULT) :])
                outcomes[outcome["key"]] = outcome
        for row in group:
            outcome = outcomes.get(row.key)
            if outcome is None:
                row.status = f"failed: {why}"
            elif "skipped" in outcome:
                row.status = f"skipped: {outcome['skipped']}"
            elif "error" in outcome:
                row.status = f"failed: {outcome['error']}"
            else:
                row.result = outcome["result"]
            _progress(row)
        if any(row.failed for row in group):
            log.write(f"## {', '.join(r.key for r in group)}\n$ {' '.join(cmd)}\n")
            log.write(stderr[-6000:] + "\n")


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _progress(row: Row) -> None:
    shown = f"{row.result.get('step_s', 0):.3f} s" if row.result else row.status
    print(f"[gpu_check] {row.key}: {shown}", file=sys.stderr, flush=True)


class DeviceMemory:
    """The GPU's used memory (all processes), sampled while the run goes: its clients run in
    Ray's processes, whose allocators this process cannot read."""

    def __init__(self):
        import torch

        self.torch = torch
        self.before = self._used()
        self.peak = self.before
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _sample(self) -> None:
        while not self.done.wait(0.5):
            self.peak = max(self.peak, self._used())

    def stop(self) -> int:
        """Bytes by which the device's used memory rose at its peak."""
        self.done.set()
        self.thread.join()
        return self.peak - self.before


@dataclass
class Run:
    row: Row
    proc: subprocess.Popen
    output: Path
    started: float
    memory: DeviceMemory | None


def start_run(workdir: Path, sizes: Sizes) -> Run:
    """`fedmoe run` of the embedded base: 2 rounds of the demo federation on the GPU, or a
    smallest run on the CPU (one enterprise, one round of one step)."""
    if sizes.toy:
        from fedmoe.model.corpus import DEMO_DATA_DIR

        finance = json.dumps(str(DEMO_DATA_DIR / "finance"))
        plan = [
            "[federation]",
            "rounds = 1",
            f'enterprises = [{{name = "finance", data = {finance}}}]',
            "[train]",
            "local_steps = 1",
            "batch_size = 2",
            "[evaluation]",
            'server_data = ""',
        ]
        what = "fedmoe run: 1 round, 1 enterprise, 1 local step"
        env = {"CUDA_VISIBLE_DEVICES": ""}  # the clients' "auto" device: the CPU
    else:
        plan = ["[federation]", "rounds = 2", "gpus_per_client = 0.25"]
        what = "fedmoe run: 2 rounds, 3 demo enterprises, embedded base"
        env = {}
    database = json.dumps(f"sqlite:///{workdir / 'runs.db'}")
    config = workdir / "run.toml"
    output_dir = json.dumps(str(workdir / "out"))  # a JSON string is a TOML basic string
    plan += ["[database]", f"url = {database}", "[output]", f"dir = {output_dir}"]
    config.write_text("\n".join(plan) + "\n")
    where = "CPU" if sizes.device == "cpu" else "cuda (clients)"
    dtype = "float32" if sizes.device == "cpu" else "float32, bf16 autocast"
    row = Row(what, where, dtype, key="run")
    memory = DeviceMemory() if sizes.device != "cpu" else None
    output = workdir / "run.out"
    with output.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmoe.cli", "run", "--config", str(config)],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
            start_new_session=True,  # its Flower and Ray processes end with its group
        )
    return Run(row, proc, output, time.monotonic(), memory)


def launch(workdir: Path, sizes: Sizes) -> Run | Row:
    """The run started, or its row saying why it could not start."""
    try:
        return start_run(workdir, sizes)
    except Exception as err:  # noqa: BLE001 - the other checks' rows still get written
        status = f"failed: cannot start: {type(err).__name__}: {str(err)[:200]}"
        return Row("fedmoe run", sizes.device, "-", status=status, key="run")


def finish_run(run: Run, timeout: float, log) -> Row:
    row, proc = run.row, run.proc
    try:
        proc.wait(timeout=max(timeout, 1.0))
        why = f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        why = f"timed out after {time.monotonic() - run.started:.0f} s"
        _stop(proc)
    seconds = time.monotonic() - run.started
    rose = run.memory.stop() if run.memory else None
    text = run.output.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("[fedmoe]")]
    found = (re.search(r"\] run \d+ result: (.*)", line) for line in lines)
    result = next((m.group(1) for m in found if m), None)
    row.step = f"{seconds:.0f} s (whole run)"
    row.notes = f"result: {result}" if result else (lines[-1] if lines else "no output")
    if rose is not None:
        row.memory = f"{rose / 2**20:.0f} MB (device, all clients)"
    if proc.returncode != 0 or result is None:
        row.status = f"failed: {why}"
    elif rose is not None and rose < 256 * 2**20:
        row.status = "failed: the clients did not use the GPU (its memory did not rise)"
    _progress(row)
    if row.failed:
        log.write(f"## run\n{text[-6000:]}\n")
    return row


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's group (the launcher then stops Flower), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def fill_in(rows: list[Row]) -> None:
    """Step time, memory and the ratio to each row's baseline, from the children's results."""
    by_key = {row.key: row for row in rows}
    for row in rows:
        r = row.result
        if not r or row.key == "run":
            continue
        row.step = _seconds(r["step_s"])
        notes = [f"weights {r['weights_mb']:.1f} MB"]
        if row.key.startswith("moe:"):
            row.memory = f"{r['mem_mb']:.1f} MB (step)"
            notes.append(f"experts: {r['implementation']}")
            if row.key == "moe:transformers":
                notes.append("no LoRA")
        elif r.get("mem_mb") is not None:
            row.memory = f"{r['mem_mb']:.1f} MB (weights + step)"
        row.notes = ", ".join(notes)
        base = by_key.get(row.baseline or "")
        if base is not None and base.result:
            b = base.result
            what = "weights" if row.key.startswith("experts:") else "mem"
            memory = _ratio(r, b, "weights_mb" if what == "weights" else "mem_mb")
            time_ratio = _ratio(r, b, "step_s")
            row.ratio = f"vs {base.key.split(':', 1)[1]}: time {time_ratio}, {what} {memory}"
        elif row.baseline:
            row.ratio = f"vs {row.baseline.split(':', 1)[1]}: -"


def _ratio(result: dict, baseline: dict, key: str) -> str:
    """result[key] / baseline[key], or "-" (a toy step's memory can round to nothing)."""
    if not baseline.get(key) or result.get(key) is None:
        return "-"
    return f"{result[key] / baseline[key]:.2f}x"


def _seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def header(sizes: Sizes) -> list[str]:
    import torch

    versions = [f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        versions.append(f"CUDA {torch.version.cuda}")
        device = f"{device} ({memory:.0f} GiB)"
    else:
        device = "no CUDA device"
    for package in ("transformers", "bitsandbytes"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    run = "dry run: CPU, toy sizes" if sizes.toy else "full"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"## fedmoe GPU check ({run}), {when}",
        "",
        f"GPU: {device}; {', '.join(versions)}; {os.cpu_count()} CPUs.",
        f"Benchmarks: {sizes.batch} x {sizes.seq_len} tokens, median of {sizes.steps} step(s) "
        "after one warm-up, forward + backward; MoE blocks with LoRA r=8 on their experts "
        "(transformers' without), expert layers without LoRA.",
        "",
    ]


def table(rows: list[Row]) -> list[str]:
    out = [
        "| check | device | dtype | step time | peak memory | ratio vs baseline | status | notes |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        cells = [r.what, r.device, r.dtype, r.step, r.memory, r.ratio, r.status, r.notes]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, about a minute")
    parser.add_argument("--out", type=Path, help="the table's file; default gpu_check.md in $OUT")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    started = time.monotonic()
    sizes = DRY if args.dry_run else FULL
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-"))
    out = out / "gpu_check.md" if out.is_dir() else out
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    rows = rows_to_run(sizes)
    if not args.dry_run and not _cuda():
        for row in rows:
            row.status = "failed: no CUDA device (use --dry-run on a CPU)"
        rows.append(Row("fedmoe run", "-", "-", status="failed: no CUDA device", key="run"))
        return report(rows, sizes, out, started)
    with (
        tempfile.TemporaryDirectory(prefix="gpu-check-", ignore_cleanup_errors=True) as workdir,
        log_path.open("w") as log,
    ):
        for row in rows:
            if (reason := precheck(row, sizes)) is not None:
                row.status = f"skipped: {reason}"
        todo = [row for row in rows if row.status == "ok"]
        # A dry run overlaps the run (mostly Flower's start-up) with one child for all the
        # benchmarks; on the GPU the run waits, so that it does not share the device.
        run = launch(Path(workdir), sizes) if sizes.toy else None
        run_children([todo] if sizes.toy else [[row] for row in todo], sizes, started, log)
        if run is None:
            run = launch(Path(workdir), sizes)
        left = started + sizes.deadline_s - time.monotonic()
        rows.append(finish_run(run, left, log) if isinstance(run, Run) else run)
    fill_in(rows)
    return report(rows, sizes, out, started)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def report(rows: list[Row], sizes: Sizes, out: Path, started: float) -> int:
    failed = [row for row in rows if row.failed]
    lines = header(sizes) + table(rows)
    lines += [
        "",
        f"Wall time {time.monotonic() - started:.0f} s; "
        + (f"{len(failed)} check(s) failed." if failed else "no check failed."),
    ]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    print(text, end="")
    print(f"[gpu_check] table written to {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
