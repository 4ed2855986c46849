"""Export diffusers-format weights to the original LDM ("A1111 / civitai") single-file layout.

diffusers only converts LDM -> diffusers. Test fixtures and the benchmark need the other
direction, so that the real single-file loading path runs on the checkpoints they write.
The key names below are the published layouts of the CompVis / Stability checkpoints.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _rename_module(key: str, renames: dict[str, str]) -> str:
    """Rename the module part of `key` (everything before .weight/.bias) by exact match."""
    module, _, param = key.rpartition(".")
    return f"{renames.get(module, module)}.{param}"


def _prefix_map(prefix_to: str, rest: str, inner: dict[str, str]) -> str:
    """`prefix_to` + `rest`, renaming the module part of `rest` through `inner`."""
    module, sep, param = rest.rpartition(".")
    if not sep:
        return prefix_to + rest
    return f"{prefix_to}{inner.get(module, module)}.{param}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Map a diffusers UNet2DConditionModel state dict to `model.diffusion_model.*` keys."""
    layers = config["layers_per_block"]
    down_has_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    prefixes: list[tuple[str, str, dict[str, str]]] = []
    for i, _ in enumerate(down_has_attn):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            prefixes.append(
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET)
            )
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", {}))
        block = 1 + i * (layers + 1) + layers
        prefixes.append(
            (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", {})
        )
    prefixes.append(("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET))
    prefixes.append(("mid_block.attentions.0.", "middle_block.1.", {}))
    prefixes.append(("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET))
    for i, has_attn in enumerate(up_has_attn):
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            prefixes.append(
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", UNET_RESNET)
            )
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", {}))
        block = i * (layers + 1) + layers
        slot = 2 if has_attn else 1
        prefixes.append(
            (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{block}.{slot}.conv.", {})
        )

    out = {}
    for key, value in state.items():
        for src, dst, inner in prefixes:
            if key.startswith(src):
                new = _prefix_map(dst, key[len(src) :], inner)
                break
        else:
            new = _rename_module(key, UNET_TOP)
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Map a diffusers AutoencoderKL state dict to `first_stage_model.*` keys."""
    levels = len(config["block_out_channels"])
    prefixes: list[tuple[str, str, dict[str, str]]] = []
    for part in ("encoder", "decoder"):
        prefixes.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET))
        prefixes.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET))
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION))
        prefixes.append((f"{part}.conv_norm_out.", f"{part}.norm_out.", {}))
    for i in range(levels):
        for j in range(config["layers_per_block"] + 1):
            prefixes.append(
                (
                    f"encoder.down_blocks.{i}.resnets.{j}.",
                    f"encoder.down.{i}.block.{j}.",
                    VAE_RESNET,
                )
            )
            # The decoder's up blocks are stored in reverse order in LDM.
            prefixes.append(
                (
                    f"decoder.up_blocks.{i}.resnets.{j}.",
                    f"decoder.up.{levels - 1 - i}.block.{j}.",
                    VAE_RESNET,
                )
            )
        prefixes.append(
            (
                f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                f"encoder.down.{i}.downsample.conv.",
                {},
            )
        )
        prefixes.append(
            (
                f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                f"decoder.up.{levels - 1 - i}.upsample.conv.",
                {},
            )
        )

    out = {}
    for key, value in state.items():
        new = key
        for src, dst, inner in prefixes:
            if key.startswith(src):
                new = _prefix_map(dst, key[len(src) :], inner)
                break
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM stores VAE attention projections as 1x1 convs
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Map a Hugging Face CLIPTextModel state dict under `prefix` (CLIP-L in SD1 / SDXL)."""
    out = {}
    for key, value in state.items():
        if not key.startswith("text_model."):
            key = "text_model." + key  # transformers >= 5.6 flattens CLIPTextModel
        out[prefix + key] = value
    return out


def open_clip_to_ldm(
    state: dict[str, torch.Tensor], prefix: str, hidden: int
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face CLIP text model to the OpenCLIP layout (SD2, SDXL's second encoder)."""
    state = {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
        for k, v in state.items()
    }
    out: dict[str, torch.Tensor] = {}
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    inner = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for key, value in state.items():
        if key in top:
            out[prefix + top[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers.") :]
            index, _, name = rest.partition(".")
            module, _, param = name.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue  # concatenated below
            out[f"{prefix}transformer.resblocks.{index}.{inner.get(module, module)}.{param}"] = (
                value
            )
    layers = {k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")}
    for index in layers:
        base = f"text_model.encoder.layers.{index}.self_attn."
        for param in ("weight", "bias"):
            qkv = [state[f"{base}{p}_proj.{param}"] for p in ("q", "k", "v")]
            out[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat(qkv, 0)
    if prefix + "text_projection" not in out:
        # SD2 checkpoints carry the projection although SD2 does not use it.
        out[prefix + "text_projection"] = torch.zeros(
            hidden, hidden, dtype=out[prefix + "positional_embedding"].dtype
        )
    return out
