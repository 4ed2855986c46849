"""Bundled configs and tokenizer files: they must describe the real models exactly."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from handler.pipelines import clip_tokenizer
from handler.registry import CONFIG_ROOT
from scripts import build_configs, ldm_export
from scripts.make_demo_volume import to_ldm

# Published parameter counts of the original models.
UNET_SD1, UNET_SD2, UNET_XL = 859_520_964, 865_910_724, 2_567_463_684
VAE, CLIP_L, OPEN_CLIP_H, OPEN_CLIP_G = 83_653_863, 123_060_480, 340_387_840, 694_659_840

EXPECTED = {
    "sd15": {"unet": UNET_SD1, "text_encoder": CLIP_L},
    "sd15-inpaint": {"unet": UNET_SD1 + 320 * 5 * 9, "text_encoder": CLIP_L},
    "sd2-768-v": {"unet": UNET_SD2, "text_encoder": OPEN_CLIP_H},
    "sd2-512": {"unet": UNET_SD2, "text_encoder": OPEN_CLIP_H},
    "sdxl": {"unet": UNET_XL, "text_encoder": CLIP_L, "text_encoder_2": OPEN_CLIP_G},
    "sdxl-inpaint": {
        "unet": UNET_XL + 320 * 5 * 9,
        "text_encoder": CLIP_L,
        "text_encoder_2": OPEN_CLIP_G,
    },
    "sdxl-refiner": {"text_encoder_2": OPEN_CLIP_G},
}
# How diffusers itself classifies a checkpoint with these keys and shapes.
DIFFUSERS_MODEL_TYPE = {
    "sd15": "v1",
    "sd15-inpaint": "inpainting",
    "sd2-768-v": "v2",
    "sdxl": "xl_base",
    "sdxl-inpaint": "xl_inpaint",
    "sdxl-refiner": "xl_refiner",
}


def _meta_components(arch: str) -> dict[str, torch.nn.Module]:
    folder = CONFIG_ROOT / arch
    with init_empty_weights():
        components = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        }
        for name, cls in (
            ("text_encoder", CLIPTextModel),
            ("text_encoder_2", CLIPTextModelWithProjection),
        ):
            if (folder / name).is_dir():
                components[name] = cls(CLIPTextConfig.from_pretrained(folder / name))
    return components


def _load_folder(arch: str) -> dict:
    return {
        str(p.relative_to(CONFIG_ROOT / arch)): json.loads(p.read_text())
        for p in (CONFIG_ROOT / arch).rglob("*.json")
    }


def test_tokenizer_encodes_like_clip():
    tokenizer = clip_tokenizer("<|endoftext|>")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_tokenizer_files_have_the_published_sizes():
    folder = CONFIG_ROOT / "clip_tokenizer"
    assert len(json.loads((folder / "vocab.json").read_text())) == 49408
    merges = (folder / "merges.txt").read_text().strip().split("\n")
    assert merges[0].startswith("#version") and len(merges) - 1 == 48894


def test_open_clip_tokenizer_pads_with_exclamation_mark():
    tokenizer = clip_tokenizer("!")
    ids = tokenizer("a cat", padding="max_length", max_length=6).input_ids
    assert ids == [49406, 320, 2368, 49407, 0, 0]


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_bundled_config_has_published_parameter_counts(arch):
    components = _meta_components(arch)
    for name, expected in EXPECTED[arch].items():
        count = sum(p.numel() for p in components[name].parameters())
        assert count == expected, f"{arch}/{name}: {count} parameters, expected {expected}"
    assert sum(p.numel() for p in components["vae"].parameters()) == VAE


@pytest.mark.parametrize("arch", sorted(DIFFUSERS_MODEL_TYPE))
def test_full_size_ldm_export_is_recognised_by_diffusers(arch):
    """The bundled config, exported to LDM keys, looks to diffusers like the real model."""
    components = _meta_components(arch)
    state = to_ldm(arch, _load_folder(arch), components)
    assert infer_diffusers_model_type(state) == DIFFUSERS_MODEL_TYPE[arch]


def test_sd2_768_is_v_prediction_and_others_epsilon():
    for arch, files in build_configs.ARCHITECTURES.items():
        expected = "v_prediction" if arch == "sd2-768-v" else "epsilon"
        assert files["scheduler/scheduler_config.json"]["prediction_type"] == expected


def test_committed_configs_match_the_builder():
    """handler/configs/ is what scripts/build_configs.py writes (nobody edited one by hand)."""
    for arch, files in build_configs.ARCHITECTURES.items():
        on_disk = _load_folder(arch)
        assert set(on_disk) == set(files), arch
        for relative, content in files.items():
            stored = {k: v for k, v in on_disk[relative].items() if k != "_diffusers_version"}
            assert stored == json.loads(json.dumps(content)), f"{arch}/{relative}"


def test_vae_attention_is_exported_as_1x1_convs():
    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_ROOT / "sd15" / "vae"))
    state = ldm_export.vae_to_ldm(vae.state_dict(), vae.config)
    assert tuple(state["first_stage_model.decoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
