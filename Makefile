# `make test` on a fresh Debian machine: system packages, a virtualenv, the control-plane
# binaries (built once into ~/.cache/mikrom), then every test tier this machine can run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test deps venv testbin image images lock unit integration e2e cluster cluster-down crds docs demo demo-down bench clean

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

deps: venv testbin image

# The virtualenv installs exactly the hash-locked versions (requirements-test.lock, made by
# `make lock`), pip and setuptools included, then the project itself without resolving anything;
# `pip check` fails if pyproject.toml asks for a package the lock lacks (run `make lock`).
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements-test.lock hack/system-deps.sh
	bash hack/system-deps.sh
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --require-hashes -r requirements-test.lock
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(VENV)/bin/pip check
	touch $@

testbin:
	bash hack/testbin.sh >/dev/null

image:
	bash hack/test-image.sh >/dev/null

# Container images (operator, worker, pod sandbox) built with buildah from a debootstrap base, no
# registry needed; OCI archives and images.json in ~/.cache/mikrom/oci (hack/images.sh).
images:
	bash hack/images.sh

# Regenerates requirements.lock and requirements-test.lock from pyproject.toml (hack/lock.sh).
lock:
	bash hack/lock.sh

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: deps
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: deps
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# The test cluster, left running (root): kube-apiserver, kubelet, containerd, CoreDNS and Traefik
# in a network namespace of their own; prints its KUBECONFIG. The cluster tests use it instead of
# starting their own with MIKROM_TEST_CLUSTER=~/.cache/mikrom/cluster (tests/harness/cluster.py).
cluster: deps images
	$(PY) hack/cluster.py up

cluster-down:
	$(PY) hack/cluster.py down

crds: venv
	$(PY) -m mikrom.crdgen crds
	# the chart carries the same CRDs (tests/unit/test_chart.py checks they are byte-identical)
	cp crds/*.yaml charts/mikrom/crds/
	# and the API reference is rendered from the same schemas (tests/unit/test_apidoc.py)
	$(PY) -m mikrom.apidoc docs/api.md

# Generated documentation: the API reference from mikrom/models.py (tests/unit/test_apidoc.py fails
# on drift) and the architecture diagram from its Graphviz source (tests/unit/test_architecture_diagram.py).
docs: venv
	$(PY) -m mikrom.apidoc docs/api.md
	dot -Tsvg docs/architecture.dot -o docs/architecture.svg

demo: deps
	$(PY) hack/demo.py

# Stops the demo `make demo` left running: every process it recorded, by PID (hack/demo.py --down).
demo-down:
	$(PY) hack/demo.py --down

bench: deps
	$(PY) bench/dispatch.py
	$(PY) bench/boot.py
	$(PY) bench/scale.py --nodes 20

clean:
	rm -rf $(VENV) .test-artifacts build *.egg-info
