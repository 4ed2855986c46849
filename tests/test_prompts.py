"""A1111 prompt syntax and long prompts: parsing, and what reaches the image."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from handler.prompts import check_syntax, parse_attention, tokenize_chunks
from handler.schema import parse_job


# The examples A1111 documents for its parser, with its outputs.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parser_matches_a1111_examples(text, expected):
    parsed = parse_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


def test_a_weight_of_minus_one_is_text_not_a_break_and_a_lone_backslash_is_dropped(engine):
    # as A1111: a BREAK is the word BREAK at weight -1, not any run at weight -1
    assert parse_attention("(cat:-1) dog") == [("cat", -1.0), (" dog", 1.0)]
    assert parse_attention("a \\ b") == [("a  b", 1.0)]
    loaded, _ = engine.checkpoint("demo-sd15")
    chunks = tokenize_chunks("(cat:-1) dog", loaded.pipeline.tokenizer)
    cat = loaded.pipeline.tokenizer("cat", add_special_tokens=False).input_ids
    assert len(chunks.ids) == 1 and chunks.ids[0][1 : 1 + len(cat)] == cat
    assert chunks.weights[0][1] == -1.0


def test_break_starts_a_new_window(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    chunks = tokenize_chunks("a cat BREAK a dog", loaded.pipeline.tokenizer)
    assert len(chunks.ids) == 2 and all(len(ids) == 77 for ids in chunks.ids)


def test_long_prompts_are_chunked_not_truncated(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    long_text = ", ".join(f"word{i}" for i in range(60))
    chunks = tokenize_chunks(long_text, loaded.pipeline.tokenizer)
    tokens = len(loaded.pipeline.tokenizer(long_text, add_special_tokens=False).input_ids)
    assert tokens > 75 and len(chunks.ids) == -(-tokens // 75)


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_a_prompt_of_too_many_windows_is_refused_before_any_step(engine, checkpoint):
    """`BREAK ` 3,300 times (under the character cap) made 3,300 windows and held a worker
    for minutes; a long prompt of words (about 135 windows at the character cap) still runs.
    Counted on the texts the encoder takes: a prompt edit's or an alternation's, with the
    BREAKs inside their brackets."""
    from handler.errors import InvalidInput
    from handler.prompts import MAX_WINDOWS

    too_long = "x BREAK " * MAX_WINDOWS + "y"
    phases = []
    cases = [("prompt", too_long), ("negative_prompt", too_long)]
    cases += [("prompt", f"[{too_long}:z:0.9]"), ("negative_prompt", f"[{too_long}|z]")]
    for field, text in cases:
        job = {"prompt": "a cube", field: text, "width": 64, "height": 64, "steps": 2}
        with pytest.raises(InvalidInput, match=f"{MAX_WINDOWS + 1} windows") as info:
            engine.run(
                parse_job({**job, "checkpoint": checkpoint}),
                progress=lambda update: phases.append(update.phase),
            )
        assert info.value.field == field and f"at most {MAX_WINDOWS} windows" in info.value.accepted
    assert phases and "denoising" not in phases  # refused before the first step
    longest = "x BREAK " * (MAX_WINDOWS - 1) + "y"
    assert run(engine, checkpoint, longest).shape == (64, 64, 3)
    # an edit's two texts are each within the limit, together they are not: it runs
    edit = "[" + "x BREAK " * 80 + "y:" + "z BREAK " * 80 + "y:0.5]"
    assert run(engine, checkpoint, edit).shape == (64, 64, 3)


def pixels(result) -> np.ndarray:
    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def run(engine, checkpoint, prompt, **extra):
    return pixels(
        engine.run(
            parse_job(
                {
                    "prompt": prompt,
                    "width": 64,
                    "height": 64,
                    "steps": 2,
                    "seed": 3,
                    "checkpoint": checkpoint,
                    **extra,
                }
            )
        )
    )


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sd2-768-v", "demo-sdxl"])
def test_weight_one_through_our_encoder_equals_diffusers_encoding(engine, checkpoint):
    assert (run(engine, checkpoint, "a (cube:1.0)") == run(engine, checkpoint, "a cube")).all()


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sd2-768-v"])
def test_clip_skip_2_is_diffusers_clip_skip_1(engine, checkpoint):
    """A1111's clip skip 2 is diffusers' clip_skip=1: the penultimate hidden state through the
    final layer norm. (diffusers' own encode_prompt(clip_skip=...) reaches for
    `text_encoder.text_model`, which transformers 5.6+ no longer has; hence our encoder.)"""
    import torch

    from handler.prompts import encode_sd

    loaded, _ = engine.checkpoint(checkpoint)
    pipeline = loaded.pipeline
    ours = encode_sd(pipeline, "a red cube", "", clip_skip=2)["prompt_embeds"]
    ids = pipeline.tokenizer(
        "a red cube", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = pipeline.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        reference = pipeline.text_encoder.final_layer_norm(hidden)
    torch.testing.assert_close(ours, reference)


def test_sdxl_clip_skip_2_is_its_usual_layer_as_in_a1111_and_comfyui(engine):
    """SDXL already uses the penultimate layer, which is A1111's and ComfyUI's clip skip 2 (the
    setting Pony models ask for): it must give the same image as no clip skip, through
    diffusers' plain path and through our own encoder (A1111 weights). It used to go one layer
    further back."""
    for prompt in ("a cube", "a (cube:1.2)"):
        assert (
            run(engine, "demo-sdxl", prompt, clip_skip=2) == run(engine, "demo-sdxl", prompt)
        ).all()


def test_sdxl_clip_skip_3_goes_one_layer_further_back_in_both_encoders(engine):
    import torch

    from handler.prompts import encode_sdxl

    pipeline = engine.checkpoint("demo-sdxl")[0].pipeline
    ours = encode_sdxl(pipeline, "a red cube", "a blue cube", clip_skip=3)
    references = []
    for tokenizer, encoder in (
        (pipeline.tokenizer, pipeline.text_encoder),
        (pipeline.tokenizer_2, pipeline.text_encoder_2),
    ):
        ids = tokenizer(
            "a red cube", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            references.append(encoder(ids, output_hidden_states=True).hidden_states[-3])
    torch.testing.assert_close(ours["prompt_embeds"], torch.cat(references, dim=-1))
    usual = encode_sdxl(pipeline, "a red cube", "a blue cube", clip_skip=2)["prompt_embeds"]
    assert (usual - ours["prompt_embeds"]).abs().max() > 0.1


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sd2-768-v"])
def test_weights_still_apply_with_clip_skip_2(engine, checkpoint):
    """The weights are applied after the final layer norm, as A1111 does; before it, the norm
    undid them (the embeddings differed by 5e-5 instead of about 20)."""
    import torch

    from handler.prompts import encode_sd

    loaded, _ = engine.checkpoint(checkpoint)
    weighted, plain = (
        encode_sd(loaded.pipeline, text, "", clip_skip=2)["prompt_embeds"]
        for text in ("(cat:1.5) dog", "cat dog")
    )
    assert (weighted - plain).abs().max() > 0.1
    with torch.no_grad():  # unweighted tokens are the reference's, up to the mean restore
        reference = encode_sd(loaded.pipeline, "(cat:1.0) dog", "", clip_skip=2)["prompt_embeds"]
    torch.testing.assert_close(reference, plain)
    image = run(engine, checkpoint, "a (cube:1.5)", clip_skip=2)
    assert np.abs(image - run(engine, checkpoint, "a cube", clip_skip=2)).max() > 8


def test_a_multi_vector_embedding_counts_its_vectors_toward_the_window(engine):
    """A negative prompt that fits 75 tokens only before its two-vector embedding is spelled
    out must be encoded here, chunked: diffusers cut its last word off (the images were equal)."""
    # with the embedding loaded its name is one token: 75 with the last word, 76 spelled out
    filler = "demo-sd15-embedding " + "a " * 73
    red = run(engine, "demo-sd15", "x", negative_prompt=filler + "red")
    big = run(engine, "demo-sd15", "x", negative_prompt=filler + "big")
    assert np.abs(red - big).max() > 0  # the last word reaches the image


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_weights_and_break_change_the_image(engine, checkpoint):
    plain = run(engine, checkpoint, "a cube")
    assert np.abs(run(engine, checkpoint, "a (cube:1.5)") - plain).max() > 0
    assert np.abs(run(engine, checkpoint, "a BREAK cube") - plain).max() > 0


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sd2-768-v", "demo-sdxl"])
def test_words_after_token_75_reach_the_image(engine, checkpoint):
    head = ", ".join(f"word{i}" for i in range(60))
    first = run(engine, checkpoint, head + ", a red cube")
    second = run(engine, checkpoint, head + ", a blue sphere")
    assert np.abs(first - second).max() > 0  # truncating at 77 tokens would make them equal


def test_weighting_never_blows_the_embeddings_up(engine):
    # On the demo's random encoder this prompt's weighted mean is about zero: restoring the
    # mean by dividing by it gave non-finite embeddings, hence black images.
    import torch

    from handler.prompts import encode_sd

    prompt = ", ".join(["a very detailed (masterpiece:1.2) [cube]"] * 5)
    loaded, _ = engine.checkpoint("demo-sd15")
    embeds = encode_sd(loaded.pipeline, prompt, "", clip_skip=1)["prompt_embeds"]
    assert torch.isfinite(embeds).all() and embeds.abs().max() < 1e3
    image = run(engine, "demo-sd15", prompt)
    assert image.max() > 0  # not black


def test_a_non_finite_image_is_reported_in_the_warnings(engine, monkeypatch):
    import torch

    from handler.pipelines import LatentDecoder

    original = LatentDecoder._decode

    def nan_decode(self, latents):
        return torch.full_like(original(self, latents), float("nan"))

    monkeypatch.setattr(LatentDecoder, "_decode", nan_decode)
    job = dict(prompt="x", width=64, height=64, steps=1, seed=3, num_images=2)
    result = engine.run(parse_job({**job, "checkpoint": "demo-sd15"}))
    assert len(result.images) == 2
    assert [w for w in result.warnings if "non-finite" in w] == [
        "image 0 (seed 3): the model produced non-finite values (NaN or inf); those pixels are "
        "black",
        "image 1 (seed 4): the model produced non-finite values (NaN or inf); those pixels are "
        "black",
    ]


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("prompt", "a [cat:dog:0.5]"),
        ("prompt", "a [cat:3]"),
        ("negative_prompt", "[blurry::0.2]"),
        ("prompt", "a [cat|dog]"),
        ("prompt", "((a [cat|dog]))"),
    ],
)
def test_prompt_editing_and_alternation_run_not_read_as_text(engine, field, text):
    """They used to be refused; now they run (tests/test_prompt_editing.py), and the image is
    not the one of the same prompt read as text (brackets escaped)."""
    literal = text.replace("[", "\\[").replace("]", "\\]")

    def image(value: str) -> np.ndarray:
        fields = {"prompt": "x", field: value}
        return run(engine, "demo-sd15", fields.pop("prompt"), **fields)

    assert np.abs(image(text) - image(literal)).max() > 0


def test_brackets_that_are_not_prompt_editing_still_run(engine):
    # a weight inside square brackets, and escaped brackets, are not prompt editing
    weighted = run(engine, "demo-sd15", "a [(cube:1.2)]")
    assert np.abs(weighted - run(engine, "demo-sd15", "a (cube:1.2)")).max() > 0
    run(engine, "demo-sd15", "a \\[cube:red\\]")


def test_other_extra_network_tags_are_removed_with_a_warning_and_and_is_named(engine):
    job = {"width": 64, "height": 64, "steps": 2, "seed": 3, "checkpoint": "demo-sd15"}
    tagged = engine.run(parse_job({**job, "prompt": "a cube <hypernet:anime:0.8>"}))
    plain = engine.run(parse_job({**job, "prompt": "a cube"}))
    assert (pixels(tagged) == pixels(plain)).all()
    assert tagged.warnings == [
        "prompt: <hypernet:...> tags removed: only LoRA extra networks are supported"
    ]
    # a tag of a kind A1111 does not know is named only as "other": its name is prompt text
    _, warnings = check_syntax("my pin is <PIN4711:x> and <hypernet:a:1>", "prompt")
    assert warnings == [
        "prompt: <hypernet:...>, other tags removed: only LoRA extra networks are supported"
    ]
    text, _ = check_syntax("a cube, <hypernet:x:1>\nsecond line\n\nthird", "prompt")
    assert text == "a cube, \nsecond line\n\nthird"  # its line breaks stay, as in A1111
    composed = engine.run(parse_job({**job, "prompt": "a cube AND a sphere"}))
    assert any("AND (A1111's composable diffusion)" in w for w in composed.warnings)


@pytest.mark.parametrize(
    "prompt",
    [
        "MARKER a castle <hypernet:style MARKER2 at night, detailed> end",
        "MARKER <lora:demo_sd15_kohya:0.8 a castle MARKER2 at night> end",
        "MARKER <lora:MARKER2 a red car>",
    ],
)
def test_errors_and_warnings_never_quote_prompt_text(engine, prompt):
    """A tag missing its `>` runs on into the prompt: messages name the tag by number and kind,
    since the Cog server logs them (prompts stay out of logs)."""
    from handler.errors import WorkerError

    job = {"width": 64, "height": 64, "steps": 1, "checkpoint": "demo-sd15", "prompt": prompt}
    try:
        result = engine.run(parse_job(job))
        texts = result.warnings
    except WorkerError as error:
        texts = [str(error)]
    assert texts and not any("MARKER" in text for text in texts)


def test_prompts_that_would_take_the_worker_down_are_refused_before_the_load(engine, monkeypatch):
    """From a security audit: brackets nested past Python's recursion limit were internal_error
    after the load; unclosed tags took time quadratic in their number; prompts had no length
    bound. Each is invalid_input on its field now."""
    from handler.errors import InvalidInput

    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(engine, "checkpoint", no_load)
    job = {"width": 64, "height": 64, "steps": 1, "checkpoint": "demo-sd15"}
    cases = [
        ("prompt", "[" * 600, "nested at most"),
        ("negative_prompt", "(" * 51 + "x", "nested at most"),
        ("prompt", "<lora:" * 3000, "<lora:name>"),
        ("prompt", "x" * 20_001, "at most 20000 characters"),  # the README's figure
    ]
    assert parse_job({"prompt": "x" * 20_000}).prompt == "x" * 20_000
    for field, text, accepted in cases:
        with pytest.raises(InvalidInput) as info:
            engine.run(parse_job({"prompt": "x", **job, field: text}))
        assert info.value.field == field and accepted in info.value.accepted
    # fifty deep is still a prompt, and an unclosed tag's text stays out of the message
    from handler.prompts import check_syntax

    assert check_syntax("(" * 50 + "x", "prompt")[0] == "(" * 50 + "x"
    with pytest.raises(InvalidInput) as info:
        engine.run(parse_job({**job, "prompt": "<lora:SECRET a castle, <lora:x:1>"}))
    assert "SECRET" not in str(info.value)
