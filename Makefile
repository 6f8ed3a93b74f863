.PHONY: run test setup

setup:
	./scripts/setup.sh

# The full federated fine-tune on the embedded default (bundled base model + demo federation).
run: setup
	.venv/bin/fedmoe run

test: setup
	.venv/bin/python -m pytest
