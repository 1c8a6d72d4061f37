# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv by itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test serve worker bench check lock clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "wecom-mailer needs Python 3.11 or newer: run make PYTHON=python3.11 …")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The service's dependencies exactly as the image gets them: requirements.lock, every file checked against its
# sha256 (pip refuses a file that differs, and any package the lock does not name).
$(VENV)/.runtime: requirements.lock | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	@touch $@

$(VENV)/.dev: requirements-dev.txt requirements.txt | $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	@touch $@

# devtools/ (the WeCom stand-in and the demo) as a Flask plugin: `flask --app app demo` needs no configuration.
$(VENV)/.devtools: pyproject.toml | $(VENV)/.runtime
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

demo: $(VENV)/.runtime $(VENV)/.devtools  ## run the whole scenario on embedded defaults and show the emails
	$(BIN)/flask --app app demo

test: $(VENV)/.dev $(VENV)/.devtools  ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: $(VENV)/.runtime  ## run the service with the configuration in the environment / .env
	$(BIN)/gunicorn 'app:create_app()'

worker: $(VENV)/.runtime  ## run delivery only
	$(BIN)/flask --app app worker

check: $(VENV)/.runtime  ## try every dependency with the current configuration
	$(BIN)/flask --app app check

bench: $(VENV)/.dev $(VENV)/.devtools  ## print the benchmark table (see bench/README.md)
	$(BIN)/python bench/run.py

# requirements.lock: requirements.txt with the sha256 of every file, for the image's `pip install --require-hashes`.
# Run after any change to requirements.txt (tests/test_requirements_lock.py fails until then).
lock: $(VENV)/.dev  ## regenerate requirements.lock from requirements.txt
	$(BIN)/pip-compile --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links --quiet \
		--output-file requirements.lock requirements.txt

clean:
	rm -rf $(VENV) var .pytest_cache *.egg-info
