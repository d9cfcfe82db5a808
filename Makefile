# Two commands do everything on a fresh machine (see README.md):
#   make demo   set up, then run the whole active-learning loop on real cells (the main job)
#   make test   set up, then run the test suite (what CI runs)
# and `make run` trains and evaluates the diffusion classifier alone (on PBC: RUN_DATA, STEPS, CELLS, OUT).
PYTHON ?= python3.11
VENV   ?= .venv
DATA   ?= ../shared/data/cells
OUT    ?= runs/main
STEPS  ?= 2500
RUN_DATA ?= ../shared/data/manifest.csv
CELLS  ?= 1000
# make run and make demo train and score in bf16 where the CPU computes it natively (avx512_bf16), else in fp32
# (emulated bf16 would be slower)
RUN_PRECISION ?= $(if $(shell grep -qs avx512_bf16 /proc/cpuinfo && echo yes),bf16,fp32)
BIN    := $(VENV)/bin

export HF_HUB_OFFLINE = 1
export MLFLOW_DISABLE_TELEMETRY = true

ROUNDS ?= 3
FINETUNE_STEPS ?= 200
POOL_LIMIT ?= 200
BASE_MODEL ?= models/base-pbc
# with the shared cells: two sites (jtsc + bccd, and cellavision) on the four classes they share, ALL-IDB2 blasts
# mixed into their pools; without them the demo finds its own data
SHARED_CELLS = --classes neutrophil,lymphocyte,monocyte,eosinophil
DEMO_DATA = $(if $(wildcard $(DATA)),--data $(DATA) $(SHARED_CELLS))

.PHONY: setup run demo test check lint clean browser

setup: $(VENV)/.installed

# torch is pinned exactly in pyproject.toml: pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,test]'
	touch $@

# `make run`: the diffusion classifier alone, on PBC's eight classes (27 minutes on 2 cores): train (ending
# with its scoring tuned on the validation cells), then evaluate on PBC's test cells with ALL-IDB2 blasts as
# anomalies, and unadapted on the other labs' cells. The model scores in RUN_PRECISION, channels-last (bf16: 1.6x
# fp32's cells/s on a CPU with avx512_bf16, the same balanced accuracy and ECE: docs/benchmarks.md "make run"); the
# setting is saved with the model, so its rule is tuned and evaluated in the precision it runs in. The temperature
# is fitted on 500 of the 1,603 validation cells. A rerun resumes from OUT's checkpoints and replaces the model there
# (--overwrite).
run: setup
	CYTOLOOP_TRAIN__BATCH_SIZE=32 CYTOLOOP_TRAIN__PRECISION=$(RUN_PRECISION) CYTOLOOP_SCORING__CALIBRATION_CELLS=96 \
	CYTOLOOP_SCORING__PRECISION=$(RUN_PRECISION) CYTOLOOP_SCORING__CHANNELS_LAST=true \
	CYTOLOOP_SCORING__TEMPERATURE_CELLS=500 \
	$(BIN)/cytoloop train --kind diffusion --data $(RUN_DATA) --domains pbc --steps $(STEPS) --out $(OUT)/diffusion --overwrite
	$(BIN)/cytoloop evaluate --model $(OUT)/diffusion --data $(RUN_DATA) --domains pbc --part test --cells $(CELLS) \
		--anomaly-data $(RUN_DATA) --anomaly-domains allidb2 --json $(OUT)/in_domain.json
	$(BIN)/cytoloop evaluate --model $(OUT)/diffusion --data $(RUN_DATA) --domains jtsc,cellavision,bccd \
		--json $(OUT)/cross_domain.json

# The demo's stages run one after another on one machine, so Serve's replica and the training worker may each use
# both cores; fine-tunes train on batches of 32 (a site has tens of labels, not thousands), and training, Serve's
# scoring and the fine-tunes' recalibration and gate run in RUN_PRECISION (bf16 where the CPU has it natively).
demo: setup
	CYTOLOOP_STACK__MLFLOW_SERVER=true CYTOLOOP_SERVE__TORCH_THREADS=2 CYTOLOOP_TRAIN__THREADS=2 \
	CYTOLOOP_TRAIN__BATCH_SIZE=32 CYTOLOOP_TRAIN__PRECISION=$(RUN_PRECISION) \
	CYTOLOOP_SCORING__PRECISION=$(RUN_PRECISION) CYTOLOOP_SCORING__CHANNELS_LAST=true \
	$(BIN)/cytoloop demo $(DEMO_DATA) --base-model $(BASE_MODEL) --rounds $(ROUNDS) \
		--finetune-steps $(FINETUNE_STEPS) --pool-limit $(POOL_LIMIT)

# lint and types first: CI (`make test`) enforces them; `make check` is the quick inner loop (under 2 minutes)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint
	$(BIN)/python -m pytest tests/unit -q

# The annotator's browser test drives Debian's Chromium and ChromeDriver: installed here when missing (as root, or
# through sudo), never downloaded by a Python package.
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver > /dev/null; }

test: lint browser
	$(BIN)/python -m pytest tests -q

clean:
	rm -rf $(VENV) runs .pytest_cache
