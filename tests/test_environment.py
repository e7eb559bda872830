"""The two environments agree: envs/kdflow.yaml (every rule's conda
environment under `--sdm conda`) pins exactly requirements.txt's versions
(the .venv of `make run` and `make test`), for every package a rule's job
imports."""

import re

import yaml

from tests.helpers.workflow import REPO

# Installed in .venv to drive the workflow or test it, never imported by a
# rule's job, so the rules' conda environment does not carry them.
DRIVER_AND_TEST_ONLY = {"snakemake", "snakemake-executor-plugin-slurm", "snakefmt", "pytest",
                        "selenium"}


def pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"not an exact pin: {line!r}"
            out[m[1].lower()] = m[2]
    return out


def conda_pip_pins(env: dict) -> dict[str, str]:
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "envs/kdflow.yaml has one pip section"
    return pins(pip[0])


def test_the_conda_environment_pins_what_requirements_txt_pins():
    venv = pins((REPO / "requirements.txt").read_text().splitlines())
    conda = conda_pip_pins(yaml.safe_load((REPO / "envs" / "kdflow.yaml").read_text()))
    assert DRIVER_AND_TEST_ONLY <= set(venv)
    assert conda == {k: v for k, v in venv.items() if k not in DRIVER_AND_TEST_ONLY}


def test_the_check_sees_a_drifted_pin():
    env = {"dependencies": ["python=3.11", {"pip": ["torch==2.0.0", "numpy==2.4.6"]}]}
    assert conda_pip_pins(env) == {"torch": "2.0.0", "numpy": "2.4.6"}
    venv = pins(["torch==2.14.1", "numpy==2.4.6"])
    assert conda_pip_pins(env) != venv
