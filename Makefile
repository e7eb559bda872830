# The two commands of kdflow. Each creates .venv (Python 3.11, pinned
# versions from requirements.txt) on first use, then:
#   make run    runs the experiment on config/config.yaml (extra Snakemake
#               options in ARGS, e.g. ARGS="--config seeds=[0]")
#   make test   runs the test suite

PYTHON ?= python3.11
VENV := .venv
CORES ?= 4

.PHONY: run test lint clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/snakemake --cores $(CORES) --resources gpu=1 $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile rules

clean-venv:
	rm -rf $(VENV)
