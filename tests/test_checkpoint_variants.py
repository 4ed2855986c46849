"""Single-file checkpoints in the forms civitai serves them, generated through the engine.

Each variant is the demo SD 1.5 or SDXL checkpoint rewritten: other storage dtypes, EMA keys,
no VAE, NoobAI-XL's `v_pred` / `ztsnr` marker keys.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from handler.engine import Engine
from handler.errors import InvalidInput
from handler.schedulers import build_scheduler
from handler.schema import parse_job
from handler.settings import Settings

BASES = ("demo-sd15", "demo-sdxl")
VAE_PREFIX = "first_stage_model."


@pytest.fixture(scope="module")
def variants(demo_volume, tmp_path_factory):
    """A model root of rewritten demo checkpoints, each with its original's sidecar config."""
    root = tmp_path_factory.mktemp("variants")
    folder = root / "checkpoints"
    folder.mkdir()

    def write(name: str, base: str, tensors: dict, metadata: dict | None = None) -> None:
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata=metadata)
        shutil.copytree(demo_volume / "checkpoints" / f"{base}.config", folder / f"{name}.config")

    for base in BASES:
        state = load_file(str(demo_volume / "checkpoints" / f"{base}.safetensors"))
        write(base, base, state)
        write(f"{base}-bf16", base, {k: v.to(torch.bfloat16) for k, v in state.items()})
        fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
        write(f"{base}-fp8", base, fp8)
        # the same values as the fp8 file, stored as fp16
        write(f"{base}-fp8-values", base, {k: v.to(torch.float16) for k, v in fp8.items()})
        # an original training checkpoint: fp32, with EMA weights (here random, to tell if they
        # were used) and the LDM schedule buffers
        full = {k: v.float() for k, v in state.items()}
        generator = torch.Generator().manual_seed(0)
        for key, value in state.items():
            if key.startswith("model.diffusion_model."):
                ema_key = "model_ema." + key.removeprefix("model.").replace(".", "")
                full[ema_key] = torch.randn(value.shape, generator=generator)
        full["model_ema.num_updates"] = torch.tensor(1000)
        full["alphas_cumprod"] = torch.rand(1000, generator=generator)
        write(f"{base}-fp32-ema", base, full)
        no_vae = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}
        write(f"{base}-no-vae", base, no_vae)
        write(f"{base}-no-vae-sidecar", base, no_vae)
        vae = {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}
        save_file(vae, str(folder / f"{base}-no-vae-sidecar.vae.safetensors"))
        (root / "vae").mkdir(exist_ok=True)
        save_file(vae, str(root / "vae" / f"{base}-vae.safetensors"))
        save_file({"not.a.vae": torch.zeros(2)}, str(root / "vae" / f"{base}-broken.safetensors"))
        marker = torch.zeros(0)
        write(f"{base}-vpred", base, {**state, "v_pred": marker})
        write(f"{base}-vpred-ztsnr", base, {**state, "v_pred": marker, "ztsnr": marker})
        kohya = {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}
        write(f"{base}-kohya-vpred-ztsnr", base, state, kohya)
        for value in ("v", "v_prediction", "epsilon"):
            write(f"{base}-spec-{value}", base, state, {"modelspec.prediction_type": value})
    refiner = load_file(str(demo_volume / "checkpoints" / "demo-sdxl-refiner.safetensors"))
    no_vae = {k: v for k, v in refiner.items() if not k.startswith(VAE_PREFIX)}
    write("demo-sdxl-refiner-no-vae", "demo-sdxl-refiner", no_vae)
    return root


@pytest.fixture(scope="module")
def variant_engine(variants):
    return Engine(Settings(models_dir=str(variants), extra_roots=(), device="cpu"))


def run(engine: Engine, checkpoint: str, scheduler: str = "Euler", **extra):
    job = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 3, "seed": 7}
    return engine.run(parse_job({**job, "checkpoint": checkpoint, "scheduler": scheduler, **extra}))


def image_of(result) -> np.ndarray:
    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def infotext_of(result) -> dict[str, str]:
    from tests.test_modes import infotext_fields

    return infotext_fields(result)


def generate(engine: Engine, checkpoint: str, scheduler: str = "Euler", **extra) -> np.ndarray:
    return image_of(run(engine, checkpoint, scheduler, **extra))


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("base", BASES)
def test_storage_dtypes_and_ema_keys_generate_the_originals_image(variant_engine, base):
    original = generate(variant_engine, base)
    # EMA weights and schedule buffers are ignored, as A1111 and ComfyUI ignore them
    assert max_difference(generate(variant_engine, f"{base}-fp32-ema"), original) == 0
    # bf16 keeps 8 mantissa bits: the random tiny models differ by a few levels (4 measured)
    assert max_difference(generate(variant_engine, f"{base}-bf16"), original) <= 8
    # fp8 weights load as exactly the values they hold: no difference beyond fp8's own rounding
    fp8 = generate(variant_engine, f"{base}-fp8")
    assert max_difference(fp8, generate(variant_engine, f"{base}-fp8-values")) == 0


