"""A1111 prompt syntax: attention weights and prompts longer than CLIP's 77 tokens.

`(word)` multiplies the weight by 1.1, `[word]` divides it by 1.1, `(word:1.3)` multiplies it
by 1.3, `\\(` is a literal parenthesis, unclosed brackets run to the end, and `BREAK` starts a
new 75-token chunk. Long prompts are split into chunks of 75 tokens, each encoded as its own
77-token window (BOS + 75 + EOS) and concatenated, as A1111 does, so nothing is truncated.
Weighted token embeddings are rescaled to keep the chunk's mean (A1111's "original" emphasis).

A1111's prompt editing (`[from:to:when]`, `[to:when]`, `[from::when]`) and alternation
(`[a|b]`) change the prompt during sampling: `prompt_schedule` turns a prompt into the texts it
has from step to step, each then encoded as above. Other extra networks' tags (`<hypernet:...>`)
are removed, and `AND` is encoded as text, each with a warning (`check_syntax`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch

from handler.errors import InvalidInput

CHUNK_TOKENS = 75  # 77 minus BOS and EOS
# A1111 has no limit; a worker needs one: every window is encoded, and every UNet call attends
# to all of them. 20,000 characters of words make about 135 windows; "BREAK " 3,300 times made
# 3,300 windows (254,000 tokens), which held a worker for minutes.
MAX_WINDOWS = 150
ROUND_UP, SQUARE_DOWN = 1.1, 1 / 1.1
_TOKEN = re.compile(
    r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_SYNTAX = re.compile(r"[()\[\]]|\bBREAK\b")
# A1111's extra-network tags; <lora:...> and <lyco:...> are read before (handler.loras)
EXTRA_NETWORK = re.compile(r"<(\w+):[^<>]+>")  # not past a "<": linear time (`INLINE_LORA`)
# the other kinds A1111 and its extensions know, named in warnings; any other tag's name is
# prompt text, and stays out of logs
KNOWN_EXTRA_NETWORKS = ("hypernet", "lycoris", "locon", "loha", "lokr")
_AND = re.compile(r"\bAND\b")
# The prompt-editing parser recurses per bracket: past Python's recursion limit ("[" * 600),
# a job failed with internal_error after its checkpoint loaded.
MAX_NESTING = 50
_BRACKET = re.compile(r"\\.|[()\[\]]", re.DOTALL)
# ComfyUI's way to name an embedding; the name ends at a space, comma, bracket or weight colon
_COMFYUI_EMBEDDING = re.compile(r"(?<![\w-])embedding:([^\s,:()\[\]<>|]+)", re.IGNORECASE)


def check_syntax(text: str, field: str) -> tuple[str, list[str]]:
    """Remove other extra networks' tags and name A1111 syntax that this worker reads as text;
    returns the text and warnings. Brackets nested deeper than `MAX_NESTING` are refused."""
    if _nesting(text) > MAX_NESTING:
        raise InvalidInput(
            f"{field} nests brackets more than {MAX_NESTING} deep",
            field=field,
            accepted=f"( ) and [ ] nested at most {MAX_NESTING} deep",
        )
    warnings = []
    kinds = sorted({match.group(1) for match in EXTRA_NETWORK.finditer(text)})
    if kinds:
        # the tags' kinds only: their text is prompt text, which stays out of logs
        text = re.sub(r"[ \t]{2,}", " ", EXTRA_NETWORK.sub("", text)).strip()
        known = [kind for kind in kinds if kind.lower() in KNOWN_EXTRA_NETWORKS]
        shown = ", ".join([f"<{kind}:...>" for kind in known] + ["other"] * (known != kinds))
        warnings.append(f"{field}: {shown} tags removed: only LoRA extra networks are supported")
    if _AND.search(text):
        warnings.append(
            f"{field}: AND (A1111's composable diffusion) is not supported: the prompt was "
            "encoded as one text, AND included"
        )
    return text, warnings


def comfyui_embeddings(text: str, names: list[str], field: str) -> tuple[str, list[str]]:
    """ComfyUI's `embedding:name` (its extension optional) written as the embedding's name,
    the word by which embeddings are found here (`loras.embeddings_in`); one that names no
    embedding is removed with a warning, as ComfyUI ignores it. Returns the text and warnings."""
    if "embedding:" not in text.lower():
        return text, []
    words: dict[str, str] = {}
    for name in names:  # by its path or file name, in any case
        words.setdefault(name.lower(), PurePosixPath(name).name)
        words.setdefault(PurePosixPath(name).name.lower(), PurePosixPath(name).name)
    missing = []

    def word(match: re.Match) -> str:
        written = match.group(1)
        name = written.rstrip(".")  # a sentence's full stop after it stays text
        key = name.lower()
        for extension in (".safetensors", ".pt", ".bin"):
            key = key.removesuffix(extension)
        if key in words:
            return words[key] + written[len(name) :]
        missing.append(written)
        return ""

    text = _COMFYUI_EMBEDDING.sub(word, text)
    warnings = [
        f"{field}: {len(missing)} embedding: tag(s) name no embedding on the volume and were "
        "removed"
    ]
    return text, warnings if missing else []


def _nesting(text: str) -> int:
    """How deep brackets nest (escaped ones are text)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(text):
        if match.group() in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif match.group() in ")]":
            depth = max(0, depth - 1)
    return deepest


