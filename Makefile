# The README's two commands.
.PHONY: demo test setup setup-test
setup:
	bash scripts/setup.sh
setup-test:
	bash scripts/setup.sh --test
demo: setup
	.venv/bin/geomerase demo --out runs/demo
test: setup-test
	.venv/bin/python -m pytest -q tests
