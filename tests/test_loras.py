"""Per-job LoRA stacks, embeddings, VAE and clip skip: applied for one job, gone after it."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.errors import InvalidInput, LoraIncompatible, ModelNotFound
from handler.loras import extract_inline_loras
from handler.outputs import read_infotext
from handler.schema import parse_job

SD15 = {
    "prompt": "a cube",
    "width": 64,
    "height": 64,
    "steps": 2,
    "seed": 21,
    "checkpoint": "demo-sd15",
}
SDXL = {**SD15, "checkpoint": "demo-sdxl"}


def pixels(result, index=0) -> np.ndarray:
    data = base64.b64decode(result.images[index].image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weights (resident, disabled LoRA adapters excluded)."""
    return {
        k.replace(".base_layer", ""): v.clone()
        for k, v in module.state_dict().items()
        if "lora_" not in k
    }


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inline_tags_are_parsed_and_removed():
    prompt, loras = extract_inline_loras("a cube <lora:styles/ink:0.6>, sharp <lora:demo>")
    assert prompt == "a cube , sharp" and loras == [("styles/ink", 0.6), ("demo", 1.0)]
    # the prompt's line breaks stay, for the infotext (A1111 keeps them); spaces collapse
    prompt, _ = extract_inline_loras("a cube, <lora:ink:0.5>\nsecond line\n\nthird")
    assert prompt == "a cube, \nsecond line\n\nthird"


def test_inline_tag_forms_a1111_and_lycoris_write():
    _, loras = extract_inline_loras(
        "<LORA:a:0.5> <lyco:b> <lora:c:0.7:0.7> <lora:d:te=0.3:unet=0.3> <Lora:e:-1>"
    )
    assert loras == [("a", 0.5), ("b", 1.0), ("c", 0.7), ("d", 0.3), ("e", -1.0)]


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("<lora:ink:abc>", "not a number"),
        ("<lora:ink:1:0.5>", "separate text-encoder and UNet weights"),
        ("<lora:ink:te=1:unet=0.2>", "separate text-encoder and UNet weights"),
        ("<lora:ink:1:1:32>", "not a LoRA tag this worker reads"),
        ("<lora:ink:dyn=32>", "not a LoRA tag this worker reads"),
        ("<lora::1>", "not a LoRA tag this worker reads"),
        ("<lora:ink:5>", "out of range"),
    ],
)
def test_inline_tags_that_cannot_be_applied_as_written_are_refused(tag, message):
    with pytest.raises(InvalidInput) as raised:
        extract_inline_loras(f"a cube {tag}", "prompt")
    assert message in str(raised.value) and raised.value.field == "prompt"
    assert "<lora:name:scale>" in raised.value.accepted


def test_inline_scale_bound_is_the_loras_list_bound():
    from handler.loras import MAX_LORA_SCALE
    from handler.schema import LoraSpec

    rules = LoraSpec.model_fields["scale"].metadata
    assert {getattr(r, "ge", None) for r in rules} >= {-MAX_LORA_SCALE}
    assert {getattr(r, "le", None) for r in rules} >= {MAX_LORA_SCALE}


def test_a_lora_tag_in_the_negative_prompt_is_removed_with_a_warning(engine):
    job = {**SD15, "negative_prompt": "blurry <lora:demo_sd15_kohya:1>"}
    result = engine.run(parse_job(job))
    plain = engine.run(parse_job({**SD15, "negative_prompt": "blurry"}))
    assert any("LoRA tags in negative_prompt" in w for w in result.warnings)
    assert (pixels(result) == pixels(plain)).all()


@pytest.mark.parametrize(
    ("base", "lora"),
    [
        (SD15, "demo_sd15_kohya"),
        (SD15, "demo_sd15_peft"),
        (SDXL, "demo_sdxl_kohya"),
        (SDXL, "demo_sdxl_peft"),
    ],
)
def test_lora_changes_the_image_and_leaves_no_trace(engine, base, lora):
    loaded, _ = engine.checkpoint(base["checkpoint"])
    unet_before = weights(loaded.pipeline.unet)
    text_before = weights(loaded.pipeline.text_encoder)
    plain = engine.run(parse_job(base))
    with_lora = engine.run(parse_job({**base, "loras": [{"name": lora, "scale": 1.0}]}))
    after = engine.run(parse_job(base))
    assert np.abs(pixels(with_lora) - pixels(plain)).max() > 0, "the LoRA had no effect"
    assert (pixels(after) == pixels(plain)).all(), "LoRA state leaked into the next job"
    assert same_weights(weights(loaded.pipeline.unet), unet_before)
    assert same_weights(weights(loaded.pipeline.text_encoder), text_before)


def test_job_after_lora_job_matches_a_fresh_worker(settings, engine):
    """Bit-identical to the same job on a worker that never saw a LoRA."""
    from dataclasses import replace

    from handler.engine import Engine

    engine.run(
        parse_job(
            {
                **SD15,
                "loras": [
                    {"name": "demo_sd15_kohya", "scale": 0.8},
                    {"name": "demo_sd15_peft", "scale": 0.5},
                ],
            }
        )
    )
    after = engine.run(parse_job(SD15))
    fresh = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0)).run(parse_job(SD15))
    assert (pixels(after) == pixels(fresh)).all()


