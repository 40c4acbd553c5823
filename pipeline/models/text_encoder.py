"""The frozen text encoder of the real-scale path: Wan2.1's UMT5 encoder + tokenizer from a LOCAL folder.

`TextEncoder.encode_prompts(prompts) -> [N, L, D]` follows diffusers' `WanPipeline._get_t5_prompt_embeds`
(diffusers 0.42, `diffusers/pipelines/wan/pipeline_wan.py`), restated:

1. each prompt is cleaned by the pipeline's own `prompt_clean` (ftfy if installed, HTML unescape twice,
   whitespace collapsed) — imported from diffusers, not copied;
2. tokenized with `padding="max_length", max_length=L, truncation=True, add_special_tokens=True` and the
   attention mask (L = 512 for Wan: `WanPipeline.__call__(max_sequence_length=512)`);
3. `text_encoder(input_ids, attention_mask).last_hidden_state`, cast to the encoder's dtype;
4. each row cut to its prompt's length (`mask.sum()`) and zero-padded back to L, so the positions past a
   prompt are exactly 0 (not the encoder's output at pad tokens).

The empty prompt's embeddings are the null prompt (classifier-free guidance, label dropout), as
WanPipeline's default `negative_prompt=""`.

Nothing is downloaded: paths must exist locally (`local_files_only=True`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.models.device import dtype_of, resolve_device


def resolve_component(path: str | Path | None, sub: str, key: str) -> Path:
    """The folder of one component: `path/<sub>` when `path` is a pipeline folder holding it, else `path`.

    Raises:
        FileNotFoundError: (one line, naming `key` and the path) when it is unset or missing.
    """
    if path is None:
        raise FileNotFoundError(f"{key} is not set: give the local folder of the {sub} (or a Wan pipeline folder)")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}: local path not found: {p}")
    if (p / sub).is_dir():
        return p / sub
    return p


def resolve_tokenizer(text_encoder: str | Path | None, tokenizer: str | Path | None) -> Path:
    """The tokenizer folder: `tokenizer` if given (pipeline folder or the folder itself), else the
    pipeline's `tokenizer/` beside `text_encoder/`, else the text-encoder folder itself."""
    if tokenizer is not None:
        return resolve_component(tokenizer, "tokenizer", "components.tokenizer")
    enc = resolve_component(text_encoder, "text_encoder", "components.text_encoder")
    for cand in (Path(text_encoder) / "tokenizer", enc.parent / "tokenizer", enc):
        if (cand / "tokenizer_config.json").is_file() or (cand / "tokenizer.json").is_file():
            return cand
    raise FileNotFoundError(f"components.tokenizer: no tokenizer beside {enc}; set components.tokenizer")


def folder_fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder: its JSON files' contents and every other file's name and size
    (hashing multi-GB weights on every run would cost minutes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes() if f.suffix in (".json", ".txt", ".model") and f.stat().st_size < 50_000_000
                 else str(f.stat().st_size).encode())
    return h.hexdigest()


