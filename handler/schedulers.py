"""Scheduler (sampler) names: the canonical set, their aliases, and how each is built.

Canonical names are A1111's sampler names, which most users know. A1111's older combined names
("DPM++ 2M Karras"), worker-sdxl's K_* names, ComfyUI's names and diffusers class names are
accepted as aliases; a class name runs as diffusers runs it by default.
A sampler followed by one of A1111's schedule types ("DPM++ 2M Exponential", "Euler SGM
Uniform") is a name too, for the samplers whose diffusers class has that schedule.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

# canonical name -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
DEFAULT_SCHEDULER = "DPM++ 2M Karras"

# The samplers A1111 runs through k-diffusion. With no schedule type they run on A1111's
# "Uniform" schedule (k-diffusion's `get_sigmas`, ComfyUI's "normal"): timesteps evenly spaced
# from the last (999) to the first (0), which is diffusers' "linspace" spacing. The SD and SDXL
# configs' own spacing, "leading", starts lower (951 of 999 at 20 steps) and is A1111's "DDIM"
# schedule type, as its DDIM and PLMS samplers use it.
K_DIFFUSION_SAMPLERS = frozenset(
    {"Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE"}
)
UNIFORM_SCHEDULE = {"timestep_spacing": "linspace"}
# A1111's schedule types (its `scheduler` field since 1.9) that diffusers has, as the config
# they set. "SGM Uniform" is trailing timestep spacing, as diffusers' scheduler docs map it.
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    # the checkpoint config's own spacing, as diffusers runs it by default: "leading" for SD and
    # SDXL, which is A1111's DDIM schedule; a zero-terminal-SNR checkpoint's "trailing"
    "DDIM": {},
}
# Samplers whose diffusers class has no sigma schedules (use_*_sigmas): only SGM Uniform.
NO_SIGMA_SCHEDULES = frozenset({"Euler a", "DDIM", "PNDM", "LCM"})

_EXTRA_ALIASES = {
    # worker-sdxl / Replicate K-diffusion style names
    "K_EULER": "Euler",
    "K_EULER_ANCESTRAL": "Euler a",
    "K_HEUN": "Heun",
    "K_LMS": "LMS",
    "K_DPM_2": "DPM2",
    "K_DPM_2_ANCESTRAL": "DPM2 a",
    "K_DPMPP_2M": "DPM++ 2M",
    "K_DPMPP_2M_KARRAS": "DPM++ 2M Karras",
    "K_DPMPP_SDE": "DPM++ SDE",
    "K_DPMPP_SDE_KARRAS": "DPM++ SDE Karras",
    "KarrasDPM": "DPM++ 2M Karras",
    "HeunDiscrete": "Heun",  # cog-sdxl's name
    # A1111's own aliases (its API takes them as sampler names)
    "k_euler_a": "Euler a",
    "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2m_ka": "DPM++ 2M Karras",
    "k_dpmpp_sde_ka": "DPM++ SDE Karras",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE Karras",
    "k_lms_ka": "LMS Karras",
    "k_dpm_2_ka": "DPM2 Karras",
    "k_dpm_2_a_ka": "DPM2 a Karras",
    "PLMS": "PNDM",
    # ComfyUI's sampler names that the folding below does not already make ours
    "euler_ancestral": "Euler a",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "uni_pc": "UniPC",
}


# diffusers class names: the sampler as diffusers runs it by default, on the checkpoint config's
# own spacing ("leading" for SD and SDXL: the "DDIM" schedule type of the k-diffusion samplers)
DIFFUSERS_CLASSES = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverMultistep": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PNDM",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}


def _key(name: str) -> str:
    """Fold case, '++' vs 'pp', spaces, dashes and underscores: 'dpm++_2m karras' == 'DPMPP2MKarras'."""
    return re.sub(r"[\s_\-]+", "", name.lower().replace("++", "pp"))


_ALIASES: dict[str, str] = {_key(name): name for name in SCHEDULERS}
_ALIASES.update({_key(alias): name for alias, name in _EXTRA_ALIASES.items()})
_ALIASES.update({_key(name.replace(" ", "_")): name for name in SCHEDULERS})
_ALIASES.update({_key(name): sampler for name, sampler in DIFFUSERS_CLASSES.items()})
_CLASS_KEYS = {_key(name) for name in DIFFUSERS_CLASSES}
# Names of the Uniform schedule, which the k-diffusion samplers run without a schedule type
# (A1111's "Uniform", ComfyUI's "normal"), as a suffix: "DPM++ 2M Uniform" is "DPM++ 2M".
_UNIFORM_KEYS = ("uniform", "normal")


def canonical_scheduler(name: str) -> str | None:
    """The canonical name for `name` or one of its aliases ("K_EULER karras" -> "Euler
    Karras"), or None if unknown or a schedule type the sampler does not have."""
    known = _ALIASES.get(_key(name))
    if known is not None:
        if _key(name) in _CLASS_KEYS and known in K_DIFFUSION_SAMPLERS:
            return f"{known} DDIM"  # diffusers' default spacing for SD and SDXL
        return known
    for schedule in SCHEDULE_TYPES:
        if _key(name).endswith(_key(schedule)):
            base = _ALIASES.get(_key(name)[: -len(_key(schedule))])
            if base is not None and takes_schedule(base, schedule):
                return f"{base} {schedule}"
            if base in ("DDIM", "PNDM") and schedule == "DDIM":
                return base  # they run on the DDIM schedule already
    for uniform in _UNIFORM_KEYS:
        base = _ALIASES.get(_key(name).removesuffix(uniform))
        if _key(name).endswith(uniform) and base in K_DIFFUSION_SAMPLERS:
            return base
    return None


def sampler_named(name: str) -> str | None:
    """`canonical_scheduler`, but a diffusers class name is its sampler alone: its default
    schedule gives way to a schedule type sent beside it ("EulerDiscreteScheduler" + "Karras")."""
    if _key(name) in _CLASS_KEYS:
        return _ALIASES[_key(name)]
    return canonical_scheduler(name)


def takes_schedule(sampler: str, schedule: str) -> bool:
    """Whether canonical `sampler` can run with A1111 schedule type `schedule`: not one that
    already names a schedule ("DPM++ 2M Karras"), and one whose class has sigma schedules."""
    _, overrides = SCHEDULERS[sampler]
    if any(key in overrides for config in SCHEDULE_TYPES.values() for key in config):
        return False
    if schedule == "DDIM":  # the spacing DDIM and PNDM already run on
        return sampler in K_DIFFUSION_SAMPLERS
    return schedule == "SGM Uniform" or sampler not in NO_SIGMA_SCHEDULES


def split_schedule(name: str) -> tuple[str, str | None]:
    """A canonical name as (sampler, schedule type): "DPM++ 2M Karras" -> ("DPM++ 2M",
    "Karras"), "Euler" -> ("Euler", None)."""
    for schedule in SCHEDULE_TYPES:
        base = name.removesuffix(f" {schedule}")
        if base != name and base in SCHEDULERS:
            return base, schedule
    return name, None


def build_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler of canonical `name`, keeping the checkpoint's noise schedule."""
    import diffusers

    if name in SCHEDULERS:
        class_name, overrides = SCHEDULERS[name]
        if name in K_DIFFUSION_SAMPLERS and base_config.get("timestep_spacing") == "leading":
            # A1111's Uniform; a checkpoint whose config chose another spacing keeps it (a
            # zero-terminal-SNR one starts from pure noise with "trailing")
            overrides = {**overrides, **UNIFORM_SCHEDULE}
    else:
        sampler, schedule = split_schedule(name)
        class_name, overrides = SCHEDULERS[sampler]
        overrides = {**overrides, **SCHEDULE_TYPES[schedule]}
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    # A checkpoint's default scheduler may carry options another class does not take; the
    # noise schedule (betas, prediction type, timestep spacing) is what must carry over.
    sigma_options = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    for option in ("skip_prk_steps", "algorithm_type", *sigma_options):
        config.pop(option, None)
    scheduler_class = getattr(diffusers, class_name)
    config = {**config, **overrides}
    if config.get("rescale_betas_zero_snr") and not takes_option(
        scheduler_class, "rescale_betas_zero_snr"
    ):
        config["trained_betas"] = zero_terminal_snr_betas(config)
    return scheduler_class.from_config(config)


def takes_option(scheduler_class: type, option: str) -> bool:
    """Whether a diffusers scheduler class has config option `option` (from_config drops the
    options a class does not have, silently)."""
    return option in inspect.signature(scheduler_class.__init__).parameters


def zero_terminal_snr_betas(config: dict[str, Any]) -> list[float]:
    """The zero-terminal-SNR betas of `config`'s noise schedule, for the scheduler classes that
    have no `rescale_betas_zero_snr` (Heun, LMS, DPM2, DPM++ SDE and PNDM in diffusers 0.42).

    They are the ones diffusers' Euler scheduler uses: rescaled by diffusers, with the last
    alphas_cumprod 2**-24 instead of 0, so that the first sigma is large but finite.
    """
    import diffusers
    import torch

    euler = diffusers.EulerDiscreteScheduler.from_config(
        {**config, "rescale_betas_zero_snr": True, "trained_betas": None}
    )
    alphas_cumprod = euler.alphas_cumprod.double()
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return (1 - alphas).tolist()