def test_inline_tag_equals_the_loras_field(engine):
    tagged = engine.run(parse_job({**SD15, "prompt": "a cube <lora:demo_sd15_kohya:0.7>"}))
    listed = engine.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_kohya", "scale": 0.7}]}))
    assert (pixels(tagged) == pixels(listed)).all()


def test_a_lora_listed_twice_applies_at_the_sum_of_its_scales(engine):
    def run(*scales):
        loras = [{"name": "demo_sd15_kohya", "scale": scale} for scale in scales]
        return pixels(engine.run(parse_job({**SD15, "loras": loras})))

    twice = run(0.35, 0.35)
    assert (twice == run(0.7)).all() and (twice != run(0.35)).any()


def test_stack_of_two_in_both_formats_and_infotext_lists_them(engine):
    result = engine.run(
        parse_job(
            {
                **SD15,
                "loras": [
                    {"name": "demo_sd15_kohya", "scale": 0.5},
                    {"name": "demo_sd15_peft", "scale": -0.5},
                ],
            }
        )
    )
    infotext = read_infotext(base64.b64decode(result.images[0].image.split(",", 1)[1]))
    assert "<lora:demo_sd15_kohya:0.5>" in infotext and "<lora:demo_sd15_peft:-0.5>" in infotext
    kohya, peft = (tensor_data_hash(engine, name) for name in ("demo_sd15_kohya", "demo_sd15_peft"))
    assert f'Lora hashes: "demo_sd15_kohya: {kohya}, demo_sd15_peft: {peft}"' in infotext


def tensor_data_hash(engine, name: str) -> str:
    """A1111's `Lora hashes` entry, computed here as kohya defines it: the first 12 hex digits
    of the sha256 of the safetensors file after its 8-byte length and its header."""
    import hashlib
    import struct

    data = engine.registry.resolve("lora", name, "loras").path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


def test_lora_hash_is_the_recorded_one_when_the_file_has_it(settings, tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    from handler.registry import Registry

    (tmp_path / "loras").mkdir()
    recorded = "0123456789abcdef" * 4
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 4)}
    save_file(tensors, str(tmp_path / "loras" / "kohya.safetensors"), {"sshs_model_hash": recorded})
    save_file(tensors, str(tmp_path / "loras" / "plain.safetensors"))
    registry = Registry(replace(settings, models_dir=str(tmp_path)))
    assert registry.lora_hash(registry.resolve("lora", "kohya", "loras")) == "0123456789ab"
    plain = registry.resolve("lora", "plain", "loras")
    computed = registry.lora_hash(plain)
    assert len(computed) == 12 and computed != registry.cached_hash(plain)
    # kept in the root's hash file beside the AutoV2 hash: a new worker does not read the file
    fresh = Registry(replace(settings, models_dir=str(tmp_path)))
    fresh.compute_hash = None  # would fail if called
    assert fresh.lora_hash(fresh.resolve("lora", "plain", "loras")) == computed


