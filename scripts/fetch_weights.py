# Fetches weights from outside: teacher.checkpoint, teacher.init or
# student.init, by {url, md5} (md5-verified) or by torchvision's name
# (verified with the SHA-256 prefix torchvision publishes).
from kdflow import KdflowError
from kdflow.data.fetch import fetch_archive
from kdflow.models import pretrained
from kdflow.workflow.cli import run_step


def job():
    params, out = snakemake.params, snakemake.output[0]
    spec = params.get("spec")
    if not pretrained.is_torchvision(spec):
        # {url, md5}: student.init's as spec, the teacher's as params of
        # their own (as before student.init existed: nothing reruns).
        url, md5 = (spec["url"], spec["md5"]) if spec else (params.url, params.md5)
        fetch_archive(url, md5, out, key=params.key)
        return
    weights = pretrained.resolve(spec, params.model)
    if weights.record() != params.weights:
        # The rule's params were resolved by the torchvision the workflow
        # started with; another one in this job's environment would verify
        # other weights than those the params say.
        raise KdflowError(f"{params.key}: torchvision here resolves {spec['torchvision']} to "
                          f"{weights.name} ({weights.url}), the workflow to "
                          f"{params.weights['torchvision']} ({params.weights['url']}): run "
                          "the workflow and its jobs with one torchvision version")
    pretrained.fetch(weights, out, local=spec.get("url"), key=params.key)


run_step(snakemake.log[0], job)
