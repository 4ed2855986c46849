"""Model roots: name resolution, path-escape refusals and architecture detection."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from handler.errors import InvalidInput, ModelNotFound, UnsupportedModel
from handler.registry import Registry, detect_checkpoint, detect_diffusers_folder

FIXTURE_ARCHITECTURES = {
    "demo-sd15": ("sd15", "epsilon"),
    "demo-sd15-inpaint": ("sd15-inpaint", "epsilon"),
    "demo-sd2-768-v": ("sd2-768-v", "v_prediction"),
    "demo-sdxl": ("sdxl", "epsilon"),
    "demo-sdxl-refiner": ("sdxl-refiner", "epsilon"),
    "demo-sdxl-inpaint": ("sdxl-inpaint", "epsilon"),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCHITECTURES))
def test_detects_every_fixture_architecture(demo_volume, name):
    detection = detect_checkpoint(demo_volume / "checkpoints" / f"{name}.safetensors")
    assert (detection.architecture, detection.prediction_type) == FIXTURE_ARCHITECTURES[name]


def _tiny(path: Path, keys: list[str], metadata: dict | None = None) -> Path:
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path), metadata=metadata)
    return path


def test_sd2_without_a_recorded_prediction_type_defaults_to_v_with_a_note(tmp_path, demo_volume):
    from safetensors.torch import load_file

    state = load_file(demo_volume / "checkpoints" / "demo-sd2-768-v.safetensors")
    save_file(state, str(tmp_path / "plain.safetensors"))  # no metadata
    detection = detect_checkpoint(tmp_path / "plain.safetensors")
    assert detection.architecture == "sd2-768-v" and detection.notes
    (tmp_path / "plain.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert detect_checkpoint(tmp_path / "plain.safetensors").architecture == "sd2-512"
    # A1111's v2-inference.yaml has no parameterization line: an epsilon (512) model
    (tmp_path / "plain.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm\n")
    assert detect_checkpoint(tmp_path / "plain.safetensors").architecture == "sd2-512"
    (tmp_path / "plain.yaml").write_text('model:\n  params:\n    parameterization: "v"  # 768\n')
    assert detect_checkpoint(tmp_path / "plain.safetensors").architecture == "sd2-768-v"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
            "looks like a LoRA (it has lora_* keys), not a Stable Diffusion 1.x, 2.x or XL "
            "checkpoint: put it in loras/",
        ),
        (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "LoRA"),
        (
            ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"],
            "Stable Diffusion 3",
        ),
        (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
        (["emb_params"], "textual-inversion"),
        (["encoder.conv_in.weight", "decoder.conv_in.weight"], "VAE"),
        (["something.else"], "something else"),
    ],
)
def test_non_sd_files_are_unsupported_with_what_was_found(tmp_path, keys, expected):
    path = _tiny(tmp_path / "x.safetensors", keys)
    with pytest.raises(UnsupportedModel) as info:
        detect_checkpoint(path)
    assert expected in info.value.message
    assert info.value.code == "unsupported_model" and info.value.field == "checkpoint"


def test_truncated_and_foreign_files_are_unsupported(tmp_path, demo_volume):
    original = (demo_volume / "checkpoints" / "demo-sd15.safetensors").read_bytes()
    cases = {
        "truncated.safetensors": original[: len(original) // 2],
        "html.safetensors": b"<html><body>404 Not Found</body></html>",
        "empty.safetensors": b"",
        "pickle.safetensors": b"\x80\x02}q\x00(X\x05\x00\x00\x00state" + b"\x00" * 64,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnsupportedModel) as info:
            detect_checkpoint(tmp_path / name)
        assert "safetensors" in str(info.value) or "truncated" in str(info.value), name


def test_diffusers_folder_detection(tmp_path, engine):
    loaded, _ = engine.checkpoint("demo-sdxl")
    loaded.pipeline.save_pretrained(tmp_path / "xl")
    assert detect_diffusers_folder(tmp_path / "xl").architecture == "sdxl"


# -- name resolution ---------------------------------------------------------------------------


@pytest.fixture()
def registry(settings):
    return Registry(settings)


def test_resolves_with_and_without_extension_and_in_subfolders(registry, demo_volume):
    assert registry.resolve("checkpoint", "demo-sd15", "checkpoint").name == "demo-sd15"
    assert registry.resolve("checkpoint", "demo-sd15.safetensors", "checkpoint").name == "demo-sd15"
    sub = demo_volume / "loras" / "styles"
    sub.mkdir(exist_ok=True)
    (sub / "ink.safetensors").write_bytes(
        (demo_volume / "loras" / "demo_sd15_peft.safetensors").read_bytes()
    )
    assert registry.resolve("lora", "styles/ink", "loras[0].name").path == sub / "ink.safetensors"


def test_lists_checkpoints_without_sidecar_config_folders(registry):
    names = registry.names("checkpoint")
    assert "demo-sd15" in names and "demo-sdxl" in names
    assert not any(n.endswith(".config") or "/" in n for n in names)


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../../etc/passwd", "sub/../../x", "~root/x", "a\\..\\b"]
)
def test_refuses_names_that_escape_the_root(registry, name):
    with pytest.raises(InvalidInput) as info:
        registry.resolve("checkpoint", name, "checkpoint")
    assert info.value.field == "checkpoint"


@pytest.mark.parametrize("name", [".", "./", "./."])
def test_a_name_that_is_its_folder_is_refused(registry, demo_volume, name):
    """ "." named the folder itself, whose name with an extension is a file beside the folder
    (`<root>/loras.safetensors`): outside the folder, and an internal error after."""
    beside = demo_volume / "loras.safetensors"
    beside.write_bytes((demo_volume / "loras" / "demo_sd15_peft.safetensors").read_bytes())
    try:
        with pytest.raises(InvalidInput) as info:
            registry.resolve("lora", name, "loras[0].name")
        assert info.value.field == "loras[0].name"
    finally:
        beside.unlink()


def test_refuses_symlinks_pointing_outside_the_root(registry, demo_volume, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((demo_volume / "checkpoints" / "demo-sd15.safetensors").read_bytes())
    link = demo_volume / "checkpoints" / "escape.safetensors"
    os.symlink(outside, link)
    try:
        with pytest.raises(ModelNotFound):  # as a missing file: nothing outside is probed
            registry.resolve("checkpoint", "escape", "checkpoint")
        assert "escape" not in registry.names("checkpoint")
    finally:
        link.unlink()


def test_the_hash_cache_is_never_written_or_read_through_a_link(tmp_path):
    """Someone who can write to the volume plants the cache's file names as links out of the
    root: the worker neither overwrites nor reads what they point at."""
    from handler.registry import HASH_CACHE_FILE
    from handler.settings import Settings

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "checkpoints").mkdir(parents=True)
    outside.mkdir()
    _tiny(root / "checkpoints" / "tiny.safetensors", ["a"])
    victim = outside / "victim.txt"
    victim.write_text('{"checkpoints/tiny.safetensors": "not json the worker wrote"}')
    (root / HASH_CACHE_FILE).symlink_to(victim)
    (root / (HASH_CACHE_FILE.removesuffix(".json") + ".tmp")).symlink_to(outside / "tmp-victim")

    registry = Registry(Settings(models_dir=str(root), extra_roots=(), device="cpu"))
    model = registry.resolve("checkpoint", "tiny", "checkpoint")
    short = registry.compute_hash(model)

    assert victim.read_text().endswith('not json the worker wrote"}')
    assert not (outside / "tmp-victim").exists()
    cache = root / HASH_CACHE_FILE
    assert not cache.is_symlink() and short in cache.read_text()
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()] == []
    # a fresh worker reads the hash back from the root's own file
    fresh = Registry(Settings(models_dir=str(root), extra_roots=(), device="cpu"))
    assert fresh.cached_hash(fresh.resolve("checkpoint", "tiny", "checkpoint")) == short


def test_a_checkpoints_yaml_is_read_only_inside_the_root(tmp_path, demo_volume):
    from safetensors.torch import load_file

    root = tmp_path / "root"
    (root / "checkpoints").mkdir(parents=True)
    (root / "configs").mkdir()
    state = load_file(demo_volume / "checkpoints" / "demo-sd2-768-v.safetensors")
    checkpoint = root / "checkpoints" / "plain.safetensors"
    save_file(state, str(checkpoint))  # SD 2.x with no recorded prediction type
    epsilon = "model:\n  params:\n    parameterization: eps\n"
    (tmp_path / "outside.yaml").write_text(epsilon)
    (root / "checkpoints" / "plain.yaml").symlink_to(tmp_path / "outside.yaml")
    assert detect_checkpoint(checkpoint, root).architecture == "sd2-768-v"  # not read
    (root / "checkpoints" / "plain.yaml").unlink()
    (root / "configs" / "eps.yaml").write_text(epsilon)
    (root / "checkpoints" / "plain.yaml").symlink_to(root / "configs" / "eps.yaml")
    assert detect_checkpoint(checkpoint, root).architecture == "sd2-512"  # a link inside: read


def test_refuses_pickles_unless_allowed(settings, demo_volume):
    pickle = demo_volume / "checkpoints" / "old.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    try:
        with pytest.raises(InvalidInput) as info:
            Registry(settings).resolve("checkpoint", "old", "checkpoint")
        assert "ALLOW_PICKLE" in info.value.message
        allowed = Registry(replace(settings, allow_pickle=True))
        assert allowed.resolve("checkpoint", "old", "checkpoint").path == pickle
    finally:
        pickle.unlink()


def test_refuses_a_diffusers_folder_with_a_file_that_points_outside(
    registry, demo_volume, tmp_path
):
    folder = demo_volume / "checkpoints" / "linked-parts"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    outside = tmp_path / "weights.safetensors"
    outside.write_bytes(b"x")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(outside)
    try:
        with pytest.raises(InvalidInput) as info:
            registry.resolve("checkpoint", "linked-parts", "checkpoint")
        assert "outside the model root" in info.value.message
        assert "linked-parts" not in registry.names("checkpoint")
    finally:
        shutil.rmtree(folder)


def test_refuses_a_diffusers_folder_whose_part_has_only_pickled_weights(settings, demo_volume):
    folder = demo_volume / "checkpoints" / "pickled-parts"
    for part in ("unet", "vae"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    try:
        with pytest.raises(InvalidInput) as info:
            Registry(settings).resolve("checkpoint", "pickled-parts", "checkpoint")
        assert "unet/diffusion_pytorch_model.bin is a pickled file" in info.value.message
        allowed = Registry(replace(settings, allow_pickle=True))
        assert allowed.resolve("checkpoint", "pickled-parts", "checkpoint").path == folder
    finally:
        shutil.rmtree(folder)


def test_overlong_names_are_invalid_input_not_internal_errors(registry):
    for name in ("a" * 5000, "a/" * 600, "x" * 300):
        with pytest.raises(InvalidInput) as info:
            registry.resolve("checkpoint", name, "checkpoint")
        assert "too long" in info.value.message


def test_a_file_outside_the_root_is_never_told_apart_from_a_missing_one(
    registry, demo_volume, tmp_path
):
    (tmp_path / "secret.txt").write_text("x")
    link = demo_volume / "checkpoints" / "outdir"
    link.symlink_to(tmp_path)
    try:
        (tmp_path / "secret.safetensors").write_bytes(b"x")
        for name in ("outdir/secret.txt", "outdir/nothing.txt", "outdir/secret", "outdir/none"):
            with pytest.raises(ModelNotFound):
                registry.resolve("checkpoint", name, "checkpoint")
    finally:
        link.unlink()


def test_refuses_non_weight_extensions(registry, demo_volume):
    with pytest.raises(InvalidInput) as info:
        registry.resolve("checkpoint", "demo-sd15.config/model_index.json", "checkpoint")
    assert "not a weights file" in info.value.message


def test_model_not_found_lists_the_closest_names(registry):
    with pytest.raises(ModelNotFound) as info:
        registry.resolve("checkpoint", "demo-sd1.5", "checkpoint")
    assert info.value.field == "checkpoint"
    assert "demo-sd15" in info.value.accepted
    # the others are counted, so that one close name does not read as the only one
    more = len(registry.names("checkpoint")) - len(info.value.accepted) + 1
    assert info.value.accepted[-1] == f"{more} more (list_models lists them)"


def test_allowed_pickles_are_detected_and_loaded_without_running_code(
    settings, demo_volume, tmp_path
):
    from safetensors.torch import load_file

    from handler.engine import Engine
    from handler.registry import detect_pickled_checkpoint
    from handler.schema import parse_job

    state = load_file(demo_volume / "checkpoints" / "demo-sd15.safetensors")
    pickled = demo_volume / "checkpoints" / "legacy-sd15.ckpt"
    torch.save({"state_dict": state}, pickled)
    (demo_volume / "checkpoints" / "legacy-sd15.config").symlink_to(
        demo_volume / "checkpoints" / "demo-sd15.config"
    )
    try:
        assert detect_pickled_checkpoint(pickled).architecture == "sd15"
        engine = Engine(replace(settings, allow_pickle=True))
        result = engine.run(
            parse_job(
                {
                    "prompt": "x",
                    "width": 64,
                    "height": 64,
                    "steps": 1,
                    "seed": 1,
                    "checkpoint": "legacy-sd15",
                }
            )
        )
        assert result.architecture == "sd15"
        with pytest.raises(InvalidInput):
            Engine(settings).run(parse_job({"prompt": "x", "checkpoint": "legacy-sd15"}))
    finally:
        pickled.unlink()
        (demo_volume / "checkpoints" / "legacy-sd15.config").unlink()

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"x": RunsCode()}))
    with pytest.raises(UnsupportedModel):
        detect_pickled_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


def test_bare_names_find_files_in_subfolders_and_extensions_ignore_case(registry, demo_volume):
    peft = (demo_volume / "loras" / "demo_sd15_peft.safetensors").read_bytes()
    sub = demo_volume / "loras" / "anime"
    sub.mkdir(exist_ok=True)
    (sub / "Inkwash.SafeTensors").write_bytes(peft)
    try:
        assert registry.resolve("lora", "Inkwash", "prompt").path == sub / "Inkwash.SafeTensors"
        assert registry.resolve("lora", "anime/Inkwash", "prompt").name == "anime/Inkwash"
        assert "anime/Inkwash" in registry.names("lora")
        other = demo_volume / "loras" / "other"
        other.mkdir(exist_ok=True)
        (other / "inkwash.safetensors").write_bytes(peft)
        with pytest.raises(InvalidInput) as info:
            registry.resolve("lora", "inkwash", "loras[0].name")
        assert info.value.field == "loras[0].name" and "other/inkwash" in info.value.accepted
        (other / "inkwash.safetensors").unlink()
    finally:
        (sub / "Inkwash.SafeTensors").unlink()


def test_pickles_are_never_opened_without_allow_pickle(settings, demo_volume, tmp_path, engine):
    """list_models and embedding lookup skip pickles; with ALLOW_PICKLE an A1111 .pt embedding
    (string_to_param dict, extra non-tensor entries) loads."""
    from handler.engine import Engine
    from handler.schema import parse_job

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    evil = demo_volume / "checkpoints" / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"x": RunsCode()}))
    vectors = torch.randn(2, 32)
    embedding = demo_volume / "embeddings" / "oldstyle.pt"
    torch.save({"string_to_param": {"*": vectors}, "name": "oldstyle", "step": 3000}, embedding)
    try:
        listed = {c["name"]: c for c in Engine(settings).list_models()["checkpoints"]}
        assert listed["evil"]["architecture"] == "unsupported"
        assert "ALLOW_PICKLE" in listed["evil"]["reason"]
        assert Registry(settings).files("embedding", loadable_only=True) == [
            f for f in Registry(settings).files("embedding") if f.path.suffix != ".pt"
        ]
        job = {"prompt": "a cube, oldstyle", "width": 64, "height": 64, "steps": 2, "seed": 3}
        job["checkpoint"] = "demo-sd15"
        plain = Engine(settings).run(parse_job(job))
        with_pickles = Engine(replace(settings, allow_pickle=True)).run(parse_job(job))
        assert plain.images[0].image != with_pickles.images[0].image  # the embedding applied
        assert any("oldstyle not applied (a pickled file" in w for w in plain.warnings)
    finally:
        evil.unlink()
        embedding.unlink()
    assert not (tmp_path / "pwned").exists()


def test_list_models_says_why_a_pickled_lora_is_not_loaded(settings, demo_volume):
    from handler.engine import Engine

    pickle = demo_volume / "loras" / "old-style.pt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    try:
        loras = {e["name"]: e for e in Engine(settings).list_models()["loras"]}
        assert loras["old-style"]["base"] == "unsupported"
        assert "ALLOW_PICKLE" in loras["old-style"]["reason"]
    finally:
        pickle.unlink()


def _root_with(tmp_path: Path, demo_volume: Path, files: dict[str, str]) -> Path:
    """A model root holding copies of demo files (with their sidecar configs), as named."""
    root = tmp_path / "root"
    for target, source in files.items():
        destination = root / target
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_volume / source, destination)
        config = (demo_volume / source).with_suffix(".config")
        if config.is_dir():
            stem = destination.name[: -len(destination.suffix)]
            shutil.copytree(config, destination.with_name(stem + ".config"))
    return root


def _engine(settings, root: Path, **changes):
    from handler.engine import Engine

    return Engine(replace(settings, models_dir=str(root), extra_roots=(), **changes))


def _job(**fields):
    from handler.schema import parse_job

    return parse_job({"prompt": "a cube", "width": 64, "height": 64, "steps": 1, **fields})


def test_uppercase_extensions_load_as_they_are_listed(settings, demo_volume, tmp_path):
    """diffusers picks its loader by the exact extension: `.SAFETENSORS` fell back to
    torch.load and failed, while the registry listed the file."""
    root = _root_with(
        tmp_path,
        demo_volume,
        {
            "checkpoints/Upper.SAFETENSORS": "checkpoints/demo-sd15.safetensors",
            "vae/UPVAE.SAFETENSORS": "vae/demo-vae-sd15.safetensors",
        },
    )
    engine = _engine(settings, root)
    assert engine.run(_job(checkpoint="Upper")).images
    assert engine.run(_job(checkpoint="Upper", vae="UPVAE")).images


def test_default_checkpoint_skips_files_that_cannot_start_a_generation(
    settings, demo_volume, tmp_path
):
    root = _root_with(
        tmp_path,
        demo_volume,
        {
            "checkpoints/a-lora.safetensors": "loras/demo_sd15_kohya.safetensors",
            "checkpoints/b-refiner.safetensors": "checkpoints/demo-sdxl-refiner.safetensors",
            "checkpoints/c-model.safetensors": "checkpoints/demo-sd15.safetensors",
        },
    )
    (root / "checkpoints" / "0-legacy.ckpt").write_bytes(b"not opened")
    engine = _engine(settings, root)
    assert engine.default_checkpoint_name() == ("c-model", None)
    engine.setup()  # the only usable one is preloaded
    assert [entry.name for entry in engine.cache._entries.values()] == ["c-model"]
    refiner = _engine(settings, root, default_checkpoint="b-refiner")
    with pytest.raises(InvalidInput) as info:
        refiner.setup()
    assert info.value.field == "DEFAULT_CHECKPOINT" and "REFINER_CHECKPOINT" in info.value.accepted
    not_a_refiner = _engine(settings, root, refiner_checkpoint="c-model")
    with pytest.raises(InvalidInput) as info:
        not_a_refiner.setup()  # before: accepted, then every refiner job failed
    assert info.value.field == "REFINER_CHECKPOINT" and "not an SDXL refiner" in str(info.value)


def test_one_name_for_two_files_lists_the_file_jobs_load(settings, demo_volume, tmp_path):
    root = _root_with(
        tmp_path, demo_volume, {"checkpoints/foo.safetensors": "checkpoints/demo-sd15.safetensors"}
    )
    (root / "checkpoints" / "foo.ckpt").write_bytes(b"not opened")
    registry = Registry(replace(settings, models_dir=str(root), extra_roots=()))
    [listed] = registry.files("checkpoint")
    assert listed.path == registry.resolve("checkpoint", "foo", "checkpoint").path
    assert listed.path.suffix == ".safetensors"


def test_a_model_root_under_a_dot_config_folder_is_listed(settings, demo_volume, tmp_path):
    root = _root_with(
        tmp_path / "home" / ".config",
        demo_volume,
        {"checkpoints/m.safetensors": "checkpoints/demo-sd15.safetensors"},
    )
    registry = Registry(replace(settings, models_dir=str(root), extra_roots=()))
    assert registry.names("checkpoint") == ["m"]  # only NAME.config sidecars are skipped


def test_list_models_survives_malformed_files_and_says_why(settings, demo_volume, tmp_path):
    import json
    import struct

    root = _root_with(
        tmp_path, demo_volume, {"checkpoints/good.safetensors": "checkpoints/demo-sd15.safetensors"}
    )
    broken = root / "checkpoints" / "broken-index"
    broken.mkdir()
    (broken / "model_index.json").write_text("[]")
    bad_scheduler = root / "checkpoints" / "bad-scheduler"
    (bad_scheduler / "unet").mkdir(parents=True)
    (bad_scheduler / "scheduler").mkdir()
    (bad_scheduler / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (bad_scheduler / "unet" / "config.json").write_text("{}")
    (bad_scheduler / "scheduler" / "scheduler_config.json").write_text("{not json")
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": "nope"}}).encode()
    (root / "checkpoints" / "bad-entry.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header
    )
    _tiny(
        root / "checkpoints" / "flat-conv.safetensors",
        ["model.diffusion_model.input_blocks.0.0.weight"],
    )
    (root / "vae").mkdir()
    (root / "vae" / "empty.safetensors").write_bytes(b"")
    (root / "vae" / "old.pt").write_bytes(b"not opened")
    (root / "loras").mkdir()
    (root / "loras" / "cut.safetensors").write_bytes(b"\x10\x00")
    deep = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # valid JSON, too deep
    for folder in ("checkpoints", "loras"):
        (root / folder / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    listing = _engine(settings, root).list_models()
    checkpoints = {c["name"]: c for c in listing["checkpoints"]}
    assert checkpoints["good"]["architecture"] == "sd15"
    for name in ("broken-index", "bad-scheduler", "bad-entry", "flat-conv", "deep"):
        assert checkpoints[name]["architecture"] == "unsupported" and checkpoints[name]["reason"]
        assert str(root) not in checkpoints[name]["reason"]
    vaes = {v["name"]: v for v in listing["vaes"]}
    assert "too short" in vaes["empty"]["reason"] and "ALLOW_PICKLE" in vaes["old"]["reason"]
    loras = {lora["name"]: lora for lora in listing["loras"]}
    assert loras.keys() == {"cut", "deep"}
    assert all(lora["base"] == "unreadable" and lora["reason"] for lora in loras.values())


def test_embeddings_that_cannot_apply_are_skipped_with_a_warning(settings, demo_volume, tmp_path):
    """As A1111 skips embeddings that do not fit the model: an SDXL embedding's word in an SD 1.5
    job, an unreadable file, and a second file with the same word."""
    root = _root_with(
        tmp_path,
        demo_volume,
        {
            "checkpoints/m.safetensors": "checkpoints/demo-sd15.safetensors",
            "embeddings/a/dupe-style.safetensors": "embeddings/demo-sd15-embedding.safetensors",
            "embeddings/b/dupe-style.safetensors": "embeddings/demo-sd15-embedding.safetensors",
            "embeddings/style.safetensors": "embeddings/demo-sd15-embedding.safetensors",
            "embeddings/xl-only.safetensors": "embeddings/demo-sdxl-embedding.safetensors",
        },
    )
    (root / "embeddings" / "empty.safetensors").write_bytes(b"")
    engine = _engine(settings, root)
    plain = engine.run(_job(checkpoint="m", prompt="a cube, xl-only, empty", seed=1))
    assert any("xl-only not applied (made for SDXL)" in w for w in plain.warnings)
    assert any("empty not applied (unreadable" in w for w in plain.warnings)
    styled = engine.run(_job(checkpoint="m", prompt="a cube, dupe-style", seed=1))
    assert any("share the word 'dupe-style': a/dupe-style was used" in w for w in styled.warnings)
    # a word of CLIP's vocabulary is an embedding's name like any other (its token is private)
    worded = engine.run(_job(checkpoint="m", prompt="a cube in style", seed=1))
    assert not worded.warnings
    from tests.test_modes import infotext_fields

    assert infotext_fields(worded).get("TI hashes", "").startswith("style: ")


def test_a_diffusers_vae_folder_is_named_by_its_folder(settings, demo_volume, tmp_path, engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    root = _root_with(
        tmp_path, demo_volume, {"checkpoints/m.safetensors": "checkpoints/demo-sd15.safetensors"}
    )
    loaded.pipeline.vae.save_pretrained(root / "vae" / "my-vae")
    loaded.pipeline.vae.save_pretrained(root / "vae" / "fp16-vae", variant="fp16")
    own = _engine(settings, root)
    assert [v["name"] for v in own.list_models()["vaes"]] == ["fp16-vae", "my-vae"]
    plain = own.run(_job(checkpoint="m", vae="my-vae"))
    variant = own.run(_job(checkpoint="m", vae="fp16-vae"))  # only *.fp16.safetensors in it
    assert plain.images[0].image.split(",")[1] != "" and variant.images


def test_a_replaced_file_with_its_old_mtime_is_not_served_from_cache(tmp_path):
    from handler.registry import file_key

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"a" * 64)
    before = file_key(path)
    stat = path.stat()
    replacement = tmp_path / "new"
    replacement.write_bytes(b"b" * 64)
    replacement.replace(path)  # as rsync does
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # `cp -p` / `rsync -a`
    after = file_key(path)
    assert after[1:3] == before[1:3] and after != before


def test_a1111_titles_name_models_in_every_model_field():
    from handler.schema import parse_job

    job = parse_job(
        {
            "prompt": "x",
            "checkpoint": "SDXL\\base.safetensors [31e35c80fc]",
            "refiner_checkpoint": "SDXL/refiner.safetensors [0123456789]",
            "vae": "sdxl_vae.safetensors [abcdef0123]",
        }
    )
    assert job.checkpoint == "SDXL/base.safetensors"
    assert job.refiner_checkpoint == "SDXL/refiner.safetensors"
    assert job.vae == "sdxl_vae.safetensors"


def test_load_errors_name_the_model_not_the_host_path(settings, demo_volume, tmp_path, engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    root = tmp_path / "root"
    folder = root / "checkpoints" / "no-vae-config"
    loaded.pipeline.save_pretrained(folder)
    (folder / "vae" / "config.json").unlink()  # detected, then fails to load
    with pytest.raises(UnsupportedModel) as info:
        _engine(settings, root).run(_job(checkpoint="no-vae-config"))
    assert "could not be loaded" in info.value.message
    assert "no-vae-config" in info.value.message and str(root) not in info.value.message
    shutil.rmtree(folder / "vae")  # a part that model_index.json names is missing
    pickled = root / "checkpoints" / "pickled-unet"
    loaded.pipeline.save_pretrained(pickled)
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    listed = {c["name"]: c for c in _engine(settings, root).list_models()["checkpoints"]}
    assert "names a vae the folder lacks" in listed["no-vae-config"]["reason"]
    assert "ALLOW_PICKLE" in listed["pickled-unet"]["reason"]
    assert {c["architecture"] for c in listed.values()} == {"unsupported"}


def test_a_vae_override_takes_each_checkpoints_own_config(settings, demo_volume, tmp_path):
    """A single-file VAE's config comes from the checkpoint's config folder: the same VAE on two
    checkpoints with different sidecar configs must not reuse the first one's."""
    import json

    files = {
        "checkpoints/a.safetensors": "checkpoints/demo-sd15.safetensors",
        "checkpoints/b.safetensors": "checkpoints/demo-sd15.safetensors",
        "vae/v.safetensors": "vae/demo-vae-sd15.safetensors",
    }
    root = _root_with(tmp_path, demo_volume, files)
    config = root / "checkpoints" / "b.config" / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": 0.5}))
    job = {"vae": "v", "seed": 3, "steps": 2}
    after_a = _engine(settings, root)
    after_a.run(_job(checkpoint="a", **job))
    fresh = _engine(settings, root).run(_job(checkpoint="b", **job))
    assert after_a.run(_job(checkpoint="b", **job)).images[0].image == fresh.images[0].image


