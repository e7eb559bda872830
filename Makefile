# The two commands of kdflow. Each creates .venv (Python 3.11, pinned
# versions from requirements.txt) on first use, then:
#   make run    runs the experiment on config/config.yaml (extra Snakemake
#               options in ARGS, e.g. ARGS="--config seeds='[0]'")
#   make test   runs the test suite (about 25 minutes; as root, first
#               installs the Debian packages of test-deps)
# and:
#   make report-zip  Snakemake's own report of a finished run, report.zip:
#               give it the run's ARGS (its --configfile and --config)
#   make docs   regenerates the docs' generated parts (module map, config
#               reference); make lint: snakemake --lint and snakefmt

PYTHON ?= python3.11
VENV := .venv
CORES ?= 4

.PHONY: run test lint docs report-zip clean-venv test-deps

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

# One run per checkout at a time, and a killed run leaves no process behind
# (kdflow/workflow/runguard.py): a kernel lock (flock) that no process of the run
# inherits, held until the run's last process is gone; a SIGKILL of make's
# process group ends every process of the run, even one in a session of its
# own. Snakemake's own lock survives a killed run and would refuse the next
# one ("Directory cannot be locked"); while we hold the flock no other run of
# this checkout is alive, so a leftover Snakemake lock is stale and is cleared
# before the run (interrupted jobs then rerun or resume). $$0 is snakemake,
# $$@ the ARGS (split by the shell as before).
RUN_LOCK := .snakemake/kdflow-run.lock
run: $(VENV)/.installed
	@mkdir -p .snakemake
	@exec $(VENV)/bin/python -m kdflow.workflow.runguard $(RUN_LOCK) sh -c \
	  '"$$0" --unlock --quiet all "$$@" >/dev/null 2>&1; \
	  exec "$$0" --cores $(CORES) --resources gpu=1 "$$@"' $(VENV)/bin/snakemake $(ARGS)

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

# Snakemake's report (figures and main tables with their captions) of the
# run that ARGS describe. Snakemake packs the outputs of the config it is
# given: without the run's own --configfile/--config it would pack the
# default experiment's files (and warn "Missing metadata" for each).
report-zip: $(VENV)/.installed
	$(VENV)/bin/snakemake --report report.zip $(ARGS)

# The generated parts of docs/development.md (module map) and
# config/README.md (config reference); tests/test_docs.py checks them.
docs: $(VENV)/.installed
	$(VENV)/bin/python -m kdflow.workflow.docs

lint: $(VENV)/.installed
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile rules

clean-venv:
	rm -rf $(VENV)