# -- prompt editing and alternation (A1111's prompt_parser schedules) ---------------------


@dataclass
class _Edit:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: list | None
    after: list
    when: str  # the number as written: a "." makes it a fraction of the steps


@dataclass
class _Alternation:
    """`[a|b|c]`: one option per step, in turn."""

    options: list[list]


class _NotAPrompt(Exception):
    """The text does not follow A1111's prompt grammar there."""


# A1111's NUMBER (lark's SIGNED_NUMBER), between optional whitespace
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")


def parse_schedule(text: str) -> list | None:
    """A prompt as a list of plain strings, `_Edit`s and `_Alternation`s, or None when A1111's
    grammar rejects it (a `|` outside `[...]`, a trailing backslash): A1111 then uses the whole
    prompt as written, at every step.

    At the top level unmatched brackets and colons are text, as in A1111; inside `[...]` and
    `(...)` the content must itself be a prompt, else the opening bracket is text.
    """
    nodes: list = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 == len(text) or text[i + 1] == "\n":
                return None
            nodes.append(text[i : i + 2])
            i += 2
        elif char == "|":
            return None
        elif char == "[":
            try:
                group, i = _square(text, i)
                nodes += group
            except _NotAPrompt:
                nodes.append(char)
                i += 1
        else:
            nodes.append(char)
            i += 1
    return nodes


def _sequence(text: str, i: int) -> tuple[list, int]:
    """The prompt from `i` up to the next `:`, `|`, `]` or `)` of this level (or the end)."""
    nodes: list = []
    while i < len(text) and text[i] not in ":|])":
        char = text[i]
        if char == "\\":
            if i + 1 == len(text) or text[i + 1] == "\n":
                raise _NotAPrompt
            nodes.append(text[i : i + 2])
            i += 2
        elif char == "[":
            group, i = _square(text, i)
            nodes += group
        elif char == "(":
            group, i = _round(text, i)
            nodes += group
        else:
            nodes.append(char)
            i += 1
    return nodes, i


def _round(text: str, i: int) -> tuple[list, int]:
    """`(prompt)` or `(prompt:prompt)` from `i`: emphasis, kept as text."""
    inner, i = _sequence(text, i + 1)
    nodes = ["(", *inner]
    if i < len(text) and text[i] == ":":
        weight, i = _sequence(text, i + 1)
        nodes += [":", *weight]
    if i == len(text) or text[i] != ")":
        raise _NotAPrompt
    return [*nodes, ")"], i + 1


def _square(text: str, i: int) -> tuple[list, int]:
    """`[prompt]` (emphasis, kept as text), an edit or an alternation, from `i`."""
    start = i
    parts: list[list] = []
    separators = ""
    while True:
        part, i = _sequence(text, i + 1)
        parts.append(part)
        if i == len(text) or text[i] == ")":
            raise _NotAPrompt
        if text[i] == "]":
            break
        separators += text[i]
    end = i + 1
    if not separators:
        return ["[", *parts[0], "]"], end
    if set(separators) == {"|"}:
        return [_Alternation(parts)], end
    if separators in (":", "::"):
        number_start = text.rindex(":", start, end) + 1
        when = _WHEN.fullmatch(text, number_start, end - 1)
        if when:
            before = parts[0] if separators == "::" else None
            return [_Edit(before, parts[-2], when.group(1))], end
    raise _NotAPrompt


def _nodes(nodes: list):
    """Every edit and alternation in `nodes`, nested ones included."""
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _nodes((node.before or []) + node.after)
        elif isinstance(node, _Alternation):
            yield node
            for option in node.options:
                yield from _nodes(option)