def test_the_default_roots_find_a1111_and_comfyui_pod_installs_on_the_volume(tmp_path):
    """A network volume set up from RunPod's A1111 or ComfyUI pod templates keeps its models
    in the install: both are found without MODELS_DIR, A1111's embeddings beside its models."""
    from handler.settings import Settings, volume_roots

    a1111 = tmp_path / "stable-diffusion-webui"
    comfy = tmp_path / "ComfyUI" / "models"
    files = {
        ("checkpoint", "webui-model"): a1111 / "models" / "Stable-diffusion" / "webui-model",
        ("lora", "webui-lora"): a1111 / "models" / "Lora" / "webui-lora",
        ("embedding", "webui-embedding"): a1111 / "embeddings" / "webui-embedding",
        ("checkpoint", "comfy-model"): comfy / "checkpoints" / "comfy-model",
        ("lora", "comfy-lora"): comfy / "loras" / "comfy-lora",
        ("vae", "comfy-vae"): comfy / "vae" / "comfy-vae",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        _tiny(path.with_suffix(".safetensors"), ["a"])
    registry = Registry(Settings(extra_roots=volume_roots(str(tmp_path)), device="cpu"))
    for (kind, name), path in files.items():
        assert registry.resolve(kind, name, kind).path == path.with_suffix(".safetensors")


def test_the_demo_volumes_files_take_the_umasks_modes(demo_volume):
    """safetensors writes 0600 files: a worker running as another user could not read them."""
    umask = os.umask(0)
    os.umask(umask)
    written = [  # the script's own files (other tests add theirs to the same volume)
        *demo_volume.glob("checkpoints/demo-*.safetensors"),
        *demo_volume.glob("embeddings/demo-*.safetensors"),
    ]
    modes = {p.stat().st_mode & 0o777 for p in written}
    assert modes == {0o666 & ~umask}
