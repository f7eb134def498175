"""Training throughput of a registry UNet: plain PyTorch loop vs DeepSpeed ZeRO (same model, same run).

    python -m geomerase.benchmarks.train_throughput --size sd15 --batch 16 --precision bf16 --stage 2
    python -m geomerase.benchmarks.train_throughput --size sd15 --attention triton --stage 2
    python -m geomerase.benchmarks.train_throughput --size sd15 --compile --stage 0
    OMP_NUM_THREADS=1 python -m geomerase.benchmarks.train_throughput --size debug --batch 4 --steps 3 --precision fp32

``--attention`` routes every attention call of the UNet through :func:`geomerase.core.attention.attention`
with that backend (``sdpa``: PyTorch picks flash/cuDNN/efficient itself). ``--compile`` wraps the
plain loop's UNet in ``torch.compile`` (compile time excluded: it happens in the warm-up steps).
``--stage 0`` skips DeepSpeed. One JSON per configuration: ``train_throughput_<cpu|gpu>_<attention>[_compile].json``.

Random weights, synthetic inputs (latents of the UNet's sample shape, random text states),
epsilon MSE, AdamW. Reports images/s and MFU = images/s x FLOPs per image / peak FLOP/s.
FLOPs per image are counted with ``torch.utils.flop_counter`` on one forward + backward
(the SD-1.5 UNet at 512 px is ~2.41 TFLOP per image); the peak is ``--peak-flops`` or, for a
known GPU, its dense bf16 peak. DeepSpeed runs as a one-process group in this process (no
launcher needed); when it is not installed only the plain loop is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PEAKS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class UNetLoss(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.unet(x, t, cond).sample.float(), target.float())


def _inputs(unet, batch: int, device, dtype):
    c, s = unet.config.in_channels, unet.config.sample_size
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, c, s, s, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    cond = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    return x, t, cond, torch.randn(batch, c, s, s, generator=g).to(device, dtype)


def count_flops(unet, device) -> float:
    """Forward + backward FLOPs of one image."""
    from torch.utils.flop_counter import FlopCounterMode

    m = UNetLoss(unet)
    x, t, cond, y = _inputs(unet, 1, device, torch.float32)
    with FlopCounterMode(display=False) as fc:
        m(x, t, cond, y).backward()
    unet.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(unet, batch, steps, warmup, device, precision) -> float:
    m = UNetLoss(unet)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    data = _inputs(unet, batch, device, torch.float32)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.time()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = m(*data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return batch * steps / (time.time() - t0)


def zero(unet, batch, steps, warmup, device, precision, stage) -> float:
    import deepspeed

    from geomerase.distributed.deepspeed_engine import init_distributed

    init_distributed("nccl" if device.type == "cuda" else "gloo")
    m = UNetLoss(unet)
    cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage, "overlap_comm": device.type == "cuda"},
           "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
           "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True),
                                      config=cfg, dist_init_required=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    data = _inputs(unet, batch, device, dtype)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.time()
        loss = engine(*data)
        engine.backward(loss)
        engine.step()
    _sync(device)
    return batch * steps / (time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    from diffusers import UNet2DConditionModel

    from geomerase.core.attention import set_attention_backend
    from geomerase.core.models import MODEL_SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="sd15", choices=sorted(MODEL_SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--stage", type=int, default=2, help="ZeRO stage of the DeepSpeed run; 0: no DeepSpeed run")
    ap.add_argument("--attention", default="sdpa", help="attention backend (geomerase.core.attention.BACKENDS)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet of the plain loop")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = a.peak_flops or next((v for k, v in PEAKS_BF16.items() if k in name), None)
    row: dict = {"size": a.size, "batch": a.batch, "steps": a.steps, "precision": a.precision, "device": name,
                 "resolution_px": MODEL_SIZES[a.size].resolution, "zero_stage": a.stage,
                 "gradient_checkpointing": a.gradient_checkpointing, "peak_flops": peak,
                 "attention": a.attention, "compile": a.compile, "torch": torch.__version__}

    def fresh():
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: an SD-1.5 UNet takes seconds on the host
            u = UNet2DConditionModel(**MODEL_SIZES[a.size].unet)
        set_attention_backend(u, a.attention)
        if a.gradient_checkpointing:
            u.enable_gradient_checkpointing()
        return u

    counted = fresh()
    set_attention_backend(counted, "sdpa")  # the counter sees aten ops only, not Triton launches
    row["flops_per_image"] = count_flops(counted, device)
    del counted
    t = time.time()
    unet = fresh()
    row["plain_images_per_s"] = plain(torch.compile(unet) if a.compile else unet, a.batch, a.steps, a.warmup,
                                      device, a.precision)
    row["plain_wall_s"] = round(time.time() - t, 1)
    del unet
    row["zero_images_per_s"] = None
    if a.stage > 0:
        try:
            row["zero_images_per_s"] = zero(fresh(), a.batch, a.steps, a.warmup, device, a.precision, a.stage)
        except ImportError as e:
            row["zero_error"] = f"deepspeed not importable: {e}"
    for k in ("plain", "zero"):
        ips = row[f"{k}_images_per_s"]
        row[f"{k}_mfu"] = ips * row["flops_per_image"] / peak if (ips and peak) else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    name = f"train_throughput_{tag}_{a.attention}{'_compile' if a.compile else ''}.json"
    (out / name).write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