@torch.no_grad()
def encode_prompts(tokenizer, model, prompts: str | list[str], max_sequence_length: int, batch_size: int = 8, *,
                   dtype: torch.dtype | None = None, on_call=None) -> torch.Tensor:
    """Prompt embeddings `[N, L, D]` of a UMT5 encoder `model` and its `tokenizer` (L = `max_sequence_length`):
    WanPipeline's `_get_t5_prompt_embeds` (module docstring), in batches of `batch_size` prompts, computed
    where `model` lives and returned on the CPU in `dtype` (None: the model's). `on_call()` after every encoder call.
    Shared by `TextEncoder` (prepare_data, sample) and `CausalWanPipeline`, so both give the same rows."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    if isinstance(prompts, str):
        prompts = [prompts]
    device, dtype = next(model.parameters()).device, dtype or model.dtype
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = [prompt_clean(t) for t in prompts[i:i + batch_size]]
        tok = tokenizer(batch, padding="max_length", max_length=max_sequence_length, truncation=True,
                        add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids, tok.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        emb = model(ids.to(device), mask.to(device)).last_hidden_state.to(dtype).cpu()
        if on_call is not None:
            on_call()
        out.append(torch.stack([torch.cat([u[:v], u.new_zeros(max_sequence_length - int(v), u.size(1))])
                                for u, v in zip(emb, seq_lens)]))
    if not out:
        return torch.zeros(0, max_sequence_length, model.config.d_model, dtype=dtype)
    return torch.cat(out)


class TextEncoder:
    """transformers' `UMT5EncoderModel` and its tokenizer, loaded from local folders.

    Args:
        text_encoder: a Wan pipeline folder (uses `text_encoder/`, `tokenizer/`) or a UMT5 folder.
        tokenizer: a tokenizer folder (default: see `resolve_tokenizer`).
        dtype: fp32 | bf16 | fp16 (embeddings come out in it).
        device: where the encoder runs.
        offload: keep the weights on the CPU between calls and move them to `device` only while encoding
            (frees the accelerator for the VAE / transformer; no effect when `device` is the CPU).
        max_sequence_length: L, 512 for Wan.
    """

    def __init__(self, text_encoder: str | Path, tokenizer: str | Path | None = None, dtype: str = "bf16",
                 device: str | torch.device = "cpu", offload: bool = True, max_sequence_length: int = 512):
        from transformers import AutoTokenizer, UMT5EncoderModel

        enc_path = resolve_component(text_encoder, "text_encoder", "components.text_encoder")
        tok_path = resolve_tokenizer(text_encoder, tokenizer)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        self.dtype = dtype_of(dtype, "components.text_encoder_dtype")
        self.model = UMT5EncoderModel.from_pretrained(enc_path, torch_dtype=self.dtype,
                                                      local_files_only=True).eval().requires_grad_(False)
        self.device, self.offload, self.max_len = torch.device(device), offload, max_sequence_length
        if not offload:
            self.model.to(self.device)
        self.calls = 0  # encoder forward passes (tests check that a cache hit makes none)
        self.fingerprint = hashlib.sha256(json.dumps(
            [folder_fingerprint(enc_path), folder_fingerprint(tok_path), dtype, max_sequence_length]).encode()
        ).hexdigest()

    @classmethod
    def from_config(cls, cfg) -> "TextEncoder":
        """From a config's `components` section."""
        c = cfg.components
        return cls(c.text_encoder, c.tokenizer, c.text_encoder_dtype, resolve_device(c.device, "components.device"),
                   c.text_encoder_offload, c.max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
        """Prompt embeddings `[N, L, D]` (the encoder's dtype, on the CPU), zero past each prompt's
        tokens — WanPipeline's `_get_t5_prompt_embeds`, in batches of `batch_size` (`encode_prompts`)."""
        if self.offload:
            self.model.to(self.device)
        try:
            return encode_prompts(self.tokenizer, self.model, prompts, self.max_len, batch_size, dtype=self.dtype,
                                  on_call=lambda: setattr(self, "calls", self.calls + 1))
        finally:
            if self.offload:
                self.model.to("cpu")

    def null_embeds(self) -> torch.Tensor:
        """The empty prompt's embeddings `[1, L, D]`: the null prompt."""
        return self.encode_prompts([""])

    def cache_key(self, prompts: list[str]) -> str:
        """Hash of the prompt list and the encoder (weights' identity, tokenizer, dtype, L)."""
        return hashlib.sha256(json.dumps([self.fingerprint, list(prompts)]).encode()).hexdigest()[:24]

    def encode_cached(self, prompts: list[str], cache_dir: str | Path, batch_size: int = 8) -> torch.Tensor:
        """`encode_prompts`, read from `<cache_dir>/<cache_key>.safetensors` when that exists and written
        there (temp name, then rename) when not: re-running the same prompts does not re-encode."""
        from safetensors.torch import load_file, save_file

        from pipeline.io.guard import replacing

        path = Path(cache_dir) / f"prompt_embeds_{self.cache_key(prompts)}.safetensors"
        if path.is_file():
            return load_file(str(path))["prompt_embeds"]
        emb = self.encode_prompts(prompts, batch_size)
        with replacing(path) as tmp:
            save_file({"prompt_embeds": emb.contiguous()}, str(tmp))
        return emb


def prompt_embeds(cfg, prompts: list[str], cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' embeddings `[N, L, D]` and the null prompt's `[1, L, D]` (through the cache in
    `cache_dir`), with the encoder of the config's `components`; the encoder is freed on return, before
    the transformer and the VAE need the memory."""
    encoder = TextEncoder.from_config(cfg)
    return encoder.encode_cached(prompts, cache_dir), encoder.encode_cached([""], cache_dir)