@pytest.mark.parametrize("base", BASES)
def test_a_checkpoint_without_vae_weights_names_the_vae_file_it_needs(variant_engine, base):
    with pytest.raises(InvalidInput) as error:
        generate(variant_engine, f"{base}-no-vae")
    assert "no VAE weights" in str(error.value) and error.value.field == "vae"
    assert f"{base}-no-vae.vae.safetensors" in str(error.value)
    # with its VAE beside it (A1111's NAME.vae.safetensors), it makes the original's image
    sidecar = generate(variant_engine, f"{base}-no-vae-sidecar")
    assert max_difference(sidecar, generate(variant_engine, base)) == 0
    listed = variant_engine.registry.names("checkpoint")
    assert f"{base}-no-vae-sidecar" in listed and f"{base}-no-vae-sidecar.vae" not in listed
    entries = {e["name"]: e for e in variant_engine.list_models()["checkpoints"]}
    assert entries[f"{base}-no-vae"]["needs_vae"] is True
    assert "needs_vae" not in entries[f"{base}-no-vae-sidecar"] and "needs_vae" not in entries[base]


@pytest.mark.parametrize("base", BASES)
def test_a_checkpoint_without_vae_weights_takes_the_jobs_vae_in_every_job(variants, base):
    engine = Engine(Settings(models_dir=str(variants), extra_roots=(), device="cpu"))
    original = generate(engine, base)
    with_vae = {"checkpoint": f"{base}-no-vae", "vae": f"{base}-vae"}
    with pytest.raises(InvalidInput) as error:  # a file that is no VAE: the job's fault
        generate(engine, **{**with_vae, "vae": f"{base}-broken"})
    assert error.value.field == "vae"
    result = run(engine, **with_vae)
    assert max_difference(image_of(result), original) == 0
    assert infotext_of(result)["VAE"] == f"{base}-vae"
    # loaded with that VAE, it still needs one named in every job: nothing is carried over
    with pytest.raises(InvalidInput) as error:
        generate(engine, f"{base}-no-vae")
    assert "no VAE weights" in str(error.value) and error.value.field == "vae"
    # another checkpoint's VAE is a VAE too: the usual per-job override
    assert max_difference(image_of(run(engine, **with_vae)), original) == 0
    assert max_difference(generate(engine, base), original) == 0


def test_a_refiner_without_vae_weights_takes_the_jobs_vae_too(variant_engine):
    job = {"refiner_checkpoint": "demo-sdxl-refiner-no-vae", "high_noise_frac": 0.5}
    refined = run(variant_engine, "demo-sdxl", vae="demo-sdxl-vae", **job)
    assert infotext_of(refined)["Refiner"] == "demo-sdxl-refiner-no-vae"
    with pytest.raises(InvalidInput) as error:
        run(variant_engine, "demo-sdxl", **job)
    assert "demo-sdxl-refiner-no-vae has no VAE weights" in str(error.value)
    assert error.value.field == "vae"


def test_a_job_refused_over_its_vae_pushes_no_checkpoint_out(variants):
    from handler.errors import ModelNotFound

    settings = Settings(models_dir=str(variants), extra_roots=(), device="cpu")
    engine = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0))
    generate(engine, "demo-sd15")
    refused = [
        ({}, InvalidInput),  # no vae
        ({"vae": "no-such-vae"}, ModelNotFound),
        ({"vae": "demo-sd15-broken"}, InvalidInput),  # not a VAE
    ]
    for extra, error in refused:
        with pytest.raises(error):
            run(engine, "demo-sd15-no-vae", **extra)
        assert len(engine.cache) == 1 and engine.checkpoint("demo-sd15")[1]  # still cached


def test_a_vae_file_replaced_or_added_on_the_volume_is_what_the_next_job_gets(variants, tmp_path):
    root = tmp_path / "root"
    (root / "checkpoints").mkdir(parents=True)
    (root / "vae").mkdir()
    for name in ("demo-sd15", "demo-sd15-no-vae"):
        shutil.copy(variants / "checkpoints" / f"{name}.safetensors", root / "checkpoints")
        shutil.copytree(
            variants / "checkpoints" / f"{name}.config", root / "checkpoints" / f"{name}.config"
        )
    vae_file = variants / "vae" / "demo-sd15-vae.safetensors"
    shutil.copy(vae_file, root / "vae" / "swap.safetensors")
    engine = Engine(Settings(models_dir=str(root), extra_roots=(), device="cpu"))
    before = generate(engine, "demo-sd15-no-vae", vae="swap")
    # the file is replaced by another VAE (its weights scaled): the next job decodes with it
    scaled = {k: v * 0.9 for k, v in load_file(str(vae_file)).items()}
    (root / "vae" / "swap.safetensors").unlink()  # a new file, as an upload makes one
    save_file(scaled, str(root / "vae" / "swap.safetensors"))
    after = generate(engine, "demo-sd15-no-vae", vae="swap")
    assert max_difference(after, before) > 0
    assert max_difference(after, generate(engine, "demo-sd15", vae="swap")) == 0
    # its own VAE put beside it: jobs need no vae any more
    shutil.copy(vae_file, root / "checkpoints" / "demo-sd15-no-vae.vae.safetensors")
    assert max_difference(generate(engine, "demo-sd15-no-vae"), generate(engine, "demo-sd15")) == 0


