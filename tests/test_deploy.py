"""The deployed model: ONNX export checked against PyTorch, int8 calibrated on
training images only, validation scores for the choice of what to ship, the
models timed together round by round (kdflow.deploy.timing), clear failures
and no partial outputs.

Tiny: random-weight models on a synthetic dataset of 200 training and 40 test
images, 32 calibration images, timing from a few calls at batches 1 and 4.
"""

import io
import json
import os
import platform

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from kdflow import KdflowError
from kdflow.data.arrays import channel_stats, write_dataset, write_split
from kdflow.data.datasets import preprocessing_of
from kdflow.data.preprocessing import stored_steps
from kdflow.deploy import job, quantize, timing
from kdflow.deploy.job import FILES, RECORD, export_model
from kdflow.deploy.onnx_export import (MAX_DIFF_RELATIVE, MIN_AGREEMENT, check_against_pytorch,
                                       export_onnx, onnx_logits, open_session, pytorch_logits)
from kdflow.models import checkpoint
from kdflow.models.zoo import build_model
from tests.helpers.archives import CLASSES, synthetic_images

CALIBRATION = 32
TIMING = {"batch": 4, "warmup": 0, "runs": 4, "rounds": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    rng = np.random.default_rng(0)
    x, y = synthetic_images(200, rng)
    xt, yt = synthetic_images(40, rng)
    write_dataset(root / "data.npz", "cifar10", x.reshape(-1, 3, 32, 32), np.array(y),
                  xt.reshape(-1, 3, 32, 32), np.array(yt), CLASSES,
                  preprocessing=stored_steps(32))     # as conversion records CIFAR's
    write_split(root / "data.npz", root / "split.npz", val_size=20, seed=0)
    return root


def _checkpoint(root, name, seed=0):
    torch.manual_seed(seed)
    path = root / f"{name}-{seed}.pt"
    checkpoint.save(path, state_dict=build_model(name).state_dict(), model=name, num_classes=10,
                    image_size=32)
    return path


def _export(data, name, out, **overrides):
    kwargs = dict(calibration_images=CALIBRATION, seed=0, int8=True, threads=0)
    return export_model(_checkpoint(data, name), data / "data.npz", data / "split.npz", out,
                        **{**kwargs, **overrides})


@pytest.fixture(scope="module", params=["lightnn", "deepnn"])
def exported(request, data):
    out = data / f"export-{request.param}"
    return request.param, out, _export(data, request.param, out)


def _test_images(data):
    with np.load(data / "data.npz") as d:
        return d["x_test"], d["y_test"], channel_stats(d)


def test_export_matches_pytorch_within_tolerance_and_records_the_file(exported, data):
    name, out, record = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([RECORD, *FILES.values()])
    assert json.loads((out / RECORD).read_text()) == record
    check = record["check"]
    assert check["max_abs_diff"] <= MAX_DIFF_RELATIVE * check["logit_scale"]
    assert check["agreement"]["fraction"] >= MIN_AGREEMENT
    assert check["pytorch"]["correct"] == check["onnxruntime"]["correct"]
    # Recomputed here, from the files alone.
    x, y, (mean, std) = _test_images(data)
    model, _ = checkpoint.load_model(record["model"]["file"])
    ours = onnx_logits(open_session(out / FILES["fp32"]), x)
    theirs = pytorch_logits(model, x, mean, std)
    assert np.abs(ours - theirs).max() <= MAX_DIFF_RELATIVE * np.abs(theirs).max()
    assert check["pytorch"]["correct"] == int((theirs.argmax(1) == y).sum())
    # The record describes the file a user gets.
    m = onnx.load(str(out / FILES["fp32"]))
    assert record["onnx"]["opset"] == next(o.version for o in m.opset_import if o.domain == "")
    assert record["onnx"]["input"] == {"name": "images", "dtype": "float32",
                                       "shape": ["batch", 3, 32, 32], "layout": "NCHW",
                                       "channels": "RGB", "range": [0.0, 255.0]}
    assert record["onnx"]["output"]["shape"] == ["batch", 10]
    assert record["onnx"]["normalisation"]["mean"] == pytest.approx(mean)
    # How a deployment prepares its images, from the dataset's own record:
    # CIFAR's used as stored (no resize, no crop), then the normalisation.
    with np.load(data / "data.npz") as d:
        assert record["preprocessing"] == preprocessing_of(d)
    assert record["preprocessing"]["resize"].startswith("none") \
        and record["preprocessing"]["crop"] == "none"
    assert record["preprocessing"]["normalisation"]["std"] == pytest.approx(std)
    for precision, name_ in FILES.items():
        assert record["files"][precision]["bytes"] == (out / name_).stat().st_size


def test_batch_size_is_dynamic_and_the_file_takes_raw_pixels(exported, data):
    _, out, record = exported
    x, _, (mean, std) = _test_images(data)
    model, _ = checkpoint.load_model(record["model"]["file"])
    session = open_session(out / FILES["fp32"])
    for n in (1, 7):
        logits = onnx_logits(session, x[:n])
        assert logits.shape == (n, 10)
        # Plain 0..255 pixels in, the same logits as kdflow's normalised path.
        ref = pytorch_logits(model, x[:n], mean, std)
        assert np.abs(logits - ref).max() <= MAX_DIFF_RELATIVE * np.abs(ref).max()


def test_int8_accuracy_is_what_onnx_runtime_gives(exported, data):
    _, out, record = exported
    x, y, _ = _test_images(data)
    int8 = record["int8"]
    logits = onnx_logits(open_session(out / FILES["int8"]), x)
    assert int8["accuracy"]["correct"] == int((logits.argmax(1) == y).sum())
    assert int8["accuracy"]["images"] == len(y)
    fp32_correct = record["check"]["onnxruntime"]["correct"]
    assert int8["accuracy_drop"] == pytest.approx((fp32_correct - int8["accuracy"]["correct"]) / len(y))
    assert int8["large_drop"] == (int8["accuracy_drop"] > quantize.LARGE_DROP)
    assert record["files"]["int8"]["bytes"] < record["files"]["fp32"]["bytes"]
    # Really int8: the weights are stored as 8-bit integers.
    m = onnx.load(str(out / FILES["int8"]))
    assert any(t.data_type == onnx.TensorProto.INT8 for t in m.graph.initializer)


def test_calibration_uses_training_images_only(exported, data):
    _, _, record = exported
    cal = record["int8"]["calibration"]
    idx = np.array(cal["indices"])
    with np.load(data / "split.npz") as s:
        train_idx, val_idx = s["train_idx"], s["val_idx"]
    assert len(idx) == cal["images"] == CALIBRATION == len(set(cal["indices"]))
    assert set(idx) <= set(train_idx) and not set(idx) & set(val_idx)
    assert cal["sha256"] == quantize.digest(idx)
    # Seeded: the same seed draws the same images, another seed others.
    again = quantize.calibration_indices(data / "split.npz", CALIBRATION, seed=0)
    other = quantize.calibration_indices(data / "split.npz", CALIBRATION, seed=1)
    assert np.array_equal(again, idx) and not np.array_equal(other, idx)


def test_every_variant_is_scored_on_the_validation_split(exported, data):
    _, out, record = exported
    with np.load(data / "data.npz") as d, np.load(data / "split.npz") as sp:
        x, y = d["x_train"][sp["val_idx"]], d["y_train"][sp["val_idx"]]
    val = record["validation"]
    assert set(val) == {"pytorch", "onnxruntime", "int8"}
    for variant, name in (("onnxruntime", FILES["fp32"]), ("int8", FILES["int8"])):
        logits = onnx_logits(open_session(out / name), x)
        assert val[variant] == {"correct": int((logits.argmax(1) == y).sum()),
                                "images": len(y),
                                "accuracy": float((logits.argmax(1) == y).mean())}
    drop = val["onnxruntime"]["accuracy"] - val["int8"]["accuracy"]
    assert record["int8"]["validation_accuracy_drop"] == pytest.approx(drop)
    assert record["int8"]["validation_large_drop"] == (drop > quantize.LARGE_DROP)
    assert "latency" not in record, "export jobs must not time: they run beside other jobs"


def _subjects(exported_dirs):
    return [timing.subject_from_export(str(d / RECORD), d / RECORD) for d in exported_dirs]


def test_timing_covers_every_case_with_its_spread(data):
    dirs = [data / "export-lightnn", data / "export-deepnn"]
    for d, name in zip(dirs, ("lightnn", "deepnn")):
        if not (d / RECORD).exists():
            _export(data, name, d)
    summary, samples = timing.time_models(_subjects(dirs), threads=0, **TIMING)
    cases = {(r["key"], r["runtime"], r["precision"], r["batch"], r["threads"]) for r in summary}
    assert cases == {(str(d / RECORD), rt, p, b, t) for d in dirs
                     for rt, p in (("pytorch", "fp32"), ("onnxruntime", "fp32"),
                                   ("onnxruntime", "int8"))
                     for b in (1, TIMING["batch"]) for t in timing.thread_counts(0)}
    for r in summary:
        # runs spread evenly over the rounds: every case has all its calls.
        assert r["n"] == TIMING["runs"]
        assert 0 < r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
    assert len(samples) == len(summary) * TIMING["runs"]
    assert {s["round"] for s in samples} == set(range(TIMING["rounds"]))


def test_timing_goes_round_by_round_across_models_with_the_order_rotated(data):
    dirs = [data / "export-lightnn"]
    if not (dirs[0] / RECORD).exists():
        _export(data, "lightnn", dirs[0])
    subjects = _subjects(dirs) + [timing.Subject("twin", *_twin(dirs[0]))]
    ticks = iter(range(10**6))
    _, samples = timing.time_models(subjects, batch=1, warmup=0, runs=3, rounds=3, threads=1,
                                    clock=lambda: next(ticks))
    order = [(s["round"], s["key"], s["runtime"], s["precision"]) for s in samples]
    rounds = [[o[1:] for o in order if o[0] == r] for r in range(3)]
    # Every round times every case once (runs / rounds = 1 call each) ...
    assert all(sorted(r) == sorted(rounds[0]) and len(r) == 5 for r in rounds)
    # ... and each round starts one case later than the one before.
    assert rounds[1] == rounds[0][1:] + rounds[0][:1]
    assert rounds[2] == rounds[0][2:] + rounds[0][:2]


def _twin(export_dir):
    record = json.loads((export_dir / RECORD).read_text())
    model, _ = checkpoint.load_model(record["model"]["file"])
    norm = record["onnx"]["normalisation"]
    return model, {"fp32": export_dir / FILES["fp32"]}, norm["mean"], norm["std"], (3, 32, 32)


def read_cpuinfo(text):
    """/proc/cpuinfo read here on its own: the first processor's model name
    and flag list (x86's "flags", Arm's "Features"); None for each missing."""
    name = flags = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key.strip() == "model name" and name is None:
            name = value.strip()
        if key.strip() in ("flags", "Features") and flags is None:
            flags = value.split()
    return name, flags


def fake_cpuinfo(monkeypatch, text):
    """timing reads `text` as /proc/cpuinfo, or finds no such file (None)."""
    real = open

    def fake(path, *args, **kwargs):
        if str(path) != "/proc/cpuinfo":
            return real(path, *args, **kwargs)
        if text is None:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return io.StringIO(text)

    monkeypatch.setattr(timing, "open", fake, raising=False)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo here")
def test_timing_names_the_cpu():
    cpu = timing.cpu_info()
    with open("/proc/cpuinfo") as f:
        name, flags = read_cpuinfo(f.read())
    assert cpu["name"] == (name or platform.processor() or platform.machine()) and cpu["name"]
    assert cpu["machine"] == platform.machine()
    if hasattr(os, "sched_getaffinity"):
        assert cpu["cores"] == len(os.sched_getaffinity(0)) >= 1
    if flags is None:  # a kernel that lists no flags
        assert all(cpu[flag] is None for flag in (*timing.FLAGS, "amx"))
        return
    assert flags, "the flags line is empty"
    for flag in timing.FLAGS:
        assert cpu[flag] is (flag in flags), flag
    assert cpu["amx"] is any(f.startswith("amx") for f in flags)


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Test CPU @ 2.00GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu avx512_vnni avx_vnni
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
"""


def test_cpu_info_reads_the_first_processor_of_an_x86_listing(monkeypatch):
    fake_cpuinfo(monkeypatch, X86)
    cpu = timing.cpu_info()
    assert cpu["name"] == "Test CPU @ 2.00GHz"
    # The first processor's flags only ("avx512bw" is not "avx512_vnni").
    assert {f: cpu[f] for f in timing.FLAGS} == {
        "avx2": True, "avx512f": True, "avx512_vnni": False, "avx_vnni": False}
    assert cpu["amx"] is True


def test_cpu_info_reads_an_arm_listing(monkeypatch):
    fake_cpuinfo(monkeypatch, ARM)
    cpu = timing.cpu_info()
    # No model name on Arm: the platform's name stands in.
    assert cpu["name"] == (platform.processor() or platform.machine())
    assert all(cpu[f] is False for f in (*timing.FLAGS, "amx"))


def test_cpu_info_without_proc_cpuinfo_says_none(monkeypatch):
    fake_cpuinfo(monkeypatch, None)
    cpu = timing.cpu_info()
    # Unknown, not False: a missing listing says nothing of the CPU.
    assert all(cpu[f] is None for f in (*timing.FLAGS, "amx"))
    assert cpu["name"] == (platform.processor() or platform.machine())
    assert cpu["machine"] == platform.machine() and cpu["cores"] >= 1


def test_torch_threads_are_restored_after_timing(data, tmp_path):
    model, _ = checkpoint.load_model(_checkpoint(data, "lightnn"))
    export_onnx(model, tmp_path / "m.onnx", (0.5,) * 3, (0.25,) * 3, (3, 32, 32), "m.pt")
    original = torch.get_num_threads()
    # A count that timing never uses (it stops at the available cores).
    torch.set_num_threads(timing.available_cores() + 1)
    try:
        subject = timing.Subject("m", model, {"fp32": tmp_path / "m.onnx"}, (0.5,) * 3,
                                 (0.25,) * 3, (3, 32, 32))
        timing.time_models([subject], batch=1, threads=0, warmup=0, runs=1, rounds=1)
        assert torch.get_num_threads() == timing.available_cores() + 1
    finally:
        torch.set_num_threads(original)


@torch.library.custom_op("kdflow_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class _Opaque(nn.Module):
    """A model with an operation the ONNX exporter has no translation for."""

    def forward(self, x):
        return _opaque(x).mean((2, 3))


def test_an_unsupported_operation_is_one_clear_line(tmp_path):
    with pytest.raises(KdflowError) as e:
        export_onnx(_Opaque(), tmp_path / "m.onnx", (0.5,) * 3, (0.25,) * 3, (3, 32, 32),
                    "models/odd.pt")
    message = str(e.value)
    assert "\n" not in message and len(message) < 500, message
    assert "models/odd.pt" in message and "kdflow_test.opaque" in message


def test_a_truncated_onnx_file_is_a_clear_error(exported, tmp_path):
    _, out, _ = exported
    bad = tmp_path / "truncated.onnx"
    data = (out / FILES["fp32"]).read_bytes()
    for payload in (data[:len(data) // 2], b"", b"not a model"):
        bad.write_bytes(payload)
        with pytest.raises(KdflowError, match="truncated.onnx is not a usable ONNX model") as e:
            open_session(bad)
        assert "\n" not in str(e.value)


def test_damaged_weights_fail_the_check_with_the_numbers(exported, data, tmp_path):
    _, out, record = exported
    m = onnx.load(str(out / FILES["fp32"]))
    weights = max(m.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    raw = bytearray((out / FILES["fp32"]).read_bytes())
    at = raw.find(weights)
    raw[at:at + 4096] = bytes(b ^ 0x55 for b in raw[at:at + 4096])  # still a valid protobuf
    bad = tmp_path / "damaged.onnx"
    bad.write_bytes(bytes(raw))
    x, y, (mean, std) = _test_images(data)
    model, _ = checkpoint.load_model(record["model"]["file"])
    with pytest.raises(KdflowError, match=r"models/student\.pt does not match PyTorch on 40 test "
                                          r"images: max \|logit difference\|") as e:
        check_against_pytorch(pytorch_logits(model, x, mean, std),
                              onnx_logits(open_session(bad), x), y, "models/student.pt")
    assert "\n" not in str(e.value)


def test_a_calibration_count_above_the_training_split_calibrates_on_all_of_it(data, tmp_path):
    record = _export(data, "lightnn", tmp_path / "out", calibration_images=181)
    assert record["int8"]["calibration"]["images"] == 180
    with pytest.raises(KdflowError, match="calibration needs between 1 and 180 images"):
        quantize.calibration_indices(data / "split.npz", 0, 0)


def test_a_failure_late_in_the_job_leaves_the_earlier_outputs_alone(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {name: f"an earlier run's {name}".encode() for name in (RECORD, *FILES.values())}
    for name, payload in earlier.items():
        (out / name).write_bytes(payload)

    def fails(*args, **kwargs):
        raise KdflowError("reading the CPU failed")

    # The last step fails, once both ONNX files are written and checked.
    monkeypatch.setattr(job.timing, "cpu_info", fails)
    with pytest.raises(KdflowError, match="reading the CPU failed"):
        _export(data, "lightnn", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


def test_without_int8_only_the_fp32_file_and_record_are_written(data, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / FILES["int8"]).write_bytes(b"an earlier run's file")
    record = _export(data, "lightnn", out, int8=False)
    assert record["int8"] is None and set(record["files"]) == {"fp32"}
    assert sorted(p.name for p in out.iterdir()) == sorted([RECORD, FILES["fp32"]])


@pytest.mark.parametrize("settings", [{"batch": 4}, {**TIMING, "rounds": 0},
                                      {**TIMING, "runs": 2.5}, {**TIMING, "warmup": True}])
def test_bad_timing_settings_are_a_clear_error(settings):
    with pytest.raises(KdflowError, match="latency settings must be"):
        timing.check_settings(settings)
