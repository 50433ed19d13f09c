# The two commands the README starts with. Both set up what they need first
# (apt packages, .venv, dependencies) and are quick when already set up.
.PHONY: run test setup bench

setup:
	@./scripts/setup.sh

run: setup
	.venv/bin/tapio run --config pipelines.yaml

test: setup
	.venv/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do .venv/bin/python $$b; done