def test_incompatible_lora_fails_before_the_pipeline_is_touched(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    before = weights(loaded.pipeline.unet)
    with pytest.raises(LoraIncompatible) as info:
        engine.run(parse_job({**SD15, "loras": [{"name": "demo_sdxl_kohya"}]}))
    assert info.value.field == "loras[0].name" and "sdxl" in info.value.message
    assert same_weights(weights(loaded.pipeline.unet), before)


LYCORIS_KEYS = {  # one layer of each algorithm, named as LyCORIS writes its kohya-style files
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LoKr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
    "full-weight difference": ("diff", "diff_b"),
    "DoRA": ("lora_down.weight", "lora_up.weight", "dora_scale"),
}


@pytest.mark.parametrize("algorithm", sorted(LYCORIS_KEYS))
def test_lycoris_files_diffusers_cannot_load_are_named_as_such(engine, demo_volume, algorithm):
    """They failed inside diffusers with 'keys have not been correctly renamed'."""
    from safetensors.torch import save_file

    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{layer}.{part}": torch.ones(4, 4) for part in LYCORIS_KEYS[algorithm]}
    path = demo_volume / "loras" / f"lycoris_{algorithm.split()[0].lower()}.safetensors"
    save_file({**tensors, f"{layer}.alpha": torch.tensor(4.0)}, str(path))
    loaded, _ = engine.checkpoint("demo-sd15")
    before = weights(loaded.pipeline.unet)
    try:
        with pytest.raises(LoraIncompatible) as info:
            engine.run(parse_job({**SD15, "prompt": f"a cube <lora:{path.stem}:0.8>"}))
        listed = next(e for e in engine.list_models()["loras"] if e["name"] == path.stem)
    finally:
        path.unlink()
    assert listed["base"] == "unsupported"
    assert listed["reason"] == f"a {algorithm} file (LyCORIS), which diffusers cannot load"
    assert info.value.field == "prompt"
    assert (
        info.value.message
        == f"{path.stem} is a {algorithm} file (LyCORIS), which diffusers cannot load"
    )
    assert "LoCon" in info.value.accepted
    assert same_weights(weights(loaded.pipeline.unet), before)


def test_a_lora_whose_keys_contain_diffusion_model_is_not_taken_for_lycoris():
    from handler.registry import lycoris_algorithm

    keys = {"model.diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": {}}
    assert lycoris_algorithm(keys) is None
    assert lycoris_algorithm({"lora_unet_x.diff_b": {}}) == "full-weight difference"


def test_unknown_lora_names_the_field_and_close_names(engine):
    with pytest.raises(ModelNotFound) as info:
        engine.run(parse_job({**SD15, "prompt": "x <lora:demo_sd15_kohy:1>"}))
    assert info.value.field == "prompt" and "demo_sd15_kohya" in info.value.accepted


def test_too_many_loras(engine):
    with pytest.raises(Exception) as info:
        parse_job({**SD15, "loras": [{"name": "demo_sd15_kohya"}] * 9})
    assert "loras" in str(info.value)


def test_lora_adapters_stay_resident_and_are_reused(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    first = engine.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_peft", "scale": 0.9}]}))
    names = dict(loaded.adapters.names)
    again = engine.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_peft", "scale": 0.9}]}))
    assert dict(loaded.adapters.names) == names  # no reload
    assert (pixels(first) == pixels(again)).all()
    other_scale = engine.run(
        parse_job({**SD15, "loras": [{"name": "demo_sd15_peft", "scale": 0.3}]})
    )
    assert np.abs(pixels(other_scale) - pixels(first)).max() > 0


def test_resident_adapters_stay_out_of_the_forward_path(settings):
    """After loading, peft's wrappers are taken out again: the models keep the structure they
    had before any LoRA (no wrapper overhead per job, and saved compiled code still fits), while
    the adapters stay registered and merge from the layers kept aside."""
    from dataclasses import replace

    from peft.tuners.tuners_utils import BaseTunerLayer

    from handler.engine import Engine

    own = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0))
    plain = own.run(parse_job(SDXL))
    loaded, _ = own.checkpoint("demo-sdxl")
    parts = [loaded.pipeline.unet, loaded.pipeline.text_encoder, loaded.pipeline.text_encoder_2]

    def structure():
        return [[(n, type(m)) for n, m in part.named_modules()] for part in parts]

    before = structure()
    kohya = {**SDXL, "loras": [{"name": "demo_sdxl_kohya", "scale": 1.0}]}
    with_lora = own.run(parse_job(kohya))
    with_other = own.run(parse_job({**SDXL, "loras": [{"name": "demo_sdxl_peft", "scale": -0.5}]}))
    assert structure() == before
    assert not any(isinstance(m, BaseTunerLayer) for part in parts for m in part.modules())
    adapters = loaded.pipeline.get_list_adapters()
    assert len(adapters["unet"]) == len(adapters["text_encoder"]) == 2
    assert len(loaded.adapters.layers) == 2
    assert np.abs(pixels(with_lora) - pixels(plain)).max() > 0
    assert np.abs(pixels(with_other) - pixels(with_lora)).max() > 0
    assert (pixels(own.run(parse_job(kohya))) == pixels(with_lora)).all()  # merged again
    assert (pixels(own.run(parse_job(SDXL))) == pixels(plain)).all()


def test_resident_adapters_are_bounded(settings):
    from dataclasses import replace

    from handler.engine import Engine

    small = Engine(replace(settings, resident_loras=1, gpu_checkpoints=1, cpu_checkpoints=0))
    small.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_peft"}]}))
    small.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_kohya"}]}))
    loaded, _ = small.checkpoint("demo-sd15")
    assert len(loaded.adapters.names) == 1
    assert len([n for n in loaded.pipeline.get_list_adapters().get("unet", [])]) == 1
    # a job with more LoRAs than that keeps them only while it runs
    both = [{"name": "demo_sd15_peft"}, {"name": "demo_sd15_kohya"}]
    stacked = small.run(parse_job({**SD15, "loras": both}))
    assert len(loaded.adapters.names) == 1
    assert len(loaded.pipeline.get_list_adapters().get("unet", [])) == 1
    again = small.run(parse_job({**SD15, "loras": both}))  # reloaded: the same image
    assert (pixels(again) == pixels(stacked)).all()


def test_lora_state_dicts_are_cached(engine):
    engine.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_peft"}]}))
    loads = engine.state_dicts.loads
    engine.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_peft"}]}))
    assert engine.state_dicts.loads == loads


