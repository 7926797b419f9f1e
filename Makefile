# `make test` on a fresh Debian machine: system packages, a virtualenv, the control-plane
# binaries (built once into ~/.cache/mikrom), then every test tier this machine can run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test deps venv testbin image unit integration e2e crds demo bench clean

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

deps: venv testbin image

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml hack/system-deps.sh
	bash hack/system-deps.sh
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

testbin:
	bash hack/testbin.sh >/dev/null

image:
	bash hack/test-image.sh >/dev/null

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: deps
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: deps
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

crds: venv
	$(PY) -m mikrom.crdgen crds

demo: deps
	$(PY) hack/demo.py

bench: deps
	$(PY) bench/dispatch.py
	$(PY) bench/boot.py

clean:
	rm -rf $(VENV) .test-artifacts build *.egg-info
