# Two commands for a newcomer (see README):  make lab   |   make test
# Everything runs in .venv, created once and reused by every target.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NBS    := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# JupyterLab listens on loopback only; token authentication stays on (Jupyter's default).
LAB_ARGS := --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=notebooks \
            --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
LAB_OVERRIDES := {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}
NBVAL_ARGS := --nbval-lax
# make test runs on two pytest-xdist workers (tests/conftest.py keeps each notebook on one).
TEST_WORKERS ?= 2
XDIST_ARGS := -n $(TEST_WORKERS)
EXEC_ARGS := --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800

.PHONY: export venv lab test unit nbval notebooks notebook lint bench browser-check clean-runs help timings docs-tables bench-pipeline gpu-check

help:
	@echo "make lab        - create .venv if missing, install, start JupyterLab on notebooks/"
	@echo "make test       - unit tests + every notebook under nbval in smoke mode (what CI runs)"
	@echo "make notebooks  - re-execute every notebook in place in FULL mode (refresh outputs)"
	@echo "make notebook NB=notebooks/01_cnn_model.ipynb - one notebook, full mode"
	@echo "make export     - regenerate utils/lessons/ from the notebooks' #@save cells"
	@echo "make lint       - ruff on utils/, tests/ and notebooks/"
	@echo "make bench      - the benchmark table (SERIES_MODE=smoke for a quick check)"
	@echo "make gpu-check  - on an NVIDIA GPU: every notebook (smoke), mixed_float16, bench -> docs/gpu-report.md"

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), \
	  f"Python 3.11 is required, found {sys.version.split()[0]}: install python3.11 or run make PYTHON=/path/to/python3.11"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

# JupyterLab settings for the series: no "Jupyter news" pop-up, no update check.
$(LAB_SETTINGS): $(STAMP) Makefile
	@mkdir -p $(dir $@)
	@echo '$(LAB_OVERRIDES)' > $@

venv: $(STAMP)

lab: $(STAMP) $(LAB_SETTINGS)
	$(BIN)/jupyter lab $(LAB_ARGS)

test: $(STAMP)
	SERIES_MODE=smoke $(BIN)/pytest $(XDIST_ARGS) tests $(NBVAL_ARGS) notebooks

unit: $(STAMP)
	SERIES_MODE=smoke $(BIN)/pytest tests

nbval: $(STAMP)
	SERIES_MODE=smoke $(BIN)/pytest $(NBVAL_ARGS) notebooks

notebooks: $(STAMP)
	$(BIN)/python scripts/normalize_notebooks.py
	@for nb in $(NBS); do \
	  echo "== $$nb (full mode)"; \
	  SERIES_MODE=full $(BIN)/jupyter nbconvert $(EXEC_ARGS) $$nb || exit 1; \
	done

notebook: $(STAMP)
	@test -n "$(NB)" || (echo "usage: make notebook NB=notebooks/NN_name.ipynb" && exit 2)
	$(BIN)/python scripts/normalize_notebooks.py $(NB)
	SERIES_MODE=full $(BIN)/jupyter nbconvert $(EXEC_ARGS) $(NB)

# utils/lessons/ from the notebooks' #@save cells (d2l's convention)
export: $(STAMP)
	$(BIN)/python scripts/export_lessons.py

lint: $(STAMP)
	$(BIN)/ruff check utils tests scripts notebooks

clean-runs:
	rm -rf runs

timings: $(STAMP)
	$(BIN)/python scripts/measure_smoke.py --twice

browser-check: $(STAMP) $(LAB_SETTINGS)
	$(BIN)/python scripts/browser_check.py

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

docs-tables: $(STAMP)
	$(BIN)/python scripts/update_docs.py

bench-pipeline: $(STAMP)
	$(BIN)/python scripts/bench_pipeline.py

gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py
