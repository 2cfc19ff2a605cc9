# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install demo test

install: $(INSTALLED)

$(INSTALLED): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# The demo rebuilds its own database (askdrchaffee_demo), never the one you work with.
demo: install
	env -u DATABASE_URL EMBEDDED_DATABASE_NAME=askdrchaffee_demo $(BIN)/python manage.py demo

test: install
	$(BIN)/python -m pytest
