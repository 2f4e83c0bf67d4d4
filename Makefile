# fedge: `make demo` sets up .venv and runs the quickstart simulation; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedge-installed
# the suite runs on two pytest-xdist workers (each starts its own small embedded Ray; the quick benchmarks, each a
# whole federation, run one after another on one of them); TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# constraints.txt locks the whole resolved set; torch is the CPU build pinned exactly
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[edge,cloud,dev]'
	# PySceneDetect (benchmark peer) declares the GUI opencv-python: install it without deps
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps scenedetect==0.7.2
	# Debian's Chromium for the dashboard's browser test (never `playwright install`: it downloads from a CDN)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "note: install Debian's chromium for the dashboard's browser test (it is skipped without it)"
	touch $(STAMP)

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/fedge simulate simulations/scenarios/quickstart.toml

test: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

test-fast: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check fedge common edge cloud simulations
	# mypy reads fedge.common & co. through a tree of links (it does not run the import hooks of an editable install)
	mkdir -p build/typecheck/fedge && cp fedge/__init__.py fedge/py.typed build/typecheck/fedge/
	for p in common edge cloud simulations; do ln -sfn ../../../$$p build/typecheck/fedge/$$p; done
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