def test_lora_is_removed_after_a_failed_job(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    plain = engine.run(parse_job(SD15))

    def fail(module, args):
        raise RuntimeError("injected failure inside the UNet")

    hook = loaded.pipeline.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError):
            engine.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_kohya"}]}))
    finally:
        hook.remove()
    assert not any(loaded.pipeline.get_list_adapters().values())  # a failed job drops them all
    assert (pixels(engine.run(parse_job(SD15))) == pixels(plain)).all()


@pytest.mark.parametrize(
    ("base", "embedding"), [(SD15, "demo-sd15-embedding"), (SDXL, "demo-sdxl-embedding")]
)
def test_embedding_by_name_in_the_prompt_then_removed(engine, base, embedding):
    loaded, _ = engine.checkpoint(base["checkpoint"])
    vocab = len(loaded.pipeline.tokenizer)
    plain = engine.run(parse_job({**base, "prompt": "a cube"}))
    used = engine.run(parse_job({**base, "prompt": f"a cube, {embedding}"}))
    word = engine.run(parse_job({**base, "prompt": "a cube, unknownword"}))
    assert np.abs(pixels(used) - pixels(word)).max() > 0
    assert len(loaded.pipeline.tokenizer) == vocab
    encoder = loaded.pipeline.text_encoder
    assert encoder.config.vocab_size == encoder.get_input_embeddings().weight.shape[0] == vocab
    assert (pixels(engine.run(parse_job({**base, "prompt": "a cube"}))) == pixels(plain)).all()


@pytest.mark.parametrize(
    ("base", "embedding"), [(SD15, "demo-sd15-embedding"), (SDXL, "demo-sdxl-embedding")]
)
def test_multi_vector_embeddings_use_every_vector_in_weighted_prompts(
    engine, base, embedding, monkeypatch
):
    """The demo embeddings have two vectors: our own encoder (which every prompt with one
    takes) must use both, as diffusers' plain encoding does, so the images are the same."""
    ours = engine.run(parse_job({**base, "prompt": f"a cube, {embedding}"}))
    weighted = engine.run(parse_job({**base, "prompt": f"a (cube:1.0), {embedding}"}))
    assert (pixels(weighted) == pixels(ours)).all()
    in_any_case = engine.run(parse_job({**base, "prompt": f"a cube, {embedding.upper()}"}))
    assert (pixels(in_any_case) == pixels(ours)).all()  # found, and spelled out, in any case
    # diffusers' own encoding, given the embedding's token as our encoder spells it
    from handler.prompts import embedding_token

    monkeypatch.setattr("handler.engine.needs_own_encoding", lambda *args: False)
    prompt = f"a cube, {embedding_token(embedding)}"
    diffusers_own = engine.run(parse_job({**base, "prompt": prompt}))
    assert (pixels(diffusers_own) == pixels(ours)).all()


def test_comfyuis_embedding_syntax_names_the_embedding(engine):
    """ComfyUI writes `embedding:name` (extension optional): the prefix was encoded as words
    beside the embedding. One that names no embedding is removed with a warning, as ComfyUI
    ignores it (a misspelt name ran as plain text, silently)."""
    base = {**SD15, "prompt": "a cube, demo-sd15-embedding"}
    ours = engine.run(parse_job(base))
    for written in ("embedding:demo-sd15-embedding", "EMBEDDING:demo-sd15-embedding.safetensors"):
        comfy = engine.run(parse_job({**base, "prompt": f"a cube, {written}"}))
        assert (pixels(comfy) == pixels(ours)).all() and not comfy.warnings
    plain = engine.run(parse_job({**SD15, "prompt": "a cube"}))
    missing = engine.run(parse_job({**SD15, "prompt": "a cube embedding:SECRET-misspelt"}))
    assert (pixels(missing) == pixels(plain)).all()
    assert any("name no embedding" in w for w in missing.warnings)
    assert not any("SECRET" in w for w in missing.warnings)


def test_a_multi_vector_embedding_is_spelled_out_only_as_a_whole_word(engine):
    """diffusers' maybe_convert_prompt replaces the name inside other words and names too
    (EasyNegative inside EasyNegativeV2); A1111 matches whole words, in any case."""
    from handler.prompts import embedding_token, with_embedding_tokens

    loaded, _ = engine.checkpoint("demo-sd15")
    tokenizer = loaded.pipeline.tokenizer.__class__.from_pretrained(
        loaded.pipeline.tokenizer.name_or_path
    )
    emb, v2 = embedding_token("zqxemb"), embedding_token("zqxembV2")
    tokenizer.add_tokens([emb, f"{emb}_1", v2, f"{v2}_1", f"{v2}_2"])
    text = "zqxemb, zqxembv2, (ZQXEMB:1.2), zqxembroidery, my-zqxemb"
    assert with_embedding_tokens(text, tokenizer) == (
        f"{emb} {emb}_1, {v2} {v2}_1 {v2}_2, ({emb} {emb}_1:1.2), zqxembroidery, my-zqxemb"
    )


