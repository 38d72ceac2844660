# The two commands of the README:
#   make demo   -- bare machine -> synthetic studies -> cpu-small model set -> daemon -> triage table
#   make test   -- bare machine -> lint + the whole test suite (unit, integration with real peers, e2e)
.PHONY: demo run test lint bench setup

setup:
	@bash scripts/bootstrap.sh

demo run: setup
	.venv/bin/python -m training.demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	.venv/bin/python bench/glow_bench.py
