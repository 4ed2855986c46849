"""Cog adapter for Replicate: typed web-form inputs -> schema -> engine -> image files.

Defaults, bounds and choices are literals (Cog's static schema parser reads this file without
running it); tests/test_cog_predictor.py checks every one against handler/schema.py.
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path as FilePath

from cog import BaseRunner, Input, Path

from handler.engine import Engine
from handler.schema import parse_job
from handler.settings import Settings


def parse_lora_list(text: str) -> list[dict]:
    """'name:0.8, other' -> [{"name": "name", "scale": 0.8}, {"name": "other", "scale": 1.0}]."""
    loras = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, scale = item.rpartition(":") if ":" in item else (item, "", "")
        loras.append({"name": name.strip(), "scale": float(scale) if scale.strip() else 1.0})
    return loras


class _LogProgress:
    """Prints denoising progress to the prediction log, at most about twice a second."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, progress) -> None:
        now = time.monotonic()
        if progress.phase in ("denoising", "refining") and (
            now - self._last >= 0.5 or progress.step == progress.total
        ):
            self._last = now
            print(f"{progress.phase} {progress.step}/{progress.total}", flush=True)


class Predictor(BaseRunner):
    """Stable Diffusion 1.x / 2.x / XL from the model root baked into the image (./models)."""

    def setup(self) -> None:
        self.engine = Engine(Settings.from_env())
        self.engine.setup()
        self.outputs = FilePath(tempfile.mkdtemp(prefix="sd-outputs-"))

    def run(
        self,
        prompt: str = Input(description="What to draw. A1111 syntax works, e.g. <lora:name:0.8>."),
        negative_prompt: str = Input(default="", description="What to keep out of the image."),
        checkpoint: str | None = Input(
            default=None,
            description="Checkpoint name on the model root (e.g. sdxl/juggernaut). Empty uses "
            "the model's default checkpoint.",
        ),
        width: int | None = Input(
            default=None,
            ge=64,
            le=2048,
            description="Width in pixels, a multiple of 8. Empty uses the checkpoint's native size.",
        ),
        height: int | None = Input(
            default=None,
            ge=64,
            le=2048,
            description="Height in pixels, a multiple of 8. Empty uses the checkpoint's native size.",
        ),
        steps: int = Input(default=30, ge=1, le=150, description="Denoising steps."),
        guidance_scale: float = Input(
            default=7.0, ge=0.0, le=30.0, description="Classifier-free guidance (CFG) scale."
        ),
        scheduler: str = Input(
            default="DPM++ 2M Karras",
            choices=[
                "Euler",
                "Euler a",
                "Heun",
                "LMS",
                "DPM2",
                "DPM2 a",
                "DPM++ 2M",
                "DPM++ 2M Karras",
                "DPM++ 2M SDE Karras",
                "DPM++ SDE",
                "DPM++ SDE Karras",
                "DDIM",
                "PNDM",
                "UniPC",
                "LCM",
            ],
            description="Sampler (A1111 names).",
        ),
        seed: int | None = Input(
            default=None,
            ge=0,
            le=18446744073709551615,
            description="Seed of the first image; image i uses seed + i. Empty means random.",
        ),
        num_images: int = Input(default=1, ge=1, le=8, description="Number of images."),
        loras: str = Input(
            default="",
            description="LoRAs as 'name:scale, name:scale' (names under loras/). "
            "<lora:name:scale> in the prompt works too.",
        ),
        image: Path | None = Input(
            default=None, description="Init image for img2img, or the image to inpaint."
        ),
        mask: Path | None = Input(
            default=None, description="Inpainting mask: white is repainted, black is kept."
        ),
        mask_blur: int = Input(
            default=4, ge=0, le=64, description="Inpainting: mask edge blur in pixels."
        ),
        invert_mask: bool = Input(
            default=False, description="Inpainting: repaint the black part instead."
        ),
        strength: float = Input(
            default=0.75,
            ge=0.0,
            le=1.0,
            description="img2img: how much of the init image is repainted (1.0 ignores it).",
        ),
        vae: str | None = Input(
            default=None, description="VAE name under vae/ to use instead of the checkpoint's."
        ),
        clip_skip: int = Input(
            default=1,
            ge=1,
            le=12,
            description="A1111's CLIP skip: 1 uses the last text-encoder layer, 2 the one before.",
        ),
        refiner_checkpoint: str | None = Input(
            default=None, description="SDXL refiner checkpoint (used with high_noise_frac)."
        ),
        high_noise_frac: float | None = Input(
            default=None,
            ge=0.05,
            le=0.95,
            description="SDXL refiner ensemble: the fraction of steps the base model runs.",
        ),
        output_format: str = Input(
            default="png", choices=["png", "jpeg", "webp"], description="Image file format."
        ),
        output_quality: int = Input(
            default=90, ge=1, le=100, description="Quality for jpeg and webp (1-100)."
        ),
        strip_metadata: bool = Input(
            default=False,
            description="API only: write no generation parameters (infotext) into the files.",
        ),
    ) -> list[Path]:
        """Generate images; each file's name and infotext carry its seed."""
        payload = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "checkpoint": checkpoint or None,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "scheduler": scheduler,
            "seed": seed,
            "num_images": num_images,
            "loras": parse_lora_list(loras),
            "strength": strength,
            "mask_blur": mask_blur,
            "invert_mask": invert_mask,
            "vae": vae or None,
            "clip_skip": clip_skip,
            "refiner_checkpoint": refiner_checkpoint or None,
            "high_noise_frac": high_noise_frac,
            "output_format": output_format,
            "output_quality": output_quality,
            "strip_metadata": strip_metadata,
            "destination": "base64",
        }
        for name, path in (("image", image), ("mask", mask)):
            if path is not None:
                payload[name] = base64.b64encode(FilePath(path).read_bytes()).decode("ascii")
        # WorkerError propagates: the prediction fails with "<code>: <field>: ...".
        result = self.engine.run(parse_job(payload), progress=_LogProgress())
        files = []
        for item in result.images:
            path = self.outputs / f"{item.index}-{item.seed}.{item.format}"
            path.write_bytes(base64.b64decode(item.image.split(",", 1)[1]))
            print(f"image {item.index}: seed {item.seed}")
            files.append(Path(path))
        for warning in result.warnings:
            print(f"warning: {warning}")
        return files