def is_scheduled(text: str) -> bool:
    """Whether `text` uses prompt editing or alternation (as A1111's grammar reads it)."""
    if "[" not in text:
        return False
    nodes = parse_schedule(text)
    return nodes is not None and any(True for _ in _nodes(nodes))


def prompt_schedule(
    text: str, steps: int, first_pass_steps: int | None = None
) -> list[tuple[int, str]]:
    """A1111's schedule of a prompt over `steps` sampler steps: (last step, text) entries, the
    text being the prompt as it reads at that step. Sampler step s (0-based) uses the first
    entry whose last step is >= s.

    With `first_pass_steps`, this is the hires pass's schedule (A1111 since 1.6): a `when`
    written with a "." counts from 1.0 (1.5: halfway through the hires pass), an integer from
    the first pass's steps.
    """
    nodes = parse_schedule(text)
    if nodes is None:
        return [(steps, text)]
    fraction_offset, step_offset = (0.0, 0) if first_pass_steps is None else (1.0, first_pass_steps)

    def step_of(edit: _Edit) -> int:
        value = float(edit.when)
        if "." in edit.when:
            value = (value - fraction_offset) * steps
        else:
            value -= step_offset
        # past either end (1e999 is inf) is the same as at it: no int() of an infinite float
        return int(max(-1.0, min(float(steps), value)))

    ends = {steps}
    for node in _nodes(nodes):
        if isinstance(node, _Alternation):
            ends.update(range(1, steps + 1))
        elif step_of(node) >= 1:
            ends.add(step_of(node))

    def at(step: int, nodes: list) -> str:
        out = []
        for node in nodes:
            if isinstance(node, _Edit):
                out.append(at(step, (node.before or []) if step <= step_of(node) else node.after))
            elif isinstance(node, _Alternation):
                out.append(at(step, node.options[(step - 1) % len(node.options)]))
            else:
                out.append(node)
        return "".join(out)

    return [(end, at(end, nodes)) for end in sorted(ends)]


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
    """True when a prompt uses A1111 syntax or an embedding (diffusers' tokenizer would not find
    its token, see `embedding_token`), or is longer than one 77-token window (diffusers would
    cut what goes past)."""
    tokenizer = pipeline.tokenizer or pipeline.tokenizer_2
    for prompt in prompts:
        if _SYNTAX.search(prompt):
            return True
        if with_embedding_tokens(prompt, tokenizer) != prompt:
            return True
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) > CHUNK_TOKENS:
            return True
    return False


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The text of `prompt_schedule`'s first entry ending at or after `step` (else the last)."""
    return next((text for end, text in schedule if end >= step), schedule[-1][1])


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


def _check_windows(chunks: list[Chunks], fields: list[str]) -> None:
    """Refuse a text of more than `MAX_WINDOWS` windows, as the encoder would take it: each
    text of a prompt's schedule, BREAKs inside its brackets and embeddings' vectors counted."""
    for each, field in zip(chunks, fields, strict=True):
        if len(each.ids) > MAX_WINDOWS:
            raise InvalidInput(
                f"{field} makes {len(each.ids)} windows of {CHUNK_TOKENS} tokens (A1111's "
                "chunks; each BREAK starts one, and an embedding counts its vectors)",
                field=field,
                accepted=f"prompts of at most {MAX_WINDOWS} windows "
                f"({MAX_WINDOWS * CHUNK_TOKENS} tokens)",
            )


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


def _pad_windows(chunks: list[Chunks], tokenizer) -> None:
    """Give all prompts the same number of windows (empty ones at the end)."""
    empty = tokenize_chunks("", tokenizer)
    longest = max(len(c.ids) for c in chunks)
    for each in chunks:
        while len(each.ids) < longest:
            each.ids.append(list(empty.ids[0]))
            each.weights.append(list(empty.weights[0]))


_EMBEDDING_OPEN, _EMBEDDING_CLOSE = "\ue000", "\ue001"  # Unicode private use


def embedding_token(name: str) -> str:
    """The token an embedding is loaded as: its name between two private-use characters, which
    no prompt holds (`with_embedding_tokens` removes them). So the tokenizer never finds a name
    inside a longer word, and a name that is also a word of CLIP's vocabulary ("style") can be
    an embedding, as in A1111, which matches embeddings by their whole tokens."""
    return f"{_EMBEDDING_OPEN}{name}{_EMBEDDING_CLOSE}"


