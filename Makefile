# The two commands of kdflow. Each creates .venv (Python 3.11, pinned
# versions from requirements.txt) on first use, then:
#   make run    runs the experiment on config/config.yaml (extra Snakemake
#               options in ARGS, e.g. ARGS="--config seeds=[0]")
#   make test   runs the test suite

PYTHON ?= python3.11
VENV := .venv
CORES ?= 4

.PHONY: run test lint clean-venv test-deps

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

# One run per checkout at a time, guarded by a kernel lock (flock) that dies
# with the run. Snakemake's own lock survives a killed run and would refuse
# the next one ("Directory cannot be locked"); while we hold the flock no
# other run of this checkout is alive, so a leftover Snakemake lock is stale
# and is cleared before the run (interrupted jobs then rerun or resume).
RUN_LOCK := .snakemake/kdflow-run.lock
run: $(VENV)/.installed
	@mkdir -p .snakemake
	@exec 9>$(RUN_LOCK); if ! flock -n 9; then \
	  echo "kdflow: another run of this checkout is in progress ($(RUN_LOCK) is held);" \
	    "wait for it to end" >&2; exit 75; fi; \
	$(VENV)/bin/snakemake --unlock --quiet all $(ARGS) >/dev/null 2>&1; \
	$(VENV)/bin/snakemake --cores $(CORES) --resources gpu=1 $(ARGS)

test: $(VENV)/.installed test-deps
	$(VENV)/bin/python -m pytest $(ARGS)

# The browser test needs Chromium and ChromeDriver, the SLURM test slurm-wlm
# and munge (Debian packages). Installed when missing and possible (root with
# apt-get); otherwise those tests are skipped and say why.
TEST_PACKAGES := chromium chromium-driver slurm-wlm munge
test-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	    && command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(TEST_PACKAGES) for the browser and SLURM tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $(TEST_PACKAGES) >/dev/null) \
	  || echo "kdflow: could not install $(TEST_PACKAGES); their tests will be skipped"; \
	else echo "kdflow: $(TEST_PACKAGES) missing and not installable here (needs root" \
	  "and apt-get); the browser and SLURM tests will be skipped"; fi

lint: $(VENV)/.installed
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile rules

clean-venv:
	rm -rf $(VENV)
