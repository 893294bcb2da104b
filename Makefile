# fedbrain: `make demo` sets up .venv and runs the main job (`fedbrain simulate` on the embedded
# default scenario); `make test` installs the system packages the tests use (chromium,
# postgresql, prometheus), sets up .venv and runs the test suite with the linters. Both need
# only python3.11 on the PATH (and root, or sudo, for apt-get).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/simulate

.PHONY: demo test lint typecheck setup system-packages clean

$(BIN)/fedbrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the small CPU build of PyTorch first; the project's torch range admits it
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/fedbrain

demo: setup
	$(BIN)/fedbrain simulate --out $(OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# chromium, postgresql and prometheus for the tests that use them for real (apt-get as root)
system-packages:
	bash .ci/system-packages

test: system-packages setup lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs build *.egg-info
