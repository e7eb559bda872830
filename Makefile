# The two commands of kdflow. Each creates .venv (Python 3.11, pinned
# versions from requirements.txt) on first use, then:
#   make run    runs the experiment on config/config.yaml (extra Snakemake
#               options in ARGS, e.g. ARGS="--config seeds=[0]")
#   make test   runs the test suite

PYTHON ?= python3.11
VENV := .venv
CORES ?= 4

.PHONY: run test lint clean-venv browser

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/snakemake --cores $(CORES) --resources gpu=1 $(ARGS)

test: $(VENV)/.installed browser
	$(VENV)/bin/python -m pytest $(ARGS)

# The report's browser test needs Chromium and ChromeDriver (Debian packages).
# Installed when missing and possible (root with apt-get); otherwise the test
# is skipped and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null) \
	  || echo "kdflow: could not install Chromium; the browser test will be skipped"; \
	else echo "kdflow: Chromium not found and not installable here (needs root and apt-get);" \
	  "the browser test will be skipped"; fi

lint: $(VENV)/.installed
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile rules

clean-venv:
	rm -rf $(VENV)
