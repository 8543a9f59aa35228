"""Tiny checkpoints: deterministic bytes, the real on-disk format, the cache, and their tokenizers."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mla_runner.kernels.fp8_block import scale_grid
from mla_runner.models.config import ModelArgs
from mla_runner.models.loader import load_tokenizer
from mla_runner.models.presets import TINY_DEEPSEEK_V3_CONFIG, TINY_KIMI_K2_CONFIG
from mla_runner.models.tiny import ensure_tiny_checkpoint, make_tiny_checkpoint


def digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def stored(root: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (shard, tensor) over every shard file, whatever the index says."""
    out = {}
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({name: (shard.name, f.get_tensor(name)) for name in f.keys()})
    return out


def test_same_bytes_twice_in_this_process_and_another(tmp_path: Path, dsv3_ckpt: Path) -> None:
    """Same seed, same files; a fresh interpreter (other hash seeds) too, so the tokenizer training is stable."""
    again = make_tiny_checkpoint(tmp_path / "again", TINY_DEEPSEEK_V3_CONFIG, seed=0, shard_style="deepseek", mtp=True)
    assert digest(again) == digest(dsv3_ckpt)
    code = (
        "import sys; from mla_runner.models.tiny import make_tiny_checkpoint; "
        "from mla_runner.models.presets import TINY_KIMI_K2_CONFIG;"
        "make_tiny_checkpoint(sys.argv[1], TINY_KIMI_K2_CONFIG, seed=1, shard_style='kimi', inv_freq=True)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "123"})
    here = make_tiny_checkpoint(tmp_path / "here", TINY_KIMI_K2_CONFIG, seed=1, shard_style="kimi", inv_freq=True)
    assert digest(tmp_path / "other") == digest(here)
    different = digest(make_tiny_checkpoint(tmp_path / "seed1", TINY_DEEPSEEK_V3_CONFIG, seed=1, mtp=True))
    shard = "model-00001-of-000003.safetensors"
    assert different[shard] != digest(dsv3_ckpt)[shard]


@pytest.mark.parametrize("name", ["dsv3", "kimi"])
def test_real_format(name: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(f"{name}_ckpt")
    config = json.loads((root / "config.json").read_text())
    assert config == (TINY_DEEPSEEK_V3_CONFIG if name == "dsv3" else TINY_KIMI_K2_CONFIG)
    args = ModelArgs.from_dict(config)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    tensors = stored(root)
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    if name == "dsv3":
        assert shards == [f"model-0000{i}-of-000003.safetensors" for i in (1, 2, 3)]
    else:
        assert shards == [f"model-{i}-of-3.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"] == {n: shard for n, (shard, _) in tensors.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in tensors.values())

    partial = False
    for n, (_, t) in tensors.items():
        if n.endswith("_proj.weight") and "eh_proj" not in n:
            assert t.dtype == torch.float8_e4m3fn, n
            scale = tensors[n + "_scale_inv"][1]
            assert scale.dtype == torch.float32 and scale.shape == scale_grid(t.shape), n
            partial |= t.shape[0] % 128 != 0 or t.shape[1] % 128 != 0
        elif n.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32 and 0 < t.abs().max() < 0.1
        elif n.endswith("rotary_emb.inv_freq"):
            assert t.dtype == torch.float32
        elif not n.endswith("_scale_inv"):
            assert t.dtype == torch.bfloat16, n
    assert partial
    assert tensors["model.layers.1.mlp.gate.weight"][1].shape == (args.n_routed_experts, args.hidden_size)

    mtp = {n for n in tensors if n.startswith(f"model.layers.{args.num_hidden_layers}.")}
    inv_freq = {n for n in tensors if n.endswith("rotary_emb.inv_freq")}
    if name == "dsv3":
        assert {f"model.layers.3.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "shared_head.head")} <= mtp
        assert "model.layers.3.mlp.experts.7.down_proj.weight_scale_inv" in mtp and not inv_freq
    else:
        assert len(inv_freq) == args.num_hidden_layers and not mtp


@pytest.mark.parametrize("name", ["dsv3", "kimi"])
def test_tokenizer_matches_the_config(name: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(f"{name}_ckpt")
    args = ModelArgs.from_dir(root)
    tok = load_tokenizer(root)
    assert len(tok) == args.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (args.bos_token_id, args.eos_token_id)
    ids = tok("The moon is round and bright tonight.").input_ids
    assert ids[0] == args.bos_token_id and len(ids) < 15  # merges were learned
    assert tok.decode(ids, skip_special_tokens=True) == "The moon is round and bright tonight."
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == f"{tok.bos_token}User: Hi\n\nAssistant:"


def test_ensure_writes_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = ensure_tiny_checkpoint("tiny-kimi", TINY_KIMI_K2_CONFIG, 0, shard_style="kimi")
    assert first.parent == tmp_path / "xdg" / "mla-runner" and first.name.startswith("tiny-kimi-")
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_tiny_checkpoint("tiny-kimi", TINY_KIMI_K2_CONFIG, 0, shard_style="kimi") == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    other = ensure_tiny_checkpoint("tiny-kimi", TINY_KIMI_K2_CONFIG, 1, shard_style="kimi")
    assert other != first and other.parent == first.parent
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, other.name])  # no temp dirs left
    explicit = ensure_tiny_checkpoint("x", TINY_KIMI_K2_CONFIG, 0, cache_root=tmp_path / "own", shard_style="kimi")
    assert explicit.parent == tmp_path / "own" and digest(explicit) == digest(first)


def test_ensure_survives_a_concurrent_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process renamed its copy into place first, ours is dropped and theirs returned."""
    import mla_runner.models.tiny as tiny

    real_make = tiny.make_tiny_checkpoint

    def racing_make(out_dir: Path, config: dict, **kw: object) -> Path:
        real_make(tmp_path / "cache" / final_name, config, **kw)  # the other writer finishes first
        return real_make(out_dir, config, **kw)

    final = ensure_tiny_checkpoint("race", TINY_KIMI_K2_CONFIG, 5, cache_root=tmp_path / "probe")
    final_name = final.name
    monkeypatch.setattr(tiny, "make_tiny_checkpoint", racing_make)
    assert ensure_tiny_checkpoint("race", TINY_KIMI_K2_CONFIG, 5, cache_root=tmp_path / "cache").name == final_name
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [final_name]


def test_mtp_embedding_and_head_copy_the_main_models(dsv3_ckpt: Path) -> None:
    """As in DeepSeek-V3's files: the MTP layer stores its own embedding and head, equal to the main model's; the rest
    of the layer is drawn like any layer."""
    tensors = {n: t for n, (_, t) in stored(dsv3_ckpt).items()}
    assert torch.equal(tensors["model.layers.3.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], tensors["lm_head.weight"])
    assert not torch.equal(tensors["model.layers.3.enorm.weight"], tensors["model.layers.3.hnorm.weight"])
    assert tensors["model.layers.3.eh_proj.weight"].shape == (200, 400)
