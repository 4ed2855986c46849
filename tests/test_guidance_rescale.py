"""CFG rescale (`guidance_rescale`): diffusers' own result where diffusers has it, the same
rescale where it has not (SD 1.x img2img and inpainting), and nothing left behind."""

from __future__ import annotations

import pytest
import torch

from handler.errors import InvalidInput
from handler.pipelines import rescale_guided, rescaled_guidance
from handler.schema import parse_job
from tests.test_modes import HALF, INIT, data_uri, inpaint_job, pixels

STEPS = 3


def native_and_ours(pipeline, **args):
    """Latents from diffusers' own guidance_rescale, and from ours around the same pipeline."""

    def run(**extra):
        generator = torch.Generator("cpu").manual_seed(5)
        with torch.inference_mode():
            return pipeline(
                prompt="a red cube",
                negative_prompt="blurry",
                num_inference_steps=STEPS,
                guidance_scale=7.5,
                output_type="latent",
                generator=generator,
                **args,
                **extra,
            ).images

    native = run(guidance_rescale=0.7)
    with rescaled_guidance(pipeline, 0.7):
        ours = run()
    plain = run()
    return native, ours, plain


@pytest.mark.parametrize(
    "checkpoint, mode",
    [
        ("demo-sd15", "txt2img"),
        ("demo-sdxl", "txt2img"),
        ("demo-sdxl", "img2img"),
        ("demo-sdxl", "inpaint"),
        ("demo-sdxl-inpaint", "inpaint"),
    ],
)
def test_the_rescale_is_diffusers_own_where_diffusers_has_it(engine, checkpoint, mode):
    from PIL import Image

    from handler.pipelines import pipeline_for

    loaded, _ = engine.checkpoint(checkpoint)
    args = {
        "txt2img": {"width": 64, "height": 64},
        "img2img": {"image": INIT, "strength": 0.8},
        "inpaint": {"image": INIT, "mask_image": Image.fromarray(HALF), "strength": 0.9},
    }[mode]
    native, ours, plain = native_and_ours(pipeline_for(loaded, mode), **args)
    effect = (native - plain).abs().max()
    # float32 rounding apart (the pipeline undoes the division of the cond half by the scale)
    difference = (ours - native).abs().max()
    print(f"effect {effect:.3g}, difference {difference:.3g}")
    assert effect > 1e-2 and difference < effect / 1000


