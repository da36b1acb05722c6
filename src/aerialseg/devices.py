"""Which device and which precision: decided here, once, for training, evaluation and prediction.

`auto` takes the fastest device that is there (CUDA, then Apple's MPS, then the CPU) and the fastest
precision that keeps the classes: bfloat16 autocast where the hardware computes it natively (CUDA
GPUs from Ampere on, CPUs with AVX512-BF16 or AMX), float32 elsewhere (on an AVX2-only CPU bfloat16
is emulated, ~11x slower than float32).
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import torch

DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
InferencePrecision = Literal["auto", "32", "bf16"]
INFERENCE_PRECISIONS: tuple[str, ...] = ("auto", "32", "bf16")


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(choice: str = "auto") -> torch.device:
    """auto -> cuda, else mps, else cpu; a device that is not there is an error, never a silent CPU run."""
    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"{choice!r} is not a device; choose one of: {', '.join(DEVICE_CHOICES)}")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda: no CUDA device is available (use cpu or auto)")
    if choice == "mps" and not mps_available():
        raise DeviceError("device mps: Apple's Metal backend is not available (use cpu or auto)")
    return torch.device(choice)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matrix products in hardware (torch's own CPU capability checks)."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (MPS: taken as no, float32 is its safe path)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_inference_precision(choice: str, device: torch.device) -> Literal["32", "bf16"]:
    """auto -> bf16 where `device` runs it natively, else 32; `32` forces float32."""
    if choice not in INFERENCE_PRECISIONS:
        raise DeviceError(f"{choice!r} is not a precision; choose one of: {', '.join(INFERENCE_PRECISIONS)}")
    if choice == "auto":
        return "bf16" if native_bf16(device) else "32"
    return "bf16" if choice == "bf16" else "32"


def resolve_training_precision(precision: str, accelerator: str) -> str:
    """Lightning's `precision` for `train.precision`: `auto` picks bfloat16 autocast where the
    hardware runs it natively (fp16 with loss scaling on older CUDA GPUs), else fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32"


def launch_rank(devices: int | str, accelerator: str = "auto") -> int:
    """This process's global rank, from its launcher's environment, before Lightning's trainer exists.

    The same cluster environments as Lightning, in its order (`_AcceleratorConnector`): torchrun
    (`RANK`), Slurm's srun (`SLURM_PROCID`), LSF; else Lightning's own launcher, where a node
    started by hand says `NODE_RANK` (or `GROUP_RANK`) and Lightning starts `devices` processes on
    it with `LOCAL_RANK` 1.. (the first has none): global rank = node rank x devices + local rank.
    Lightning's `rank_zero_only.rank` reads only `RANK`/`LOCAL_RANK`/`SLURM_PROCID` at import, so the
    first process of the node with `NODE_RANK=1` would take itself for global rank 0 and open the
    MLflow run and the checkpoints beside the real rank 0.
    """
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment):
        with warnings.catch_warnings():  # "srun is available but not used": the trainer says it once
            warnings.simplefilter("ignore")
            detected = environment.detect()
        if detected:
            return environment().global_rank()
    env = os.environ
    node_rank = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    if node_rank == 0:
        return int(env.get("LOCAL_RANK", "0"))
    if devices == "auto":  # Lightning's count: every GPU where there are GPUs, else one process
        devices = torch.cuda.device_count() if accelerator != "cpu" and torch.cuda.is_available() else 1
    return node_rank * int(devices) + int(env.get("LOCAL_RANK", "0"))