def with_embedding_tokens(text: str, tokenizer) -> str:
    """`text` with the name of each embedding loaded into `tokenizer` replaced by its token, a
    multi-vector one's by all its tokens ("name" -> its tokens for "name", "name_1", ...), where
    the name is a whole word, in any case, as embeddings are found (`loras.embeddings_in`).
    Weights around the name cover them all."""
    text = text.replace(_EMBEDDING_OPEN, "").replace(_EMBEDDING_CLOSE, "")
    added = tokenizer.added_tokens_encoder
    names, spelled = [], []
    for token in added:
        if not (token.startswith(_EMBEDDING_OPEN) and token.endswith(_EMBEDDING_CLOSE)):
            continue  # a multi-vector embedding's further tokens end in _1, _2, ...
        count = 1
        while f"{token}_{count}" in added:
            count += 1
        names.append(token[1:-1])
        spelled.append(" ".join([token] + [f"{token}_{i}" for i in range(1, count)]))
    if not names or not text:
        return text
    # one group per name, longest first, each matched as the search found it (in any case, by
    # the regex's own rules, which str.lower() does not follow for every letter: "İ", "ſ")
    order = sorted(range(len(names)), key=lambda i: len(names[i]), reverse=True)
    groups = "|".join(f"({re.escape(names[i])})" for i in order)
    pattern = re.compile(rf"(?<![\w-])(?:{groups})(?![\w-])", re.IGNORECASE)
    return pattern.sub(lambda match: spelled[order[match.lastindex - 1]], text)


@torch.no_grad()
def encode_sd(pipeline, prompt: str, negative: str, clip_skip: int) -> dict[str, torch.Tensor]:
    """prompt_embeds / negative_prompt_embeds for SD 1.x/2.x (A1111 clip skip: 1 = last layer)."""
    positive, negatives = encode_sd_texts(
        pipeline, [prompt, negative], ["prompt", "negative_prompt"], clip_skip
    )
    return {"prompt_embeds": positive, "negative_prompt_embeds": negatives}


@torch.no_grad()
def encode_sd_texts(
    pipeline, texts: list[str], fields: list[str], clip_skip: int
) -> list[torch.Tensor]:
    """Each text's hidden states for SD 1.x/2.x, all padded to the same number of windows;
    `fields` names the field each text comes from."""
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    chunks = [tokenize_chunks(with_embedding_tokens(text, tokenizer), tokenizer) for text in texts]
    _check_windows(chunks, fields)
    _pad_windows(chunks, tokenizer)
    device = encoder.device

    def encode(chunks: Chunks) -> torch.Tensor:
        if clip_skip <= 1:
            return _encode_windows(encoder, chunks, None, device)[0]
        # an earlier layer, through the final layer norm as A1111 and diffusers do
        norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
        return _encode_windows(encoder, chunks, -clip_skip, device, norm)[0]

    return [encode(each) for each in chunks]


@torch.no_grad()
def encode_sdxl(pipeline, prompt: str, negative: str, clip_skip: int) -> dict[str, torch.Tensor]:
    """prompt/negative embeds and pooled embeds for SDXL, from both text encoders.

    SDXL was trained on the penultimate layer, which is what A1111 and ComfyUI mean by clip
    skip 2: so 1 and 2 give SDXL's usual embeddings, and 3 or more go further back, in both
    encoders (as ComfyUI's CLIPSetLastLayer does)."""
    (embeds, pooled), (negative_embeds, negative_pooled) = encode_sdxl_texts(
        pipeline, [prompt, negative], ["prompt", "negative_prompt"], clip_skip
    )
    result = {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative_embeds,
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


@torch.no_grad()
def encode_sdxl_texts(
    pipeline, texts: list[str], fields: list[str], clip_skip: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each text's (hidden states, pooled embedding) for SDXL (see `encode_sdxl`), all padded
    to the same number of windows; `fields` names the field each text comes from."""
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
    hidden: list[list[torch.Tensor]] = [[] for _ in texts]
    pooled: list[torch.Tensor | None] = [None for _ in texts]
    for tokenizer, encoder in pairs:
        chunks = [
            tokenize_chunks(with_embedding_tokens(text, tokenizer), tokenizer) for text in texts
        ]
        _check_windows(chunks, fields)
        _pad_windows(chunks, tokenizer)
        for index, each in enumerate(chunks):
            states, pooled[index] = _encode_windows(encoder, each, layer, device)
            hidden[index].append(states)
    return [(torch.cat(states, dim=-1), last) for states, last in zip(hidden, pooled, strict=True)]
