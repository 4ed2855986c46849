"""A1111's prompt editing and alternation: the schedule, and what the UNet sees step by step."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.prompts import is_scheduled, prompt_schedule
from handler.schema import parse_job

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# The examples of A1111's prompt_parser docstring (10 steps), as facts.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
        ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
        # numbers past either end switch there (1e999 is an infinite float)
        ("a [b:c:1e999]", [(10, "a b")]),
        ("a [b:c:1" + "0" * 400 + "]", [(10, "a b")]),
        ("[a::1e999]", [(10, "a")]),
        ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
        # A1111's wiki example (100 steps)
        (
            "a [fantasy:cyberpunk:16] landscape",
            [(16, "a fantasy landscape"), (100, "a cyberpunk landscape")],
        ),
    ],
)
def test_schedules_match_a1111s_examples(text, expected):
    steps = 100 if "fantasy" in text else 10
    assert prompt_schedule(text, steps) == expected


def test_a1111s_long_example_and_the_hires_pass_offsets():
    text = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]
    # the hires pass (10 steps after 10): fractions count from 1.0, integers from the first pass
    assert prompt_schedule("a [b:.5] c", 10, 10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:13] c", 10, 10) == [(3, "a  c"), (10, "a b c")]
    # in the first pass, a `when` past the end is capped: the edit never happens
    assert prompt_schedule("a [b:1.5] c", 10) == [(10, "a  c")]
    assert prompt_schedule("[a:b:0.5]", 10) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:5]", 10) == [(5, "a"), (10, "b")]


@pytest.mark.parametrize(
    "text",
    [
        "a [cube] (red:1.2)",  # emphasis
        "a \\[cat:dog:2\\]",  # escaped brackets
        "a [(cube:1.2)]",  # a weight inside square brackets
        "a [cat:dog]",  # no number: text, as A1111 reads it
        "x | y [cat:dog:2]",  # a `|` outside brackets: A1111's grammar fails, all is text
        "a [cat:dog:2",  # unclosed
    ],
)
def test_what_a1111_reads_as_text_is_not_scheduled(text):
    assert not is_scheduled(text)
    assert prompt_schedule(text, 10) == [(10, text)]


def test_nesting_and_emphasis_around_edits():
    assert is_scheduled("(a [b:c:5]:1.2)")
    assert prompt_schedule("(a [b:c:5]:1.2)", 10) == [(5, "(a b:1.2)"), (10, "(a c:1.2)")]
    assert prompt_schedule("[[a|b]:c:2]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "c")]


# -- the engine ----------------------------------------------------------------------------


def pixels(result) -> np.ndarray:
    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# Euler on diffusers' "leading" spacing: its last of 4 steps, at timestep 1, still moves the
# image by a level or more, so an edit that starts there shows (A1111's Uniform ends at 0)
JOB = {"width": 64, "height": 64, "steps": 4, "seed": 3, "scheduler": "Euler DDIM"}


def unet_calls(engine, checkpoint: str, **job):
    """Run a job; returns (image, the UNet's encoder_hidden_states per call, pooled per call)."""
    hidden, pooled = [], []

    def record(module, args, kwargs):
        hidden.append(kwargs["encoder_hidden_states"].clone())
        added = kwargs.get("added_cond_kwargs")
        if added:
            pooled.append(added["text_embeds"].clone())

    unets = [engine.checkpoint(checkpoint)[0].pipeline.unet]
    if job.get("refiner_checkpoint"):
        unets.append(engine.checkpoint(job["refiner_checkpoint"])[0].pipeline.unet)
    hooks = [u.register_forward_pre_hook(record, with_kwargs=True) for u in unets]
    try:
        result = engine.run(parse_job({**JOB, "checkpoint": checkpoint, **job}))
    finally:
        for hook in hooks:
            hook.remove()
    return pixels(result), hidden, pooled


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a == b).all())


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_an_edit_switches_the_prompt_at_a1111s_step(engine, checkpoint):
    """[a cat:a dog:0.5] over 4 steps: A1111's boundary is step 2, and 0-based sampler steps
    0, 1, 2 (those <= 2) use "a cat", step 3 "a dog"; SDXL's pooled embeddings switch too."""
    image, hidden, pooled = unet_calls(engine, checkpoint, prompt="[a cat:a dog:0.5]")
    cat_image, cat, cat_pooled = unet_calls(engine, checkpoint, prompt="a cat")
    dog_image, dog, dog_pooled = unet_calls(engine, checkpoint, prompt="a dog")
    assert len(hidden) == 4
    assert [equal(h, c) for h, c in zip(hidden, cat, strict=True)] == [True, True, True, False]
    assert equal(hidden[3], dog[3])
    if checkpoint == "demo-sdxl":
        assert [equal(p, c) for p, c in zip(pooled, cat_pooled, strict=True)] == [1, 1, 1, 0]
        assert equal(pooled[3], dog_pooled[3])
    assert np.abs(image - cat_image).max() > 0 and np.abs(image - dog_image).max() > 0


