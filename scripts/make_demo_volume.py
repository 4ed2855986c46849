"""Write a demo model root: tiny random-weight checkpoints, LoRAs and an embedding.

    python scripts/make_demo_volume.py DIR [--all]

The checkpoints are real single-file `.safetensors` in the original LDM / A1111 key layout, so
the worker's own detection and diffusers' single-file conversion run on them exactly as on a
civitai download. They are tiny (a few MB) and random: every image they make is noise.
Each carries a sidecar config folder (`NAME.config/`), because its sizes are not the published
ones the bundled configs describe. `--all` adds the SD2, refiner and inpainting variants that the
tests use for architecture detection.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import build_configs as bc  # noqa: E402
from scripts import ldm_export  # noqa: E402

TINY_CLIP = {
    **bc.CLIP_L,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
# SDXL's two encoders must differ in width: diffusers tells CLIP-L from OpenCLIP-G by it.
TINY_OPEN_CLIP = {**TINY_CLIP, "hidden_size": 64, "intermediate_size": 128, "hidden_act": "gelu"}
TINY_OPEN_CLIP_PROJ = {
    **TINY_OPEN_CLIP,
    "architectures": ["CLIPTextModelWithProjection"],
    "projection_dim": 64,
}
TINY_VAE = {
    **bc.VAE,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "sample_size": 64,
}
TINY_VAE_XL = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
TINY_UNET_SD1 = {
    **bc.UNET_SD1,
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "sample_size": 8,
}
TINY_UNET_SD2 = {
    **TINY_UNET_SD1,
    "attention_head_dim": [2, 4, 4, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 64,
}
TINY_UNET_XL = {
    **bc.UNET_XL,
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 96,  # 32 (CLIP-L) + 64 (OpenCLIP-G)
    "transformer_layers_per_block": [1, 1, 2],
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 64 + 6 * 8,
    "layers_per_block": 1,
    "sample_size": 8,
}
TINY_UNET_REFINER = {
    **TINY_UNET_XL,
    "cross_attention_dim": 64,
    "projection_class_embeddings_input_dim": 64 + 5 * 8,
}


def tiny_folders() -> dict[str, dict]:
    """Config folders of every tiny architecture, keyed like the bundled ones."""
    sd15 = bc.sd_pipeline(TINY_UNET_SD1, TINY_CLIP, bc.PNDM, vae=TINY_VAE)
    sdxl = bc.sdxl_pipeline(TINY_UNET_XL)
    sdxl.update(
        {
            "vae/config.json": TINY_VAE_XL,
            "text_encoder/config.json": TINY_CLIP,
            "text_encoder_2/config.json": TINY_OPEN_CLIP_PROJ,
        }
    )
    refiner = bc.sdxl_pipeline(TINY_UNET_REFINER, refiner=True)
    refiner.update(
        {"vae/config.json": TINY_VAE_XL, "text_encoder_2/config.json": TINY_OPEN_CLIP_PROJ}
    )
    return {
        "sd15": sd15,
        "sd15-inpaint": bc.inpainting(sd15),
        "sd2-768-v": bc.sd_pipeline(TINY_UNET_SD2, TINY_OPEN_CLIP, bc.DDIM_V, vae=TINY_VAE),
        "sdxl": sdxl,
        "sdxl-refiner": refiner,
        "sdxl-inpaint": bc.inpainting(sdxl),
    }


def build_components(folder: dict) -> dict[str, torch.nn.Module]:
    """Instantiate random-weight diffusers / transformers modules from a config folder dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_model(config: dict):
        cls = (
            CLIPTextModelWithProjection
            if config["architectures"][0].endswith("Projection")
            else CLIPTextModel
        )
        fields = {k: v for k, v in config.items() if k != "architectures"}
        return cls(CLIPTextConfig(**fields))

    components = {
        "unet": UNet2DConditionModel.from_config(folder["unet/config.json"]),
        "vae": AutoencoderKL.from_config(folder["vae/config.json"]),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if f"{name}/config.json" in folder:
            components[name] = text_model(folder[f"{name}/config.json"])
    return {name: module.eval() for name, module in components.items()}


def to_ldm(arch: str, folder: dict, components: dict) -> dict[str, torch.Tensor]:
    """The whole pipeline as one LDM-layout state dict."""
    state = {}
    state.update(
        ldm_export.unet_to_ldm(components["unet"].state_dict(), folder["unet/config.json"])
    )
    state.update(ldm_export.vae_to_ldm(components["vae"].state_dict(), folder["vae/config.json"]))
    if arch.startswith("sd15"):
        state.update(
            ldm_export.clip_to_ldm(
                components["text_encoder"].state_dict(), ldm_export.SD1_CLIP_PREFIX
            )
        )
    elif arch.startswith("sd2"):
        hidden = folder["text_encoder/config.json"]["hidden_size"]
        state.update(
            ldm_export.open_clip_to_ldm(
                components["text_encoder"].state_dict(), ldm_export.SD2_OPEN_CLIP_PREFIX, hidden
            )
        )
    elif arch == "sdxl-refiner":
        hidden = folder["text_encoder_2/config.json"]["hidden_size"]
        state.update(
            ldm_export.open_clip_to_ldm(
                components["text_encoder_2"].state_dict(),
                ldm_export.REFINER_OPEN_CLIP_PREFIX,
                hidden,
            )
        )
    else:
        hidden = folder["text_encoder_2/config.json"]["hidden_size"]
        state.update(
            ldm_export.clip_to_ldm(
                components["text_encoder"].state_dict(), ldm_export.SDXL_CLIP_L_PREFIX
            )
        )
        state.update(
            ldm_export.open_clip_to_ldm(
                components["text_encoder_2"].state_dict(), ldm_export.SDXL_OPEN_CLIP_PREFIX, hidden
            )
        )
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def write_checkpoint(root: Path, name: str, arch: str, seed: int = 0) -> Path:
    """Write `checkpoints/NAME.safetensors` and its sidecar `NAME.config/` folder."""
    folder = copy.deepcopy(tiny_folders()[arch])
    torch.manual_seed(seed)
    components = build_components(folder)
    path = root / "checkpoints" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"modelspec.prediction_type": "v"} if arch == "sd2-768-v" else None
    save_file(to_ldm(arch, folder, components), str(path), metadata=metadata)
    bc.write_folder(root / "checkpoints" / f"{name}.config", folder)
    return path