def test_a_loaded_embedding_is_not_found_inside_a_longer_word(engine):
    """The tokenizer matches its added tokens anywhere in a text: an embedding loaded under its
    own name turned "zqxembroidery" into the embedding and "roidery". Its token is private."""
    from handler.prompts import embedding_token, with_embedding_tokens

    loaded, _ = engine.checkpoint("demo-sd15")
    tokenizer = loaded.pipeline.tokenizer.__class__.from_pretrained(
        loaded.pipeline.tokenizer.name_or_path
    )
    plain = tokenizer.tokenize("zqxembroidery, a cube")
    tokenizer.add_tokens([embedding_token("zqxemb")])
    tokens = tokenizer.tokenize(with_embedding_tokens("zqxemb zqxembroidery, a cube", tokenizer))
    assert tokens == [embedding_token("zqxemb"), *plain]
    # a prompt cannot write the token itself: the private-use marks are removed from prompts
    assert with_embedding_tokens("a \ue000other\ue001 cube", tokenizer) == "a other cube"


def test_embedding_names_match_in_any_case_by_the_regex_rules_of_the_search(engine):
    """Names were looked up by str.lower() after a case-insensitive match: "ΟΔΟΣ" matched
    "οδοσ" and then failed the lookup (internal_error, with the word in the log), and "İmage"
    was found by the search but never rewritten (silently not applied)."""
    from handler.prompts import embedding_token, with_embedding_tokens

    loaded, _ = engine.checkpoint("demo-sd15")
    tokenizer = loaded.pipeline.tokenizer.__class__.from_pretrained(
        loaded.pipeline.tokenizer.name_or_path
    )
    greek, dotted = embedding_token("ΟΔΟΣ"), embedding_token("İmage")
    tokenizer.add_tokens([greek, dotted, f"{dotted}_1"])
    text = with_embedding_tokens("a cube, οδοσ, İmage, images", tokenizer)
    assert text == f"a cube, {greek}, {dotted} {dotted}_1, images"


def test_an_embedding_with_no_vectors_is_skipped(engine, demo_volume):
    from safetensors.torch import save_file

    path = demo_volume / "embeddings" / "no-vectors.safetensors"
    save_file({"emb_params": torch.zeros(0, 32)}, str(path))
    try:
        result = engine.run(parse_job({**SD15, "prompt": "a cube, no-vectors"}))
        assert any("no-vectors not applied (no vectors)" in w for w in result.warnings)
    finally:
        path.unlink()


def test_an_embedding_named_like_a_word_of_the_vocabulary_is_used(engine, demo_volume):
    """diffusers refuses a token its tokenizer already has ("style"), so such embeddings were
    skipped; A1111 uses them. The word's own token stays what it was elsewhere."""
    import shutil

    path = demo_volume / "embeddings" / "style.safetensors"
    shutil.copy(demo_volume / "embeddings" / "demo-sd15-embedding.safetensors", path)
    try:
        job = {**SD15, "prompt": "a cube, style"}
        used = engine.run(parse_job(job))
        assert not any("style" in w for w in used.warnings), used.warnings
        path.unlink()
        word = engine.run(parse_job(job))
        assert np.abs(pixels(used) - pixels(word)).max() > 0
    finally:
        path.unlink(missing_ok=True)


def test_vae_override_applies_and_is_restored(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    original_vae = loaded.pipeline.vae
    plain = engine.run(parse_job(SD15))
    swapped = engine.run(parse_job({**SD15, "vae": "demo-vae-sd15"}))
    assert np.abs(pixels(swapped) - pixels(plain)).max() > 0
    assert loaded.pipeline.vae is original_vae
    assert (pixels(engine.run(parse_job(SD15))) == pixels(plain)).all()


def test_clip_skip_changes_the_image_and_is_per_job(engine):
    plain = engine.run(parse_job(SD15))
    skipped = engine.run(parse_job({**SD15, "clip_skip": 2}))
    assert np.abs(pixels(skipped) - pixels(plain)).max() > 0
    assert (pixels(engine.run(parse_job(SD15))) == pixels(plain)).all()


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_clip_skip_past_the_text_encoder_is_invalid_input(engine, checkpoint):
    # The demo text encoders have 2 layers (CLIP ViT-L has 12): the error says how many.
    job = parse_job({**SD15, "checkpoint": checkpoint, "clip_skip": 3})
    with pytest.raises(InvalidInput) as raised:
        engine.run(job)
    assert raised.value.field == "clip_skip" and raised.value.accepted == "1 to 2"
    assert engine.run(parse_job({**SD15, "checkpoint": checkpoint, "clip_skip": 2})).images


def test_a1111_override_settings_for_clip_skip_and_vae():
    job = parse_job(
        {
            **SD15,
            "override_settings": {
                "CLIP_stop_at_last_layers": 2,
                "sd_vae": "demo-vae-sd15.safetensors",
            },
        }
    )
    assert job.clip_skip == 2 and job.vae == "demo-vae-sd15.safetensors"


# -- checkpoint cache ------------------------------------------------------------------------------


def test_cache_evicts_under_its_limits_and_switching_back_reads_no_disk(settings, monkeypatch):
    from dataclasses import replace

    from handler import engine as engine_module
    from handler.engine import Engine

    loads = []
    real_load = engine_module.load_checkpoint
    monkeypatch.setattr(
        engine_module,
        "load_checkpoint",
        lambda *a, **k: loads.append(a[0].name) or real_load(*a, **k),
    )
    small = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=1))
    small.checkpoint("demo-sd15")
    small.checkpoint("demo-sdxl")  # sd15 moves to the RAM tier
    small.checkpoint("demo-sd15")  # back from RAM: no load
    assert loads == ["demo-sd15", "demo-sdxl"] and len(small.cache) == 2
    small.checkpoint("demo-sd2-768-v")  # over both limits: the least recently used is dropped
    assert len(small.cache) == 2
    small.checkpoint("demo-sdxl")  # was evicted: loads again
    assert loads == ["demo-sd15", "demo-sdxl", "demo-sd2-768-v", "demo-sdxl"]


