# The two commands a new user needs: `make demo` (set up + run the main job) and `make test`.
.PHONY: setup demo test test-fast docs bench clean

setup:
	bash scripts/setup.sh

# the first line names the CPU and the dtype its flags pick: bf16 is fast only with native support (docs/results.md).
# `--profile auto` sizes the run for this CPU (20 min with set-up; workflows/demo.py: the estimate is printed first,
# the report says what the profile left out). The demo trains its students for one seed; `thinkbroad distill --config configs/local.yaml` adds the config's other
# seeds to the same run (the paired verdicts need them) and `thinkbroad ablate` the ablation.
demo: setup
	@.venv/bin/python -m hardware.cpu
	.venv/bin/thinkbroad run --config configs/local.yaml --profile auto --set 'distill.seeds=[0]'

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25

# the inner loop: unit and component tests; no Ray, no vLLM engine, no pipeline run (tests/conftest.py FAST)
test-fast: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider -m "not ray and not vllm and not slow" --durations=10

# the documentation site (MkDocs, Material theme) into site/: the generated pages are checked against the config
# models and docs/*.json first, then --strict fails on a broken link or anchor (tests/test_docs_site.py, in `make test`)
docs: setup
	.venv/bin/python -m bench.docs_config --check
	.venv/bin/python -m bench.docs_tables --check
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d site

# each benchmark writes bench/results/<name>.json and prints one summary line; run them on a quiet machine
bench: setup
	.venv/bin/python bench/generation.py
	.venv/bin/python bench/teacher_train.py
	.venv/bin/python bench/student_latency.py
	.venv/bin/python bench/serve_load.py --clients 1,32 --seconds 30

clean:
	rm -rf runs bench/results site