def _random_lora(modules: dict[str, torch.nn.Module], rank: int, gen: torch.Generator) -> dict:
    """Random (down, up) pairs for the given modules, shaped like their weights."""
    pairs = {}
    for name, module in modules.items():
        out_features, in_features = module.weight.shape[:2]
        extra = (1, 1) if module.weight.ndim == 4 else ()
        down = torch.randn(rank, in_features, *extra, generator=gen) * 0.2
        up = torch.randn(out_features, rank, *extra, generator=gen) * 0.2
        pairs[name] = (down, up)
    return pairs


def _lora_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name.endswith(suffixes) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


UNET_LORA_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "proj_in",
    "proj_out",
)
TEXT_LORA_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def write_loras(root: Path, arch: str, components: dict, folder: dict, seed: int) -> list[Path]:
    """Write a kohya-format and a diffusers/peft-format LoRA for one architecture."""
    gen = torch.Generator().manual_seed(seed)
    rank = 4
    text_encoders = [n for n in ("text_encoder", "text_encoder_2") if n in components]
    unet_pairs = _random_lora(_lora_targets(components["unet"], UNET_LORA_SUFFIXES), rank, gen)
    text_pairs = {
        n: _random_lora(_lora_targets(components[n], TEXT_LORA_SUFFIXES), rank, gen)
        for n in text_encoders
    }
    out = root / "loras"
    out.mkdir(parents=True, exist_ok=True)

    # kohya / sd-scripts: module paths with "_" separators, lora_down/lora_up/alpha.
    # SD1.x files use diffusers UNet names, SDXL files use the LDM ("input_blocks") names.
    kohya = {}
    unet_names = {name: name for name in unet_pairs}
    if arch == "sdxl":
        ldm = ldm_export.unet_to_ldm(
            {f"{n}.weight": torch.empty(0) for n in unet_pairs}, folder["unet/config.json"]
        )
        unet_names = {
            n: k[len(ldm_export.UNET_PREFIX) : -len(".weight")]
            for n, k in zip(unet_pairs, ldm, strict=True)
        }
    for name, (down, up) in unet_pairs.items():
        key = "lora_unet_" + unet_names[name].replace(".", "_")
        kohya.update(
            {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(float(rank)),
            }
        )
    te_prefix = {
        "text_encoder": "lora_te1_" if arch == "sdxl" else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    for encoder, pairs in text_pairs.items():
        for name, (down, up) in pairs.items():
            path = name if name.startswith("text_model.") else "text_model." + name
            key = te_prefix[encoder] + path.replace(".", "_")
            kohya.update(
                {
                    f"{key}.lora_down.weight": down,
                    f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(float(rank)),
                }
            )
    kohya_path = out / f"demo_{arch}_kohya.safetensors"
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in kohya.items()},
        str(kohya_path),
        metadata={"ss_network_module": "networks.lora", "ss_base_model_version": arch},
    )

    # diffusers / peft: "<component>.<module>.lora_A.weight" / "lora_B.weight".
    peft = {}
    for name, (down, up) in unet_pairs.items():
        peft.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
    for encoder, pairs in text_pairs.items():
        for name, (down, up) in pairs.items():
            path = name if name.startswith("text_model.") else "text_model." + name
            peft.update(
                {f"{encoder}.{path}.lora_A.weight": down, f"{encoder}.{path}.lora_B.weight": up}
            )
    peft_path = out / f"demo_{arch}_peft.safetensors"
    save_file(
        {k: v.contiguous() for k, v in peft.items()}, str(peft_path), metadata={"format": "pt"}
    )
    return [kohya_path, peft_path]