def test_state_dict_cache_is_bounded_by_bytes(demo_volume):
    from handler.loras import StateDictCache

    paths = sorted((demo_volume / "loras").glob("demo_*.safetensors"))[:3]
    sizes = []
    for path in paths:
        probe = StateDictCache(max_bytes=10**12)
        state = probe.get(path)
        sizes.append(sum(t.numel() * t.element_size() for t in state.values()))
    cache = StateDictCache(max_bytes=sizes[0] + sizes[1])
    for path in paths:
        cache.get(path)
    assert cache.size_bytes <= sizes[0] + sizes[1] and cache.loads == 3
    cache.get(paths[-1])  # the newest stayed
    assert cache.loads == 3
    cache.get(paths[0])  # the oldest went: read from disk again
    assert cache.loads == 4
    none = StateDictCache(max_bytes=0)  # LORA_CACHE_MB=0 caches none
    none.get(paths[0])
    none.get(paths[0])
    assert none.size_bytes == 0 and none.loads == 2


def _two_adapter_model(layers: int = 7) -> tuple[torch.nn.Module, list]:
    """Linear and conv layers (some channels_last, as the fast path keeps UNets) carrying peft
    adapters `a` (all layers) and `b` (every other layer), with non-zero random deltas."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            f"l{i}": torch.nn.Conv2d(6, 6, 1) if i % 3 == 0 else torch.nn.Linear(6, 6)
            for i in range(layers)
        }
    )
    model.l0.to(memory_format=torch.channels_last)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=list(model.keys())), model, "a")
    odd = [name for i, name in enumerate(model.keys()) if i % 2]
    inject_adapter_in_model(LoraConfig(r=2, target_modules=odd), model, "b")
    with torch.no_grad():
        for parameter in (p for n, p in model.named_parameters() if "lora_" in n):
            parameter.normal_()
    return model, [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_batched_merge_equals_per_layer_merge_and_restores_exactly(monkeypatch):
    from handler import loras

    monkeypatch.setattr(loras, "MERGE_CHUNK_BYTES", 3 * 6 * 6 * 4)  # three layers a chunk
    model, layers = _two_adapter_model()
    scales = {"a": 0.7, "b": -0.4}
    before = [m.get_base_layer().weight.clone() for m in layers]
    expected = []
    for module, weight in zip(layers, before, strict=True):
        merged = weight.clone()
        for name, scale in scales.items():
            if name in module.lora_A:
                merged.add_(module.get_delta_weight(name), alpha=scale)
        expected.append(merged)

    applied = loras.merge_adapters(layers, scales)
    after_merge = [m.get_base_layer().weight for m in layers]
    # the same sums, rounded once instead of twice (peft's scaling is folded into the addition)
    for merged, wanted in zip(after_merge, expected, strict=True):
        torch.testing.assert_close(merged, wanted, rtol=1e-6, atol=1e-6)
    assert not any(torch.equal(a, b) for a, b in zip(after_merge, before, strict=True))
    assert layers[0].get_base_layer().weight.is_contiguous(memory_format=torch.channels_last)
    applied.restore()
    restored = [m.get_base_layer().weight for m in layers]
    assert all(torch.equal(r, b) for r, b in zip(restored, before, strict=True))


def test_batched_deltas_group_layers_by_shape_and_scaling_like_peft():
    """Linear deltas are batched per group of same-shaped layers with the same scaling: layers of
    three shapes, two ranks and per-layer alphas (as kohya files carry) must each get peft's
    own delta, in fp32 and in fp16 (computed in fp32 on the CPU, as peft does)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from handler import loras

    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        shapes = [(6, 6), (6, 10), (10, 6), (6, 6), (6, 10), (6, 6)]
        model = torch.nn.ModuleDict(
            {f"l{i}": torch.nn.Linear(i_, o_) for i, (i_, o_) in enumerate(shapes)}
        )
        config = LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=list(model.keys()),
            rank_pattern={"l3": 3},
            alpha_pattern={"l5": 7, "l1": 5},
        )
        inject_adapter_in_model(config, model, "a")
        model.to(dtype)
        with torch.no_grad():
            for parameter in (p for n, p in model.named_parameters() if "lora_" in n):
                parameter.normal_()
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert len({m.scaling["a"] for m in layers}) == 4  # 1, 2.5, 2/3, 3.5
        expected = [
            m.get_base_layer().weight + 0.6 * m.get_delta_weight("a").float() for m in layers
        ]
        loras.merge_adapters(layers, {"a": 0.6})
        for module, wanted in zip(layers, expected, strict=True):
            weight = module.get_base_layer().weight
            assert weight.dtype == dtype
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(
                weight.float(), wanted.float(), rtol=tolerance, atol=tolerance
            )


