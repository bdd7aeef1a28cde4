# ISDR developer entry points. `make demo` and `make test` are the two commands of the README.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
K8S_ASSETS_SCRIPT := hack/k8s/ensure-binaries.sh

.PHONY: setup system-deps python-deps k8s-binaries image demo test test-fast bench chaos clean

## setup: install everything the relay and its tests need (dcmtk, the Python environment, Kubernetes binaries)
setup: system-deps python-deps k8s-binaries

## system-deps: Debian packages the tests use (dcmtk, Orthanc, GDCM's gdcmscu, nginx as real peers; dicom3tools' dciodvfy; buildah and mmdebstrap for the image)
system-deps:
	@bash scripts/install-system-deps.sh

## python-deps: a virtual environment in .venv with the relay and its test dependencies
python-deps: $(BIN)/isdr

$(BIN)/isdr: pyproject.toml devtools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' -e ./devtools
	@touch $@

## k8s-binaries: etcd, kube-apiserver, kube-controller-manager, kubectl and helm, built from Go modules (cached)
k8s-binaries:
	@if [ -x $(K8S_ASSETS_SCRIPT) ]; then bash $(K8S_ASSETS_SCRIPT); fi

## image: the product image from the Dockerfile, built with buildah (cached; a warm run takes a second)
image: system-deps
	@bash hack/image/build.sh

## demo: the relay on its embedded defaults with the example InferenceServer and a destination, end to end
demo: system-deps python-deps
	@ISDR="$(abspath $(BIN))/isdr" bash scripts/demo.sh

## test: the whole test suite (unit, integration with real DICOM/HTTP/S3 peers, the image, Kubernetes)
test: setup image
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

## test-fast: unit tests only
test-fast: python-deps
	$(BIN)/python -m pytest -ra tests/unit $(PYTEST_ARGS)

## bench: receive throughput of `isdr run` next to dcmtk's storescp
bench: system-deps python-deps
	$(BIN)/python scripts/bench_receive.py $(BENCH_ARGS)

## chaos: the long crash test, one mode after the other (SIGKILLs at random moments while senders stream;
##        docs/lifecycle.md). CHAOS_KILLS, CHAOS_SERIES_RUN, CHAOS_SERIES_KUBE, CHAOS_ARGS to change it
CHAOS_KILLS ?= 50
CHAOS_SERIES_RUN ?= 300
CHAOS_SERIES_KUBE ?= 100
chaos: setup image
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/chaos.py run --kills $(CHAOS_KILLS) --series $(CHAOS_SERIES_RUN) $(CHAOS_ARGS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/chaos.py kube --kills $(CHAOS_KILLS) --series $(CHAOS_SERIES_KUBE) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) demo-data benchmark-data .pytest_cache
