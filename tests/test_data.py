"""The trainers' data interface: sprites and pre-encoded latents give the same batch layout."""

import pytest
import torch
from safetensors.torch import save_file

from pipeline.models.conditioning import drop_prompts, make_class_table
from pipeline.data.sources import LatentSource, SpritesSource
from pipeline.data.sprites import NULL_CLASS, SpritesStream


def test_sprites_source_layout_and_resume():
    table = make_class_table(6, 4, 8, seed=0)
    src = SpritesSource(16, 6, seed=3, table=table)
    b = src.next_batch(5)
    assert b["x0"].shape == (5, 3, 6, 16, 16) and b["context"].shape == (5, 4, 8)
    ref = SpritesStream(16, 6, seed=3).next_batch(5)
    assert torch.equal(b["x0"], ref["videos"].permute(0, 2, 1, 3, 4))  # model layout [B, C, F, H, W]
    assert torch.equal(b["context"], table[ref["labels"]])
    state = src.state_dict()
    nxt = src.next_batch(4)
    src2 = SpritesSource(16, 6, seed=3, table=table)
    src2.load_state_dict(state)
    assert torch.equal(src2.next_batch(4)["x0"], nxt["x0"])
    assert torch.equal(src.null_context(2), table[[NULL_CLASS, NULL_CLASS]])


def _write_shards(tmp_path, n=(3, 4)):
    g = torch.Generator().manual_seed(0)
    for i, k in enumerate(n):
        save_file({"latents": torch.randn(k, 2, 3, 4, 4, generator=g),
                   "prompt_embeds": torch.randn(k, 5, 8, generator=g)}, str(tmp_path / f"shard{i}.safetensors"))
    save_file({"prompt_embeds": torch.zeros(1, 5, 8)}, str(tmp_path / "null_embeds.safetensors"))


def test_latent_source_epochs_and_resume(tmp_path):
    _write_shards(tmp_path)
    src = LatentSource(tmp_path, seed=1)
    b = src.next_batch(7)  # one whole pass over the 7 samples: each appears once
    assert b["x0"].shape == (7, 2, 3, 4, 4) and b["context"].shape == (7, 5, 8)
    sums = sorted(b["x0"].flatten(1).sum(1).tolist())
    assert sums == pytest.approx(sorted(src.latents.flatten(1).sum(1).tolist()))
    state = src.state_dict()
    nxt = src.next_batch(3)
    again = LatentSource(tmp_path, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(3)["x0"], nxt["x0"])
    assert src.null_context(4).shape == (4, 5, 8)


def test_latent_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latent shards"):
        LatentSource(tmp_path, seed=0)
    save_file({"latents": torch.zeros(2, 2, 3, 4, 4)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="prompt_embeds"):
        LatentSource(tmp_path, seed=0)


def test_drop_prompts_fraction():
    ctx, null = torch.ones(4000, 2, 3), torch.zeros(4000, 2, 3)
    out = drop_prompts(ctx, null, 0.25, torch.Generator().manual_seed(0))
    dropped = (out[:, 0, 0] == 0).float().mean().item()
    assert 0.22 < dropped < 0.28
    assert torch.equal(drop_prompts(ctx, null, 0.0, torch.Generator()), ctx)


def test_prompt_files_and_shard_names(tmp_path):
    """`read_prompts` (prepare_data, evaluate and sample read prompt files through it) and the one shard-name
    helper of every shard folder."""
    from pipeline.data.prompts import read_prompts
    from pipeline.data.shard_files import SHARD_GLOB, shard_path

    (tmp_path / "p.txt").write_text("  a red square \n\n   \ncat  runs\n")
    assert read_prompts(tmp_path / "p.txt") == ["a red square", "cat  runs"]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="data.prompts: .*blank.txt has no prompts"):
        read_prompts(tmp_path / "blank.txt")
    with pytest.raises(FileNotFoundError, match="data.prompts: local path not found: .*nope.txt"):
        read_prompts(str(tmp_path / "nope.txt"))
    assert shard_path(tmp_path, 12) == tmp_path / "shard_00012.safetensors"
    assert shard_path(str(tmp_path), 0).match(SHARD_GLOB)
    assert not (tmp_path / f".tmp-1-{shard_path(tmp_path, 0).name}").match(SHARD_GLOB)  # temporaries never match
