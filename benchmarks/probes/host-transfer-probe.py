"""GPU probe, kept as the record of host-transfer-NVIDIA-H100-2026-11-22.json: how long SDXL's
weights take to load and to move between host and GPU, from ordinary and page-locked memory.
Run from the repository root on the GPU machine; writes $OUT/load_probe.json."""
# ruff: noqa: E402

import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/out"))
res = {}


def save():
    (OUT / "load_probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)


from concurrent.futures import ThreadPoolExecutor

import torch

sys.argv = ["x"]
from scripts.benchmark import write_checkpoints

models = Path("/tmp/bench/models")
t = time.time()
write_checkpoints(models)
res["write_s"] = round(time.time() - t, 1)
from handler.pipelines import load_checkpoint
from handler.registry import Registry
from handler.settings import Settings

reg = Registry(Settings(models_dir=str(models), extra_roots=(), device="cuda"))
model = reg.resolve("checkpoint", "bench-sdxl", "checkpoint")
det = reg.detect(model)
cfg = reg.config_folder(model, det)
torch.cuda.init()
torch.zeros(1, device="cuda")


def sync():
    torch.cuda.synchronize()


def cpu_load():
    t = time.time()
    loaded = load_checkpoint(model, det, cfg, torch.device("cpu"), torch.float16)
    return loaded, time.time() - t


def tensors(pipe):
    mods = [getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    return [t for m in mods for t in list(m.parameters()) + list(m.buffers())]


def to_dev_threaded(pipe, pin):
    ts = tensors(pipe)

    def move(p):
        src = p.data.pin_memory() if pin else p.data
        p.data = src.to("cuda", non_blocking=pin)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(move, ts))
    sync()


loaded, s = cpu_load()
res["cpu_load_first_s"] = round(s, 2)
t = time.time()
loaded.pipeline.to("cuda")
sync()
res["to_cuda_plain_s"] = round(time.time() - t, 2)
save()
# RAM tier: pageable
t = time.time()
loaded.pipeline.to("cpu")
res["offload_to_cpu_s"] = round(time.time() - t, 2)
t = time.time()
loaded.pipeline.to("cuda")
sync()
res["switch_back_pageable_s"] = round(time.time() - t, 2)
# RAM tier: pinned
t = time.time()
loaded.pipeline.to("cpu")
for p in tensors(loaded.pipeline):
    p.data = p.data.pin_memory()
res["offload_to_pinned_s"] = round(time.time() - t, 2)
t = time.time()
for p in tensors(loaded.pipeline):
    p.data = p.data.to("cuda", non_blocking=True)
sync()
res["switch_back_pinned_s"] = round(time.time() - t, 2)
save()
del loaded
import gc

gc.collect()
torch.cuda.empty_cache()
loaded, s = cpu_load()
res["cpu_load_second_s"] = round(s, 2)
t = time.time()
to_dev_threaded(loaded.pipeline, pin=False)
res["to_cuda_threaded_pageable_s"] = round(time.time() - t, 2)
save()
del loaded
gc.collect()
torch.cuda.empty_cache()
loaded, s = cpu_load()
res["cpu_load_third_s"] = round(s, 2)
t = time.time()
to_dev_threaded(loaded.pipeline, pin=True)
res["to_cuda_threaded_pinned_s"] = round(time.time() - t, 2)
save()
del loaded
gc.collect()
torch.cuda.empty_cache()
# direct: safetensors to cuda
from safetensors.torch import load_file

t = time.time()
sd = load_file(str(model.path), device="cuda")
sync()
res["safetensors_load_file_cuda_s"] = round(time.time() - t, 2)
del sd
t = time.time()
sd = load_file(str(model.path))
res["safetensors_load_file_cpu_s"] = round(time.time() - t, 2)
t = time.time()
n = sum(v.float().sum().item() * 0 + v.numel() for v in list(sd.values())[:1])
del sd
save()
