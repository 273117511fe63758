# The two commands of the README: `make demo` and `make test`.
PY := .venv/bin/python
OUT ?= runs/demo

.PHONY: setup demo test test-slow bench-loader bench-cluster bench-datadam
setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) -m engine run --config configs/demo/fashion_scdd.yaml --out $(OUT)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench-loader: setup
	$(PY) tools/bench/loader.py

bench-cluster: setup
	$(PY) tools/bench/cluster.py

bench-datadam: setup
	$(PY) tools/bench/datadam.py
