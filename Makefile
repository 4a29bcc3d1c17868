# advkit: set-up, tests and the demo. Every target is idempotent: a second run skips what is done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
FMNIST := data/FashionMNIST/raw/t10k-labels-idx1-ubyte
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
CHROMIUM := /usr/bin/chromium

.PHONY: setup test demo figures bench clean-runs

setup: $(INSTALLED) $(FMNIST)

# pinned torch/torchvision (the releases that install offline here), the package, notebooks and test tools
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $@

# Fashion-MNIST from the Debian package (installed with apt-get where we can), else torchvision's downloader
$(FMNIST): | $(INSTALLED)
	@if [ ! -d $(FMNIST_SYSTEM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "apt-get could not install dataset-fashion-mnist; trying torchvision's downloader"; \
	fi
	$(VENV)/bin/advkit data

# Debian's Chromium for the explorer's browser test (Playwright drives it; browser downloads do not work here)
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
		echo "apt-get could not install chromium: the browser test will fail (ADVKIT_SKIP_BROWSER=1 skips it)"; \
	else echo "install Debian's chromium for the browser test, or set ADVKIT_SKIP_BROWSER=1"; fi

test: setup $(CHROMIUM)
	$(VENV)/bin/pytest

demo: setup
	$(VENV)/bin/advkit sweep notebooks/sweeps/demo.yaml --jobs 2
	$(VENV)/bin/advkit summary runs/demo
	$(VENV)/bin/advkit figures --runs runs/demo --out figures

# every analysis notebook through papermill: the paper's panels, and the kit's for whatever runs exist
figures: setup
	mkdir -p runs  # a fresh clone: the paper's panels alone
	$(VENV)/bin/advkit figures --runs runs --out figures

# speed and memory against the physical floor and torchattacks (not part of make test; about 10 minutes on 2 cores)
bench: setup
	$(VENV)/bin/python -m advkit.bench

clean-runs:
	rm -rf runs/demo