def write_embedding(root: Path, name: str, arch: str, seed: int) -> Path:
    """An A1111 textual-inversion embedding (2 vectors)."""
    gen = torch.Generator().manual_seed(seed)
    if arch == "sdxl":
        tensors = {
            "clip_l": torch.randn(2, TINY_CLIP["hidden_size"], generator=gen),
            "clip_g": torch.randn(2, TINY_OPEN_CLIP["hidden_size"], generator=gen),
        }
    else:
        tensors = {"emb_params": torch.randn(2, TINY_CLIP["hidden_size"], generator=gen)}
    path = root / "embeddings" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_vae(root: Path, name: str, arch: str, seed: int) -> Path:
    """A standalone VAE file, as distributed (LDM keys without the first_stage_model. prefix)."""
    from diffusers import AutoencoderKL

    folder = tiny_folders()[arch]
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(folder["vae/config.json"]).eval()
    state = ldm_export.vae_to_ldm(vae.state_dict(), folder["vae/config.json"])
    state = {
        k.removeprefix(ldm_export.VAE_PREFIX): v.to(torch.float16).contiguous()
        for k, v in state.items()
    }
    path = root / "vae" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_safety_checker(root: Path, seed: int) -> Path:
    """A tiny random-weight safety checker in the diffusers format (model + image processor).

    Its concept thresholds are set so that it flags every image: with random weights nothing
    else would be predictable, and a checker that always fires shows what the policy does.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    tiny = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(
        text_config={**tiny, "vocab_size": 49408},
        vision_config={**tiny, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine similarity is always above -2
    folder = root / "safety_checker"
    checker.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder / "config.json"


def make_demo_volume(root: Path, include_all: bool = False) -> dict:
    """Write the demo model root and return a summary of what it holds."""
    root = Path(root)
    started = time.perf_counter()
    written = []
    for index, arch in enumerate(["sd15", "sdxl"]):
        name = f"demo-{arch}"
        written.append(write_checkpoint(root, name, arch, seed=index))
        folder = tiny_folders()[arch]
        torch.manual_seed(index)
        written += write_loras(root, arch, build_components(folder), folder, seed=100 + index)
        written.append(write_embedding(root, f"demo-{arch}-embedding", arch, seed=200 + index))
    if include_all:
        for index, arch in enumerate(["sd15-inpaint", "sd2-768-v", "sdxl-refiner", "sdxl-inpaint"]):
            written.append(write_checkpoint(root, f"demo-{arch}", arch, seed=10 + index))
    written.append(write_vae(root, "demo-vae-sd15", "sd15", seed=300))
    written.append(write_safety_checker(root, seed=400))
    # safetensors writes its files for their owner alone (0600): a worker running as another
    # user could not read the volume. Give them the modes the umask gives new files.
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    return {
        "root": str(root),
        "files": sorted(str(p.relative_to(root)) for p in written),
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument(
        "--all", action="store_true", help="also write SD2, refiner and inpaint checkpoints"
    )
    args = parser.parse_args()
    print(json.dumps(make_demo_volume(args.root, include_all=args.all), indent=2))


if __name__ == "__main__":
    main()