def test_a_merge_that_fails_midway_restores_every_weight(monkeypatch):
    from handler import loras

    monkeypatch.setattr(loras, "MERGE_CHUNK_BYTES", 2 * 6 * 6 * 4)  # two layers a chunk
    model, layers = _two_adapter_model()
    before = [m.get_base_layer().weight.clone() for m in layers]

    def broken(adapter):
        raise RuntimeError("delta failed")

    # a convolution's delta is peft's own; l6 is in the fourth chunk, after three were merged
    assert isinstance(layers[6].get_base_layer(), torch.nn.Conv2d)
    monkeypatch.setattr(layers[6], "get_delta_weight", broken)
    with pytest.raises(RuntimeError, match="delta failed"):
        loras.merge_adapters(layers, {"a": 1.0, "b": 1.0})
    restored = [m.get_base_layer().weight for m in layers]
    assert all(torch.equal(r, b) for r, b in zip(restored, before, strict=True))


def test_a_lora_job_reports_its_merge_time_and_a_plain_job_does_not(settings):
    from dataclasses import replace

    from handler.engine import Engine

    # its own engine: the shared one's checkpoints stay free of resident adapters
    own = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0))
    with_lora = own.run(parse_job({**SD15, "loras": [{"name": "demo_sd15_peft"}]}))
    plain = own.run(parse_job(SD15))
    assert with_lora.timings_ms["loras"] > 0  # the file's first load and its merge
    assert with_lora.timings_ms["total"] >= with_lora.timings_ms["loras"]
    assert "loras" not in plain.timings_ms


def test_a_lora_that_fails_half_way_through_loading_leaves_nothing(settings, demo_volume):
    """diffusers loads a LoRA's UNet part before its text-encoder part: one whose text-encoder
    tensor has the wrong shape fails after the UNet's layers went in. The next job must not
    run with them (it did, at scale 1, when no adapter had been resident before)."""
    from dataclasses import replace

    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file, save_file

    from handler.engine import Engine

    state = load_file(demo_volume / "loras" / "demo_sd15_kohya.safetensors")
    key = next(k for k in sorted(state) if k.startswith("lora_te_") and "lora_up" in k)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1], dtype=state[key].dtype)
    broken = demo_volume / "loras" / "half_broken.safetensors"
    save_file(state, str(broken))
    try:
        own = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0))
        plain = own.run(parse_job(SD15))
        with pytest.raises(LoraIncompatible):
            own.run(parse_job({**SD15, "loras": [{"name": "half_broken", "scale": 0.5}]}))
        loaded, _ = own.checkpoint("demo-sd15")
        parts = (loaded.pipeline.unet, loaded.pipeline.text_encoder)
        assert not any(isinstance(m, BaseTunerLayer) for part in parts for m in part.modules())
        assert (pixels(own.run(parse_job(SD15))) == pixels(plain)).all()
    finally:
        broken.unlink()


def test_an_embedding_that_fails_half_way_leaves_no_token(engine, monkeypatch):
    """An SDXL embedding goes into one text encoder, then the other: when the second fails, the
    first one's tokens must go too (they stayed, and the next job saw them)."""
    loaded, _ = engine.checkpoint("demo-sdxl")
    pipeline = loaded.pipeline
    sizes = (len(pipeline.tokenizer), len(pipeline.tokenizer_2))
    original = type(pipeline).load_textual_inversion
    calls = []

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected: the clip_g part failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "load_textual_inversion", second_fails)
    with pytest.raises(RuntimeError, match="injected"):
        engine.run(parse_job({**SDXL, "prompt": "a cube, demo-sdxl-embedding"}))
    assert len(calls) == 2
    assert (len(pipeline.tokenizer), len(pipeline.tokenizer_2)) == sizes


def test_an_embedding_that_fails_before_its_first_token_keeps_its_own_error(engine, monkeypatch):
    """Its all-or-nothing cleanup found no token to remove, and diffusers' "No tokens to remove
    found" replaced the real error (a cancel, under Cog)."""
    loaded, _ = engine.checkpoint("demo-sd15")
    pipeline = loaded.pipeline
    size = len(pipeline.tokenizer)

    def first_fails(self, *args, **kwargs):
        raise RuntimeError("injected: failed before adding a token")

    monkeypatch.setattr(type(pipeline), "load_textual_inversion", first_fails)
    with pytest.raises(RuntimeError, match="injected"):
        engine.run(parse_job({**SD15, "prompt": "a cube, demo-sd15-embedding"}))
    assert len(pipeline.tokenizer) == size


