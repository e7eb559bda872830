"""engine.precision: what `auto` chooses on each kind of machine, decided by a
pure function of the detected capabilities (kdflow.core.device.choose_precision),
so both branches are tested on every machine, AVX2-only or AVX-512 BF16."""

import pytest
import torch

from kdflow.core import provenance
from kdflow.core.device import (CpuBf16, choose_precision, cpu_bf16_support, onednn_bf16,
                                parse_cpuinfo, precision_for)

# Abridged /proc/cpuinfo entries of the two kinds of CI machine.
AMX_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""
AVX2_CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""
BF16_CPU = CpuBf16("Intel(R) Xeon(R) Processor", ("avx512_bf16", "amx_bf16"), onednn=True)
AVX2_CPU = CpuBf16("AMD EPYC 7B12", (), onednn=False)


def test_cpuinfo_gives_the_model_and_the_native_bf16_flags():
    assert parse_cpuinfo(AMX_CPUINFO) == ("Intel(R) Xeon(R) Processor",
                                          ("avx512_bf16", "amx_bf16"))
    assert parse_cpuinfo(AVX2_CPUINFO) == ("AMD EPYC 7B12", ())
    assert parse_cpuinfo("") == (None, ())
    # AVX-512 without its BF16 extension emulates bf16: not native.
    assert parse_cpuinfo("flags : avx512f avx512bw avx512_vnni")[1] == ()
    assert parse_cpuinfo("flags : avx512f amx_tile amx_bf16")[1] == ("amx_bf16",)


@pytest.mark.parametrize("isa, torch_says, expected", [
    (None, True, True), ("", True, True), ("ALL", True, True),
    ("AVX512_CORE_BF16", True, True), ("AVX512_CORE_AMX", True, True),
    # How the project imitates its AVX2-only CI on a bf16 machine.
    ("AVX2", True, False), ("avx2", True, False), ("AVX512_CORE_VNNI", True, False),
    (None, False, False),
])
def test_onednn_bf16_honours_an_isa_cap(isa, torch_says, expected):
    assert onednn_bf16(isa, torch_says) is expected


def test_auto_takes_bf16_on_a_cpu_with_native_bf16():
    chosen = choose_precision("auto", "cpu", cpu=BF16_CPU)
    assert chosen.name == "bf16" and chosen.dtype is torch.bfloat16
    assert "avx512_bf16, amx_bf16" in chosen.reason and "BENCHMARKS.md" in chosen.reason


@pytest.mark.parametrize("cpu", [
    AVX2_CPU,
    CpuBf16("AMD EPYC", (), onednn=True),                 # AVX-512 without BF16
    CpuBf16("Xeon", ("avx512_bf16",), onednn=False),      # oneDNN held below bf16
])
def test_auto_stays_fp32_on_a_cpu_without_native_bf16(cpu):
    chosen = choose_precision("auto", "cpu", cpu=cpu)
    assert chosen.name == "fp32" and chosen.dtype is None
    assert chosen.reason.startswith("auto: this CPU has ")
    assert ("no native bf16" in chosen.reason) == (not cpu.flags)


def test_auto_on_cuda_follows_the_gpu_whatever_the_cpu():
    assert choose_precision("auto", "cuda", cuda_bf16=True, cpu=AVX2_CPU).name == "bf16"
    assert choose_precision("auto", "cuda", cuda_bf16=False, cpu=BF16_CPU).name == "fp32"
    assert choose_precision("auto", "mps").name == "fp32"


@pytest.mark.parametrize("cpu", [BF16_CPU, AVX2_CPU])
def test_an_explicit_precision_is_kept_everywhere(cpu):
    for device_type in ("cpu", "cuda"):
        assert choose_precision("fp32", device_type, cuda_bf16=True, cpu=cpu).dtype is None
        assert choose_precision("bf16", device_type, cuda_bf16=False,
                                cpu=cpu).dtype is torch.bfloat16
    # Asked for bf16 where it is emulated: the log line says it will be slow.
    assert "slower than fp32" in choose_precision("bf16", "cpu", cpu=AVX2_CPU).reason
    assert "slower" not in choose_precision("bf16", "cpu", cpu=BF16_CPU).reason


def test_this_machine_is_detected_and_recorded_in_provenance():
    """Whichever kind of machine runs the suite: the choice follows its
    detected capability, and a checkpoint's provenance records both."""
    cpu = cpu_bf16_support()
    chosen = precision_for(torch.device("cpu"), "auto")
    assert chosen.name == ("bf16" if cpu.native else "fp32")
    record = provenance.collect("cpu", chosen)
    assert record["cpu_bf16_flags"] == " ".join(cpu.flags)
    assert record["cpu_bf16_native"] is cpu.native
    assert record["precision"] == chosen.name and record["precision_reason"] == chosen.reason
    assert all(v is None or isinstance(v, (str, bool)) for v in record.values())


def test_a_training_job_logs_the_choice_and_its_checkpoint_records_it(tmp_path, caplog):
    import numpy as np

    from kdflow.data.arrays import CIFAR10_MEAN, CIFAR10_STD, write_split
    from kdflow.study import planner
    from kdflow.train.job import train
    from kdflow.workflow.config import validate

    rng = np.random.default_rng(0)
    dataset, split = tmp_path / "data.npz", tmp_path / "split.npz"
    np.savez(dataset, x_train=rng.integers(0, 256, (60, 3, 32, 32), dtype=np.uint8),
             y_train=np.arange(60) % 10, x_test=rng.integers(0, 256, (20, 3, 32, 32),
                                                             dtype=np.uint8),
             y_test=np.arange(20) % 10, classes=np.array([f"c{i}" for i in range(10)]),
             dataset=np.array("cifar10"), mean=np.array(CIFAR10_MEAN),
             std=np.array(CIFAR10_STD))
    write_split(dataset, split, val_size=10, seed=0)
    config = validate({"teacher": {"model": "lightnn", "epochs": 1, "batch_size": 25}})
    with caplog.at_level("INFO"):
        train(planner.lookup(config, "teacher").record(), dataset=str(dataset),
              split=str(split), out_model=str(tmp_path / "model.pt"),
              out_history=str(tmp_path / "history.csv"), seed=0, device="cpu",
              threads=1, engine=config["engine"], placement=config["placement"])
    chosen = precision_for(torch.device("cpu"), "auto")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision ")]
    assert said == [f"precision {chosen.name}: {chosen.reason}"]
    record = torch.load(tmp_path / "model.pt", weights_only=True)["provenance"]
    assert record["precision"] == chosen.name
    assert record["cpu_bf16_native"] is cpu_bf16_support().native