def test_a_second_order_sampler_counts_two_steps_a_step_as_a1111(engine):
    """Heun's 4 steps make 7 UNet calls; A1111 schedules its prompts over 8 steps (its
    step_multiplier), so [a cat:a dog:0.5] switches after call 4 (0-based), not after call 2."""
    heun = {"scheduler": "Heun"}
    _, hidden, _ = unet_calls(engine, "demo-sd15", prompt="[a cat:a dog:0.5]", **heun)
    _, cat, _ = unet_calls(engine, "demo-sd15", prompt="a cat", **heun)
    _, dog, _ = unet_calls(engine, "demo-sd15", prompt="a dog", **heun)
    assert len(hidden) == 7
    assert [equal(h, c) for h, c in zip(hidden, cat, strict=True)] == [1, 1, 1, 1, 1, 0, 0]
    assert equal(hidden[5], dog[5]) and equal(hidden[6], dog[6])


def test_alternation_alternates_every_step(engine):
    # A1111: step s uses the entry ending at max(s, 1): cat (s=0), cat, dog, cat
    _, hidden, _ = unet_calls(engine, "demo-sd15", prompt="[a cat|a dog]")
    _, cat, _ = unet_calls(engine, "demo-sd15", prompt="a cat")
    _, dog, _ = unet_calls(engine, "demo-sd15", prompt="a dog")
    assert [equal(h, c) for h, c in zip(hidden, cat, strict=True)] == [1, 1, 0, 1]
    assert equal(hidden[2], dog[2])


def test_the_negative_prompt_is_scheduled_too(engine):
    _, hidden, _ = unet_calls(engine, "demo-sd15", prompt="x", negative_prompt="[blurry::1]")
    _, blurry, _ = unet_calls(engine, "demo-sd15", prompt="x", negative_prompt="blurry")
    _, empty, _ = unet_calls(engine, "demo-sd15", prompt="x", negative_prompt=" ")
    negative = [h[0] for h in hidden]  # [negative, positive] under guidance
    assert equal(negative[0], blurry[0][0]) and equal(negative[1], blurry[1][0])
    assert not equal(negative[2], blurry[2][0])
    assert equal(hidden[2][1], blurry[2][1])  # the prompt stays


def test_img2img_counts_the_schedule_from_its_first_step_as_a1111(engine):
    """8 steps at strength 0.5 run 4; A1111's sampler counts them 0..3 against the schedule
    of all 8 steps: "[a cat:a dog:2]" gives cat, cat, cat, dog."""
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    job = {"steps": 8, "strength": 0.5, "image": image}
    _, hidden, _ = unet_calls(engine, "demo-sd15", prompt="[a cat:a dog:2]", **job)
    _, cat, _ = unet_calls(engine, "demo-sd15", prompt="a cat", **job)
    assert [equal(h, c) for h, c in zip(hidden, cat, strict=True)] == [1, 1, 1, 0]


def test_the_hires_pass_has_its_own_schedule(engine):
    """1.5 is past the first pass (all "a cat") and halfway through the hires pass's 4 steps."""
    hires = {"hires": {"scale": 1.5, "strength": 0.5, "steps": 4}}
    _, hidden, _ = unet_calls(engine, "demo-sd15", prompt="[a cat:a dog:1.5]", **hires)
    _, cat, _ = unet_calls(engine, "demo-sd15", prompt="a cat", **hires)
    assert len(hidden) == 8
    assert [equal(h, c) for h, c in zip(hidden, cat, strict=True)] == [1] * 7 + [0]


