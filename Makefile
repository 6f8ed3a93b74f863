.PHONY: run test lint setup

setup:
	./scripts/setup.sh

# The full federated fine-tune on the embedded default (bundled base model + demo federation).
run: setup
	.venv/bin/fedmoe run

# Two workers, one test file each at a time: end-to-end tests mostly wait on Flower's timers.
test: setup
	.venv/bin/python -m pytest -n 2 --dist loadfile

# The formatter decides how code looks; the linter checks imports, bugbears, dead names.
lint: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
