"""Weight names: original Wan (`blocks.0.self_attn.q.weight`, `head.head.weight`, `blocks.0.norm3` = the
cross-attention norm) and diffusers (`blocks.0.attn1.to_q.weight`, `proj_out.weight`), told apart by the
keys; the segments training wrappers add (DDP's `module.`, torch.compile's `_orig_mod.`, FSDP's
`_fsdp_wrapped_module.`, activation checkpointing's `_checkpoint_wrapped_module.`: anywhere in a key, since
per-block wrapping puts them mid-key; Self-Forcing's `model.` as a prefix of every key) stripped.

Wan → diffusers is diffusers' own `convert_wan_transformer_to_diffusers`; `diffusers_to_wan` is its
inverse, checked key by key against it on every call.
"""

from __future__ import annotations

import re

from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from pipeline.io.weights import ConvertError

# Segments wrappers insert into module paths; no Wan or diffusers module is named like them.
_WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_MODEL_PREFIX = "model."  # Self-Forcing's WanDiffusionWrapper: a real attribute name, so only as everyone's prefix

_DIFFUSERS_TO_WAN = [  # (pattern on a diffusers key, original Wan replacement), applied in order
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    # diffusers' norm2 is Wan's norm3 (the cross-attention norm) and the other way round
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm__swap."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),
    (r"^(blocks\.\d+)\.norm__swap\.", r"\1.norm3."),
]


def naming(state_dict: dict) -> str:
    """"wan" or "diffusers", from the keys; a one-line error for anything else."""
    keys = list(state_dict)
    if any(re.match(r"blocks\.\d+\.(self_attn|cross_attn)\.", k) or k.startswith("head.head.") for k in keys):
        return "wan"
    if any(re.match(r"blocks\.\d+\.attn[12]\.", k) or k.startswith("proj_out.") for k in keys):
        return "diffusers"
    raise ConvertError(f"keys are neither original-Wan nor diffusers Wan names (first keys: {keys[:3]})")


def wan_to_diffusers(state_dict: dict) -> dict:
    """Original Wan names → diffusers names (diffusers' own converter; the input is left untouched)."""
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def diffusers_to_wan(state_dict: dict) -> dict:
    """diffusers names → original Wan names, the inverse of `wan_to_diffusers`.

    Raises:
        ConvertError: a key whose Wan name does not map back to it (a module this inverse does not know).
    """
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _DIFFUSERS_TO_WAN:
            key = re.sub(pattern, repl, key)
        out[key] = value
    back = wan_to_diffusers(dict.fromkeys(out))
    wrong = [k for k, b in zip(state_dict, back) if k != b]
    if len(out) != len(state_dict) or wrong:
        raise ConvertError(f"no original-Wan name for {wrong[:3] or 'some keys'}")
    return out


def _unwrap(key: str) -> str:
    parts = key.split(".")
    return ".".join([p for p in parts[:-1] if p not in _WRAPPER_SEGMENTS] + parts[-1:])


def strip_wrappers(state_dict: dict) -> dict:
    """Drop what training wrappers add to the keys: their segments anywhere (`module.`, `_orig_mod.`,
    `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`), then a `model.` prefix (Self-Forcing's
    WanDiffusionWrapper) when every key has it. Order and tensors are kept.

    Raises:
        ConvertError: two keys that become one (e.g. `module.x` beside `x`), naming both.
    """
    out: dict = {}
    origin: dict = {}
    for key, value in state_dict.items():
        new = _unwrap(key)
        if new in out:
            raise ConvertError(f"keys '{origin[new]}' and '{key}' both name '{new}' once wrapper segments are "
                               "stripped")
        out[new], origin[new] = value, key
    while out and all(k.startswith(_MODEL_PREFIX) for k in out):
        out = {k[len(_MODEL_PREFIX):]: v for k, v in out.items()}
    return out


def to_diffusers_names(state_dict: dict) -> dict:
    """Any checkpoint's keys as diffusers names: wrapper prefixes stripped, Wan names converted."""
    state_dict = strip_wrappers(state_dict)
    return wan_to_diffusers(state_dict) if naming(state_dict) == "wan" else state_dict
