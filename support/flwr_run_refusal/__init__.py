"""`flwr run .` in a fedmoe checkout ends here, before Flower starts or installs anything.

The checkout's pyproject.toml names `support.flwr_run_refusal.serverapp:app` as its Flower
ServerApp. `flwr run` checks that reference before it does anything else (Flower 1.42:
`flwr.supercore.object_ref.validate`, called from the CLI's `load_and_validate`), and looking the
module up imports this package: it says which fedmoe command to use and ends `flwr` with exit
code 2. By then Flower has at most written its default configuration ($FLWR_HOME/config.toml).

Why not run the app: `flwr run` hands it to Flower's managed local SuperLink, which outlives the
command on a fixed port shared by every project, and which (unless it was itself started with
runtime dependency installation off) builds a fresh environment with the project's dependencies
for every run: gigabytes of CUDA wheels for our torch pin. And a fedmoe run needs its validated
run config, its run row and its simulated enterprises' identities before Flower starts; `fedmoe
run` does that and then submits coordinator/flower_app/ to a SuperLink of its own.

tests/test_flwr_run.py runs `flwr run .` in a copy of the checkout and checks all of this.
"""

import sys

try:  # `flwr` passes its Exit on as the exit code, with --format json too
    from click.exceptions import Exit
except ImportError:  # not under the `flwr` CLI
    Exit = SystemExit

# `flwr run` here, and `flwr build` too: Flower checks the app the same way.
COMMAND = f"flwr {sys.argv[1]}" if sys.argv[1:] and sys.argv[1].isalpha() else "flwr run"
MESSAGE = f"""\
fedmoe: `{COMMAND}` does not run fedmoe, and nothing was started or installed.
  fedmoe run [--config run.toml]          a run on Flower's simulation engine, on this machine
                                          (default: the embedded base and the demo federation)
  fedmoe admin start [--config run.toml]  a run on a coordinator service's enterprise nodes
fedmoe starts its own Flower SuperLink for each; see README.md.
"""

sys.stderr.write(MESSAGE)
sys.stderr.flush()
raise Exit(2)
