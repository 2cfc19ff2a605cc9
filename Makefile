# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev

.PHONY: install install-dev demo test test-vector

install: $(INSTALLED)

install-dev: $(INSTALLED_DEV)

$(INSTALLED): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# The tests' and the benchmark's tools, on top of what the project needs to run.
$(INSTALLED_DEV): $(INSTALLED) requirements.txt requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The demo rebuilds its own database (askdrchaffee_demo), never the one you work with.
demo: install
	env -u DATABASE_URL EMBEDDED_DATABASE_NAME=askdrchaffee_demo $(BIN)/python manage.py demo

test: install-dev
	$(BIN)/python -m pytest

# The switch's end-to-end tests again with the new column as `vector` (the default is halfvec).
test-vector: install-dev
	EMBEDDING_STORAGE=vector TEST_DATABASE_NAME=test_askdrchaffee_vector $(BIN)/python -m pytest -m end_to_end

# The admin on the demo database (the demo is run first if it never was), with a superuser made
# for it: the URL, username and password are printed before the server starts (Ctrl-C stops it).
# Its search embeds queries with the model the demo used.
DEMO_DATABASE := env -u DATABASE_URL EMBEDDED_DATABASE_NAME=askdrchaffee_demo
.PHONY: admin
admin: install
	$(DEMO_DATABASE) $(BIN)/python manage.py demo_staff --build-demo
	$(DEMO_DATABASE) EMBEDDING_MODEL="$$($(DEMO_DATABASE) $(BIN)/python manage.py demo_staff --print-model)" \
		$(BIN)/python manage.py runserver 127.0.0.1:8000
