# The two commands a new user needs: `make demo` (set up + run the main job) and `make test`.
.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/thinkbroad generate --config configs/local.yaml

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	.venv/bin/python bench/generation.py

clean:
	rm -rf runs bench/results
