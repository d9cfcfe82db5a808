# Two commands do everything on a fresh machine (see README.md):
#   make run    set up, then train and evaluate the diffusion classifier on the shared cells
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
DATA   ?= ../shared/data/cells
OUT    ?= runs/main
STEPS  ?= 2000
BIN    := $(VENV)/bin

export HF_HUB_OFFLINE = 1
export MLFLOW_DISABLE_TELEMETRY = true

.PHONY: setup run test clean

setup: $(VENV)/.installed

# torch is pinned exactly in pyproject.toml: pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: setup
	$(BIN)/cytoloop train --model diffusion --data $(DATA) --domains jtsc,bccd \
		--classes neutrophil,lymphocyte,monocyte,eosinophil --steps $(STEPS) --out $(OUT)/diffusion
	$(BIN)/cytoloop evaluate --model $(OUT)/diffusion --data $(DATA) --domains jtsc,bccd --part test \
		--anomaly-data $(DATA) --anomaly-domains allidb2 --json $(OUT)/in_domain.json
	$(BIN)/cytoloop evaluate --model $(OUT)/diffusion --data $(DATA) --domains cellavision \
		--json $(OUT)/cross_domain.json

test: setup
	$(BIN)/python -m pytest tests -q

clean:
	rm -rf $(VENV) runs .pytest_cache