def test_an_inline_lora_that_fails_to_load_names_the_prompt(settings, monkeypatch):
    from dataclasses import replace

    from handler.engine import Engine

    own = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0))
    pipeline = own.checkpoint("demo-sd15")[0].pipeline
    original, calls = type(pipeline).load_lora_weights, []

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected: size mismatch")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipeline), "load_lora_weights", second_fails)
    job = {
        **SD15,
        "loras": [{"name": "demo_sd15_kohya"}],
        "prompt": "a cube <lora:demo_sd15_peft:1>",
    }
    with pytest.raises(LoraIncompatible) as info:
        own.run(parse_job(job))
    assert info.value.field == "prompt"  # the tag's field; there is no loras[1]


def test_a_gpu_out_of_memory_while_loading_a_lora_is_out_of_memory(settings, monkeypatch):
    """The GPU's failure is not the LoRA's: out_of_memory asking for a new worker, not
    lora_incompatible; and the next job runs the LoRA as a fresh engine does."""
    from dataclasses import replace

    from handler.engine import Engine
    from handler.errors import OutOfMemory

    own = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0))
    pipeline = own.checkpoint("demo-sd15")[0].pipeline
    original = type(pipeline).load_lora_weights

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    monkeypatch.setattr(type(pipeline), "load_lora_weights", out_of_memory)
    job = {**SD15, "seed": 5, "loras": [{"name": "demo_sd15_kohya", "scale": 0.8}]}
    with pytest.raises(OutOfMemory) as info:
        own.run(parse_job(job))
    assert info.value.code == "out_of_memory" and info.value.refresh_worker
    monkeypatch.setattr(type(pipeline), "load_lora_weights", original)
    fresh = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0))
    assert np.array_equal(pixels(own.run(parse_job(job))), pixels(fresh.run(parse_job(job))))


def test_an_inline_tag_naming_two_loras_says_so(settings, demo_volume, tmp_path):
    import shutil
    from dataclasses import replace

    from handler.engine import Engine

    for folder in ("a", "b"):
        (tmp_path / "loras" / folder).mkdir(parents=True)
        lora = demo_volume / "loras" / "demo_sd15_kohya.safetensors"
        shutil.copy(lora, tmp_path / "loras" / folder / "ink.safetensors")
    own = Engine(replace(settings, extra_roots=(str(tmp_path),)))
    with pytest.raises(InvalidInput) as info:
        own.run(parse_job({**SD15, "prompt": "a cube <lora:ink:0.5>"}))
    assert info.value.field == "prompt" and info.value.accepted == ["a/ink", "b/ink"]
    assert (
        info.value.message == "LoRA tag 1 of prompt matches several LoRAs: name one with its folder"
    )


def test_every_undo_of_a_job_runs_even_when_one_fails():
    from handler.loras import _undo_all

    ran = []

    def failing():
        ran.append("restore")
        raise RuntimeError("restore failed")

    with pytest.raises(RuntimeError, match="restore failed"):
        _undo_all(failing, None, lambda: ran.append("embeddings"), lambda: ran.append("adapters"))
    assert ran == ["restore", "embeddings", "adapters"]


def test_sdxl_embeddings_with_mismatched_parts_are_skipped(engine, demo_volume):
    from safetensors.torch import save_file

    path = demo_volume / "embeddings" / "uneven-parts.safetensors"
    cases = {
        (1, 32, 3, 64): "different numbers of vectors",
        (2, 32, 2, 65): "65-wide vectors",
    }
    loaded, _ = engine.checkpoint("demo-sdxl")
    sizes = (len(loaded.pipeline.tokenizer), len(loaded.pipeline.tokenizer_2))
    try:
        for (l_rows, l_width, g_rows, g_width), why in cases.items():
            parts = {"clip_l": torch.randn(l_rows, l_width), "clip_g": torch.randn(g_rows, g_width)}
            save_file(parts, str(path))
            result = engine.run(parse_job({**SDXL, "prompt": "a cube, uneven-parts"}))
            assert any("uneven-parts not applied" in w and why in w for w in result.warnings)
            tokenizers = (loaded.pipeline.tokenizer, loaded.pipeline.tokenizer_2)
            assert tuple(len(t) for t in tokenizers) == sizes
    finally:
        path.unlink()


def test_a_missing_loras_suggestions_are_the_loras_that_fit_the_checkpoint(engine):
    from handler.errors import ModelNotFound

    job = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "checkpoint": "demo-sd15"}
    for extra in ({"loras": [{"name": "demo_sdxl"}]}, {"prompt": "x <lora:demo_sdxl:1>"}):
        with pytest.raises(ModelNotFound) as info:
            engine.run(parse_job({**job, **extra}))
        assert info.value.accepted and all("sd15" in n for n in info.value.accepted), extra
