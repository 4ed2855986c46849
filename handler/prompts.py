"""A1111 prompt syntax: attention weights and prompts longer than CLIP's 77 tokens.

`(word)` multiplies the weight by 1.1, `[word]` divides it by 1.1, `(word:1.3)` multiplies it
by 1.3, `\\(` is a literal parenthesis, unclosed brackets run to the end, and `BREAK` starts a
new 75-token chunk. Long prompts are split into chunks of 75 tokens, each encoded as its own
77-token window (BOS + 75 + EOS) and concatenated, as A1111 does, so nothing is truncated.
Weighted token embeddings are rescaled to keep the chunk's mean (A1111's "original" emphasis).

A1111 syntax that changes the prompt during sampling (`[from:to:when]`, `[a|b]`) is refused,
other extra networks' tags (`<hypernet:...>`) are removed, and `AND` is encoded as text, each
with a clear error or warning (`check_syntax`), rather than read as literal text silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from handler.errors import InvalidInput

CHUNK_TOKENS = 75  # 77 minus BOS and EOS
ROUND_UP, SQUARE_DOWN = 1.1, 1 / 1.1
_TOKEN = re.compile(
    r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_SYNTAX = re.compile(r"[()\[\]]|\bBREAK\b")
# A1111's extra-network tags; <lora:...> and <lyco:...> are read before (handler.loras)
EXTRA_NETWORK = re.compile(r"<(\w+):[^>]+>")
_AND = re.compile(r"\bAND\b")
SUPPORTED_SYNTAX = (
    "A1111 attention syntax: (word), (word:1.2), [word], BREAK, <lora:name:scale>; "
    "\\[ and \\] for literal brackets"
)


def check_syntax(text: str, field: str) -> tuple[str, list[str]]:
    """Refuse A1111 syntax that this worker does not run, and remove other extra networks'
    tags; returns the text and warnings. Read as plain text, `[cat:dog:0.5]` would have given a
    weighted "cat:dog:0.5" with no sign that anything was wrong."""
    scheduled = _scheduled_syntax(text)
    if scheduled:
        raise InvalidInput(
            f"{scheduled} is not supported (the prompt cannot change during sampling here)",
            field=field,
            accepted=SUPPORTED_SYNTAX,
        )
    warnings = []
    kinds = sorted({match.group(1) for match in EXTRA_NETWORK.finditer(text)})
    if kinds:
        # the tags' kinds only: their text is prompt text, which stays out of logs
        text = re.sub(r"\s{2,}", " ", EXTRA_NETWORK.sub("", text)).strip()
        shown = ", ".join(f"<{kind}:...>" for kind in kinds)
        warnings.append(f"{field}: {shown} tags removed: only LoRA extra networks are supported")
    if _AND.search(text):
        warnings.append(
            f"{field}: AND (A1111's composable diffusion) is not supported: the prompt was "
            "encoded as one text, AND included"
        )
    return text, warnings


def _scheduled_syntax(text: str) -> str | None:
    """The name of A1111's prompt editing or alternation if `text` uses them: a `:` or `|`
    directly inside a closed `[...]` (inside `(...)` a colon is a weight)."""
    stack: list[list] = []  # [bracket, what a ":" or "|" directly inside it made it]
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "([":
            stack.append([char, None])
        elif char in ")]" and stack and stack[-1][0] == ("(" if char == ")" else "["):
            _, found = stack.pop()
            if found:
                return found
        elif char in ":|" and stack and stack[-1][0] == "[":
            stack[-1][1] = "prompt editing [from:to:when]" if char == ":" else "alternation [a|b]"
    return None


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; adjacent runs of equal weight are merged.

    A BREAK is the run ("BREAK", -1), as in A1111 (`is_break`).
    """
    runs: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):  # an escaped character; a lone backslash is dropped
            if token[1:]:
                runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND_UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE_DOWN)
        else:
            parts = _BREAK.split(token)
            for index, part in enumerate(parts):
                if index:
                    runs.append(["BREAK", -1.0])
                if part:
                    runs.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND_UP)
    for start in square_open:
        scale(start, SQUARE_DOWN)

    merged: list[list[Any]] = []
    for text_run, weight in runs:
        if merged and merged[-1][1] == weight and not is_break(text_run, weight):
            merged[-1][0] += text_run
        else:
            merged.append([text_run, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]


def is_break(text: str, weight: float) -> bool:
    return text == "BREAK" and weight == -1.0


def needs_own_encoding(pipeline, prompts: list[str]) -> bool:
    """True when a prompt uses A1111 syntax or is longer than one 77-token window, counted
    with its multi-vector embeddings spelled out (diffusers would cut what goes past)."""
    tokenizer = pipeline.tokenizer or pipeline.tokenizer_2
    for prompt in prompts:
        if _SYNTAX.search(prompt):
            return True
        spelled_out = _multi_vector(pipeline, prompt, tokenizer)
        if len(tokenizer(spelled_out, add_special_tokens=False).input_ids) > CHUNK_TOKENS:
            return True
    return False


@dataclass
class Chunks:
    """Token ids and weights of a prompt, in 77-token windows."""

    ids: list[list[int]]
    weights: list[list[float]]


def tokenize_chunks(text: str, tokenizer) -> Chunks:
    """Tokens of the weighted runs, packed into windows of 75 (+ BOS/EOS, padded)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    ids: list[list[int]] = []
    weights: list[list[float]] = []
    current_ids: list[int] = []
    current_weights: list[float] = []

    def close() -> None:
        window = [bos] + current_ids + [eos] + [pad] * (CHUNK_TOKENS - len(current_ids))
        ids.append(window)
        weights.append([1.0] + current_weights + [1.0] * (CHUNK_TOKENS + 1 - len(current_weights)))
        current_ids.clear()
        current_weights.clear()

    for run, weight in parse_attention(text):
        if is_break(run, weight):
            close()
            continue
        for token in tokenizer(run, add_special_tokens=False).input_ids:
            if len(current_ids) == CHUNK_TOKENS:
                close()
            current_ids.append(token)
            current_weights.append(weight)
    if current_ids or not ids:
        close()
    return Chunks(ids, weights)


def _encode_windows(
    encoder, chunks: Chunks, layer: int | None, device, final_norm=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [1, 77 * n, dim] of the chosen layer, passed through `final_norm` if given,
    then weighted (after the norm, which would undo the weights, as in A1111); and the first
    window's pooled output."""
    outputs = []
    pooled = None
    for ids, weights in zip(chunks.ids, chunks.weights, strict=True):
        result = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
        if layer is None:
            hidden = result[0]  # the last layer, after the final layer norm
        else:
            hidden = result.hidden_states[layer]
        if final_norm is not None:
            hidden = final_norm(hidden)
        if pooled is None and hasattr(result, "text_embeds"):
            pooled = result.text_embeds
        weight = torch.tensor(weights, device=device, dtype=hidden.dtype)
        if not torch.all(weight == 1):
            # A1111's weighting: scale the tokens, then restore the overall mean. A weighted
            # mean of about zero would blow the embeddings up: then the mean is left as it is.
            original_mean = hidden.float().mean()
            hidden = hidden * weight[None, :, None]
            ratio = original_mean / hidden.float().mean()
            ratio = torch.where(ratio.isfinite() & (ratio.abs() < 1e3), ratio, 1.0)
            hidden = hidden * ratio.to(hidden.dtype)
        outputs.append(hidden)
    return torch.cat(outputs, dim=1), pooled


def _pad_windows(a: Chunks, b: Chunks, tokenizer) -> None:
    """Give prompt and negative prompt the same number of windows (empty ones at the end)."""
    empty = tokenize_chunks("", tokenizer)
    for chunks in (a, b):
        while len(chunks.ids) < max(len(a.ids), len(b.ids)):
            chunks.ids.append(list(empty.ids[0]))
            chunks.weights.append(list(empty.weights[0]))


def _multi_vector(pipeline, text: str, tokenizer) -> str:
    """A multi-vector embedding's name spelled out as all its tokens ("emb" -> "emb emb_1"),
    as diffusers does before its own encoding; weights around the name cover them all."""
    convert = getattr(pipeline, "maybe_convert_prompt", None)
    return convert(text, tokenizer) if convert and text else text


@torch.no_grad()
def encode_sd(pipeline, prompt: str, negative: str, clip_skip: int) -> dict[str, torch.Tensor]:
    """prompt_embeds / negative_prompt_embeds for SD 1.x/2.x (A1111 clip skip: 1 = last layer)."""
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    prompt, negative = (_multi_vector(pipeline, text, tokenizer) for text in (prompt, negative))
    positive, negatives = tokenize_chunks(prompt, tokenizer), tokenize_chunks(negative, tokenizer)
    _pad_windows(positive, negatives, tokenizer)
    device = encoder.device

    def encode(chunks: Chunks) -> torch.Tensor:
        if clip_skip <= 1:
            return _encode_windows(encoder, chunks, None, device)[0]
        # an earlier layer, through the final layer norm as A1111 and diffusers do
        norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
        return _encode_windows(encoder, chunks, -clip_skip, device, norm)[0]

    return {"prompt_embeds": encode(positive), "negative_prompt_embeds": encode(negatives)}


@torch.no_grad()
def encode_sdxl(pipeline, prompt: str, negative: str, clip_skip: int) -> dict[str, torch.Tensor]:
    """prompt/negative embeds and pooled embeds for SDXL, from both text encoders.

    SDXL was trained on the penultimate layer, which is what A1111 and ComfyUI mean by clip
    skip 2: so 1 and 2 give SDXL's usual embeddings, and 3 or more go further back, in both
    encoders (as ComfyUI's CLIPSetLastLayer does)."""
    layer = -max(clip_skip, 2)
    device = pipeline.text_encoder_2.device
    pairs = [  # the SDXL refiner has only the second
        (tokenizer, encoder)
        for tokenizer, encoder in (
            (pipeline.tokenizer, pipeline.text_encoder),
            (pipeline.tokenizer_2, pipeline.text_encoder_2),
        )
        if encoder is not None
    ]
    embeds, negative_embeds, pooled, negative_pooled = [], [], None, None
    for tokenizer, encoder in pairs:
        positive, negatives = (
            tokenize_chunks(_multi_vector(pipeline, prompt, tokenizer), tokenizer),
            tokenize_chunks(_multi_vector(pipeline, negative, tokenizer), tokenizer),
        )
        _pad_windows(positive, negatives, tokenizer)
        hidden, pooled_out = _encode_windows(encoder, positive, layer, device)
        negative_hidden, negative_pooled_out = _encode_windows(encoder, negatives, layer, device)
        embeds.append(hidden)
        negative_embeds.append(negative_hidden)
        pooled, negative_pooled = pooled_out, negative_pooled_out
    result = {
        "prompt_embeds": torch.cat(embeds, dim=-1),
        "negative_prompt_embeds": torch.cat(negative_embeds, dim=-1),
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }
    if not negative and pipeline.config.get("force_zeros_for_empty_prompt", False):
        # As diffusers does for an empty negative prompt on SDXL: zeros, not the empty string.
        result["negative_prompt_embeds"] = torch.zeros_like(result["negative_prompt_embeds"])
        result["negative_pooled_prompt_embeds"] = torch.zeros_like(
            result["negative_pooled_prompt_embeds"]
        )
    return result
