"""What a model costs: multiply-accumulates, inference latency and throughput.

Multiply-accumulates are counted from the model; latency and throughput are
measured on the device."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass for one (C, H, W) image,
    counted by PyTorch's FLOP counter over the operations the model actually
    runs (convolutions and matrix products, without their bias additions;
    activations and poolings are not counted; 1 MAC = 2 FLOPs)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model: nn.Module, device: torch.device, *, image_shape: tuple[int, int, int],
                  batch: int, latency_runs: int, throughput_runs: int) -> dict:
    """Median latency of single (C, H, W) images and throughput of large
    batches (eval mode, fp32, no gradients, after warm-up)."""
    model.eval()
    one = torch.randn(1, *image_shape, device=device).contiguous(memory_format=torch.channels_last)
    big = torch.randn(batch, *image_shape, device=device).contiguous(memory_format=torch.channels_last)
    for _ in range(5):
        model(one)
    model(big)
    _sync(device)
    lat = []
    for _ in range(latency_runs):
        t0 = time.perf_counter()
        model(one)
        _sync(device)
        lat.append(time.perf_counter() - t0)
    thr = []
    for _ in range(throughput_runs):
        t0 = time.perf_counter()
        model(big)
        _sync(device)
        thr.append(batch / (time.perf_counter() - t0))
    return {"latency_ms_batch1": 1000 * statistics.median(lat),
            "throughput_images_per_s": statistics.median(thr),
            "throughput_batch": batch,
            "threads": torch.get_num_threads()}