@pytest.mark.parametrize(
    "variable, name",
    [
        ("default_checkpoint", "demo-sdxl-refiner-no-vae"),
        ("refiner_checkpoint", "demo-sd15-no-vae"),
    ],
)
def test_a_configured_checkpoint_of_the_wrong_kind_stops_the_worker_with_or_without_vae(
    variants, variable, name
):
    settings = Settings(models_dir=str(variants), extra_roots=(), device="cpu")
    engine = Engine(replace(settings, **{variable: name}))
    with pytest.raises(InvalidInput) as error:
        engine.setup()
    assert error.value.field == variable.upper()


def test_a_default_checkpoint_without_a_vae_waits_for_a_job_naming_one(variants, caplog):
    settings = Settings(
        models_dir=str(variants),
        extra_roots=(),
        device="cpu",
        default_checkpoint="demo-sd15-no-vae",
    )
    engine = Engine(settings)
    engine.setup()
    assert "has no VAE weights" in caplog.text and len(engine.cache) == 0
    result = run(engine, checkpoint="demo-sd15-no-vae", vae="demo-sd15-vae")
    assert result.checkpoint == "demo-sd15-no-vae"


@pytest.mark.parametrize("base", BASES)
def test_modelspec_prediction_types_as_tools_write_them(variant_engine, base):
    v_prediction = generate(variant_engine, f"{base}-vpred")
    assert max_difference(generate(variant_engine, f"{base}-spec-v"), v_prediction) == 0
    assert max_difference(generate(variant_engine, f"{base}-spec-v_prediction"), v_prediction) == 0
    assert (
        max_difference(
            generate(variant_engine, f"{base}-spec-epsilon"), generate(variant_engine, base)
        )
        == 0
    )


def test_a_ztsnr_checkpoint_samples_the_zero_terminal_snr_schedule(variant_engine, variants):
    """NoobAI-XL v-pred: its `ztsnr` key makes the job sample as diffusers samples a model
    whose scheduler config says so (and as ComfyUI and reForge do): the rescaled schedule,
    from its last timestep."""
    # 1. The reference: the same weights as a diffusers folder whose scheduler is configured so
    loaded, _ = variant_engine.checkpoint("demo-sdxl-vpred")
    reference = variants / "checkpoints" / "vpred-ztsnr-folder"
    loaded.pipeline.save_pretrained(reference)
    config_file = reference / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))

    # 2. The single file makes the folder's image, not the one without the marker
    ztsnr = generate(variant_engine, "demo-sdxl-vpred-ztsnr")
    assert max_difference(ztsnr, generate(variant_engine, "vpred-ztsnr-folder")) == 0
    assert max_difference(ztsnr, generate(variant_engine, "demo-sdxl-vpred")) > 20


def test_kohya_metadata_marks_v_prediction_and_zero_terminal_snr(variant_engine):
    """sd-scripts records both in its `ss_*` metadata instead of marker keys."""
    ztsnr = generate(variant_engine, "demo-sdxl-vpred-ztsnr")
    assert max_difference(generate(variant_engine, "demo-sdxl-kohya-vpred-ztsnr"), ztsnr) == 0


@pytest.mark.parametrize("scheduler", ["Heun", "DPM++ SDE Karras", "PNDM"])
def test_ztsnr_reaches_schedulers_without_diffusers_option(variant_engine, scheduler):
    """Heun, LMS, DPM2, DPM++ SDE and PNDM have no `rescale_betas_zero_snr` in diffusers 0.42:
    they get the rescaled betas themselves, and start from pure noise (sigma 4096)."""
    ztsnr = generate(variant_engine, "demo-sdxl-vpred-ztsnr", scheduler)
    assert max_difference(ztsnr, generate(variant_engine, "demo-sdxl-vpred", scheduler)) > 20
    loaded, _ = variant_engine.checkpoint("demo-sdxl-vpred-ztsnr")
    built = build_scheduler(scheduler, loaded.scheduler_config)
    euler = build_scheduler("Euler", loaded.scheduler_config)
    assert "rescale_betas_zero_snr" not in type(built).__init__.__code__.co_varnames
    assert torch.allclose(built.alphas_cumprod, euler.alphas_cumprod, rtol=1e-4, atol=1e-9)
    built.set_timesteps(3)
    assert int(built.timesteps[0]) == 999
    if hasattr(built, "sigmas"):
        assert float(built.sigmas[0]) == pytest.approx(4096, rel=1e-3)