def test_the_unets_forward_is_put_back(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    unet = loaded.pipeline.unet
    had_own = "forward" in unet.__dict__
    before = unet.forward
    with rescaled_guidance(loaded.pipeline, 0.5):
        assert unet.forward != before
    assert ("forward" in unet.__dict__) == had_own
    assert unet.forward == before


def test_the_pipelines_combination_of_the_halves_gives_the_rescaled_prediction():
    torch.manual_seed(0)
    prediction = torch.randn(4, 4, 8, 8)
    scale, rescale = 6.0, 0.7
    uncond, cond = prediction.chunk(2)
    guided = uncond + scale * (cond - uncond)
    std_cond = cond.std(dim=[1, 2, 3], keepdim=True)
    std_guided = guided.std(dim=[1, 2, 3], keepdim=True)
    expected = rescale * guided * std_cond / std_guided + (1 - rescale) * guided

    new_uncond, new_cond = rescale_guided(prediction, scale, rescale).chunk(2)
    assert torch.equal(new_uncond, uncond)
    torch.testing.assert_close(new_uncond + scale * (new_cond - new_uncond), expected)


def img2img_job(**extra) -> dict:
    return {
        "prompt": "a cube",
        "image": data_uri(INIT),
        "steps": 4,
        "seed": 2,
        "checkpoint": "demo-sd15",
        **extra,
    }


@pytest.mark.parametrize(
    "job",
    [img2img_job(), inpaint_job("demo-sd15"), inpaint_job("demo-sd15-inpaint")],
    ids=["img2img", "inpaint", "inpaint-checkpoint"],
)
def test_sd1_img2img_and_inpainting_take_it_though_diffusers_does_not(engine, job):
    plain = pixels(engine.run(parse_job(job)))
    rescaled = engine.run(parse_job({**job, "guidance_rescale": 0.7}))
    again = engine.run(parse_job({**job, "guidance_rescale": 0.7}))
    assert (pixels(rescaled) != plain).any()
    assert (pixels(rescaled) == pixels(again)).all()
    # nothing stays behind: the next job without it is the plain one
    assert (pixels(engine.run(parse_job(job))) == plain).all()


def test_the_refiner_ensemble_and_the_hires_pass_are_rescaled_too(engine, monkeypatch):
    import handler.pipelines

    job = {
        "prompt": "a cube",
        "steps": 4,
        "seed": 4,
        "width": 64,
        "height": 64,
        "checkpoint": "demo-sdxl",
        "refiner_checkpoint": "demo-sdxl-refiner",
        "high_noise_frac": 0.5,
        "hires": {"scale": 1.5, "steps": 2, "strength": 0.5},
        "guidance_rescale": 0.7,
    }
    sizes = []

    def recording(prediction, scale, rescale):
        sizes.append(tuple(prediction.shape[-2:]))
        return rescale_guided(prediction, scale, rescale)

    monkeypatch.setattr(handler.pipelines, "rescale_guided", recording)
    engine.run(parse_job(job))
    first, hires = sorted(set(sizes))
    assert hires == (first[0] * 3 // 2, first[1] * 3 // 2)
    # every UNet call: 2 base and 2 refiner steps at the first size, then the hires pass's 2
    # (it runs all its steps, as A1111's does)
    assert sizes == [first] * 4 + [hires] * 2


def test_it_needs_cfg_to_rescale(engine):
    job = {"prompt": "x", "steps": 2, "checkpoint": "demo-sd15", "guidance_rescale": 0.7}
    with pytest.raises(InvalidInput) as info:
        engine.run(parse_job({**job, "guidance_scale": 1.0}))
    assert info.value.field == "guidance_rescale"
    assert "guidance_scale above 1" in info.value.accepted
    with pytest.raises(InvalidInput) as info:
        parse_job({**job, "guidance_rescale": 1.5})
    assert info.value.field == "guidance_rescale" and info.value.accepted == "0.0 to 1.0"


def test_forges_name_and_infotext(engine):
    from tests.test_modes import infotext_fields

    job = {"prompt": "x", "steps": 2, "seed": 1, "width": 64, "height": 64}
    job.update(checkpoint="demo-sd15", rescale_cfg=0.7)
    assert parse_job(job).guidance_rescale == 0.7
    fields = infotext_fields(engine.run(parse_job(job)))
    assert fields["Rescale CFG"] == "0.7"
    del job["rescale_cfg"]
    assert "Rescale CFG" not in infotext_fields(engine.run(parse_job(job)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_the_graphed_unet_is_rescaled_as_the_eager_one_without_a_new_capture(
    cuda_engines, checkpoint
):
    import numpy as np

    graphed, eager = cuda_engines
    job = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 3, "seed": 5}
    job["checkpoint"] = checkpoint
    plain = pixels(graphed.run(parse_job(job)))
    loaded, _ = graphed.checkpoint(checkpoint)
    captures = loaded.graphs.captures
    rescaled = parse_job({**job, "guidance_rescale": 0.7})
    graphed_rescaled = pixels(graphed.run(rescaled))
    assert loaded.graphs.captures == captures  # the same graph, the rescale around it
    assert (graphed_rescaled != plain).any()
    assert np.abs(graphed_rescaled - pixels(eager.run(rescaled))).max() <= 4
    assert (pixels(graphed.run(parse_job(job))) == plain).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_compiled_worker_rescales_a_new_shape_compiled_and_saved_as_any(
    cuda_engines, settings, tmp_path
):
    """With COMPILE=1 the rescale's wrapper is the UNet's `forward` while a new shape is
    compiled, saved for later workers and captured; it must stay out of all three."""
    from dataclasses import replace

    import numpy as np

    from handler.engine import Engine

    _, eager = cuda_engines
    compiled = Engine(
        replace(settings, device="cuda", compile=True, compile_cache_dir=str(tmp_path))
    )
    job = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 3, "seed": 5}
    job["checkpoint"] = "demo-sd15"
    plain = pixels(compiled.run(parse_job(job)))
    wide = parse_job({**job, "width": 96, "guidance_rescale": 0.7})  # a new shape, rescaled
    rescaled = pixels(compiled.run(wide))
    loaded, _ = compiled.checkpoint("demo-sd15")
    assert loaded.graphs.compiled
    assert len(list(tmp_path.glob("*/precompiled/unet-*.bin"))) == 2
    assert not list(tmp_path.glob("*/precompiled/*.failed"))
    assert np.abs(rescaled - pixels(eager.run(wide))).max() <= 4
    assert "forward" in loaded.pipeline.unet.__dict__  # the graphs, put back
    assert loaded.pipeline.unet.forward is loaded.graphs
    assert (pixels(compiled.run(parse_job(job))) == plain).all()