def test_the_refiner_goes_on_with_the_bases_schedule(engine):
    """Ensemble at 0.5 over 4 steps: the base runs steps 0-1, the refiner 2-3 (as A1111's
    refiner takes over mid-run, counting on): "[a cat:a dog:2]" switches on its second."""
    job = {"refiner_checkpoint": "demo-sdxl-refiner", "high_noise_frac": 0.5}
    _, hidden, pooled = unet_calls(engine, "demo-sdxl", prompt="[a cat:a dog:2]", **job)
    _, cat, cat_pooled = unet_calls(engine, "demo-sdxl", prompt="a cat", **job)
    _, dog, _ = unet_calls(engine, "demo-sdxl", prompt="a dog", **job)
    assert len(hidden) == 4
    assert [equal(h, c) for h, c in zip(hidden, cat, strict=True)] == [1, 1, 1, 0]
    assert equal(hidden[3], dog[3])
    assert [equal(p, c) for p, c in zip(pooled, cat_pooled, strict=True)] == [1, 1, 1, 0]


def test_a_refiner_with_its_own_step_count_reaches_the_bases_later_steps(engine):
    """Ensemble at 0.5 over 8 steps, the refiner's schedule 4 steps long: the base runs steps
    0-3, the refiner's two steps stand for the base's steps 4 and 6; "[a cat:a dog:5]" is a
    dog from step 6, so on the refiner's second step (counted in refiner steps, never)."""
    job = {
        "steps": 8,
        "refiner_checkpoint": "demo-sdxl-refiner",
        "high_noise_frac": 0.5,
        "refiner_inference_steps": 4,
    }
    _, hidden, _ = unet_calls(engine, "demo-sdxl", prompt="[a cat:a dog:5]", **job)
    _, cat, _ = unet_calls(engine, "demo-sdxl", prompt="a cat", **job)
    _, dog, _ = unet_calls(engine, "demo-sdxl", prompt="a dog", **job)
    assert len(hidden) == 6
    assert [equal(h, c) for h, c in zip(hidden, cat, strict=True)] == [1, 1, 1, 1, 1, 0]
    assert equal(hidden[5], dog[5])


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_an_alternation_holds_each_texts_embeddings_once(engine, checkpoint):
    """150 steps of [a|b] for 8 images: 150 schedule entries share two texts' tensors, not a
    batch-sized copy per step (on a real SDXL, gigabytes of GPU memory)."""
    from handler.engine import Engine
    from handler.pipelines import pipeline_for

    pipeline = pipeline_for(engine.checkpoint(checkpoint)[0], "txt2img")
    job = parse_job({**JOB, "checkpoint": checkpoint, "prompt": "[a cat|a dog]", "steps": 150})
    schedule = Engine._prompt_steps(pipeline, job, 8, 150)
    assert len(schedule.ends) == 150
    tensors = [t for args in schedule.args for t in args.values()]
    assert all(t.shape[0] == 8 for t in tensors)
    assert len({t.data_ptr() for t in tensors}) <= 6  # a cat, a dog, the negative


def test_plain_prompts_take_the_usual_path_and_nothing_leaks_into_the_next_job(engine, monkeypatch):
    before, plain, _ = unet_calls(engine, "demo-sd15", prompt="a cat")
    unet_calls(engine, "demo-sd15", prompt="[a cat|a dog]", negative_prompt="[x:y:1]")
    after, again, _ = unet_calls(engine, "demo-sd15", prompt="a cat")
    assert (before == after).all()
    assert all(equal(a, b) for a, b in zip(plain, again, strict=True))

    from handler.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("a prompt without editing was scheduled")

    monkeypatch.setattr(Engine, "_prompt_steps", staticmethod(refuse))
    for prompt in ("a (cube:1.2) [red]", "a \\[cat:dog:2\\]", "x | y [cat:dog:2]"):
        unet_calls(engine, "demo-sd15", prompt=prompt)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_prompt_editing_runs_graphed_as_eager(cuda_engines, checkpoint):
    """The schedule's embeddings replace the loop's between steps: the captured CUDA graph
    must read them (same shape, new values) as eager mode does, and capture no new shape."""
    graphed, eager = cuda_engines
    job = parse_job(
        {
            **JOB,
            "checkpoint": checkpoint,
            "prompt": "a [red cube:blue sphere BREAK studio light:0.5] [day|night]",
            "negative_prompt": "[blurry::2]",
        }
    )
    plain = parse_job({**JOB, "checkpoint": checkpoint, "prompt": "a red cube"})
    first, again = pixels(graphed.run(job)), pixels(graphed.run(job))
    assert (first == again).all()
    assert np.abs(first - pixels(eager.run(job))).max() <= 4
    assert np.abs(first - pixels(graphed.run(plain))).max() > 0
