"""Write the diffusers config folders bundled in handler/configs/.

Single-file checkpoints carry weights but no configuration, and diffusers would fetch the
matching config repo from the hub. We bundle the configs instead, one folder per architecture,
written from the published hyper-parameters of each base model. Run it after changing a value:

    python scripts/build_configs.py

Tokenizer files are shared by all architectures (handler/configs/clip_tokenizer/, built by
scripts/build_tokenizer.py) and handed to the pipelines at load time, so they are not copied
into every folder.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "handler" / "configs"
DIFFUSERS_VERSION = "0.42.1"

# Noise schedule shared by every SD 1.x / 2.x / XL model.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# OpenCLIP ViT-H/14 text tower as SD 2.x uses it (the last of 24 layers is dropped).
OPEN_CLIP_H = {
    **CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
# OpenCLIP ViT-bigG/14 text tower with its projection (SDXL's second encoder).
OPEN_CLIP_BIG_G = {
    **CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
VAE_XL = {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

UNET_SD1 = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "sample_size": 64,
}
UNET_SD2 = {
    **UNET_SD1,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "sample_size": 96,
}
UNET_XL = {
    **UNET_SD1,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "sample_size": 128,
}
UNET_XL_REFINER = {
    **UNET_XL,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
}

NO_COMPONENT = [None, None]


def sd_pipeline(unet: dict, text_encoder: dict, scheduler: dict, vae: dict = VAE) -> dict:
    """An SD 1.x/2.x pipeline folder: model_index plus component configs."""
    return {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": NO_COMPONENT,
            "image_encoder": NO_COMPONENT,
            "safety_checker": NO_COMPONENT,
            "requires_safety_checker": False,
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": unet,
        "vae/config.json": vae,
        "text_encoder/config.json": text_encoder,
        "scheduler/scheduler_config.json": scheduler,
    }


def sdxl_pipeline(unet: dict, refiner: bool = False) -> dict:
    """An SDXL base or refiner pipeline folder."""
    scheduler = {
        "_class_name": "EulerDiscreteScheduler",
        **SCHEDULE,
        "interpolation_type": "linear",
    }
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline"
        if refiner
        else "StableDiffusionXLPipeline",
        "feature_extractor": NO_COMPONENT,
        "image_encoder": NO_COMPONENT,
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": NO_COMPONENT if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": NO_COMPONENT if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    folder = {
        "model_index.json": index,
        "unet/config.json": unet,
        "vae/config.json": VAE_XL,
        "text_encoder_2/config.json": OPEN_CLIP_BIG_G,
        "scheduler/scheduler_config.json": scheduler,
    }
    if not refiner:
        folder["text_encoder/config.json"] = CLIP_L
    return folder


def inpainting(folder: dict) -> dict:
    """The 9-channel inpainting variant: latents + mask + masked-image latents in."""
    folder = copy.deepcopy(folder)
    folder["unet/config.json"]["in_channels"] = 9
    index = folder["model_index.json"]
    index["_class_name"] = index["_class_name"].replace("Pipeline", "InpaintPipeline")
    return folder


PNDM = {"_class_name": "PNDMScheduler", **SCHEDULE, "skip_prk_steps": True}
DDIM_V = {"_class_name": "DDIMScheduler", **SCHEDULE, "prediction_type": "v_prediction"}
DDIM = {"_class_name": "DDIMScheduler", **SCHEDULE}

ARCHITECTURES: dict[str, dict] = {
    "sd15": sd_pipeline(UNET_SD1, CLIP_L, PNDM),
    "sd15-inpaint": inpainting(sd_pipeline(UNET_SD1, CLIP_L, PNDM)),
    "sd2-768-v": sd_pipeline(UNET_SD2, OPEN_CLIP_H, DDIM_V, vae={**VAE, "sample_size": 768}),
    "sd2-512": sd_pipeline({**UNET_SD2, "sample_size": 64}, OPEN_CLIP_H, DDIM),
    "sdxl": sdxl_pipeline(UNET_XL),
    "sdxl-refiner": sdxl_pipeline(UNET_XL_REFINER, refiner=True),
    "sdxl-inpaint": inpainting(sdxl_pipeline(UNET_XL)),
}


def write_folder(target: Path, files: dict[str, dict]) -> None:
    """Write one config folder, stamping each diffusers config with the version."""
    if target.exists():
        shutil.rmtree(target)
    for relative, content in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        content = dict(content)
        if "_class_name" in content or relative == "model_index.json":
            content["_diffusers_version"] = DIFFUSERS_VERSION
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def main() -> None:
    for name, files in ARCHITECTURES.items():
        write_folder(CONFIG_ROOT / name, files)
    print(json.dumps({"written": sorted(ARCHITECTURES), "root": str(CONFIG_ROOT)}))


if __name__ == "__main__":
    main()
