"""The checkpoint loader: every error path names its culprit, skipped tensors, streaming, truncation, layouts."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mla_runner.models.loader as loader
from mla_runner.models.deepseek_v3 import FP32_TENSOR_SUFFIXES
from mla_runner.models.errors import CheckpointError, UserError
from mla_runner.models.loader import load_model, load_tokenizer, read_weight_map
from mla_testing.oracle import PagedRunner, dequantized_copy

SHARD2 = "model-00002-of-000003.safetensors"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture
def ckpt(dsv3_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the DeepSeek-flavour checkpoint, free to break."""
    return Path(shutil.copytree(dsv3_ckpt, tmp_path / "ckpt"))


def shard_of(root: Path, name: str) -> str:
    return read_weight_map(root)[name]


def rewrite_shard(
    root: Path, shard: str, edit: Callable[[dict[str, torch.Tensor]], None], *, index: bool = True
) -> None:
    """Apply ``edit`` to a shard's tensors, rewrite it and (unless ``index=False``) its index entries."""
    with safe_open(str(root / shard), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, str(root / shard), metadata={"format": "pt"})
    if index:
        path = root / "model.safetensors.index.json"
        data = json.loads(path.read_text())
        data["weight_map"] = {n: s for n, s in data["weight_map"].items() if s != shard} | dict.fromkeys(tensors, shard)
        path.write_text(json.dumps(data))


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def load(root: Path) -> torch.nn.Module:
    return load_model(root, dtype=torch.float32, progress=False)


def test_checkpoint_error_is_a_user_error() -> None:
    assert issubclass(CheckpointError, UserError)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope: checkpoint directory does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="nope: checkpoint directory does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: config.json not found"):
        load(ckpt)


def test_corrupt_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"model_type": "deepseek_v3", ')
    with pytest.raises(CheckpointError, match="config.json: unreadable config.json"):
        load(ckpt)


def test_unknown_model_type(ckpt: Path) -> None:
    edit_json(ckpt / "config.json", lambda d: d.update(model_type="qwen3_moe"))
    with pytest.raises(CheckpointError, match=r"config.json: unknown model_type 'qwen3_moe'"):
        load(ckpt)


def test_missing_config_field(ckpt: Path) -> None:
    edit_json(ckpt / "config.json", lambda d: d.pop("kv_lora_rank"))
    with pytest.raises(CheckpointError, match=r"config.json: required field 'kv_lora_rank' is missing"):
        load(ckpt)


def test_missing_shard(ckpt: Path) -> None:
    (ckpt / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=f"index.json: shard {SHARD2} named by the index does not exist"):
        load(ckpt)


def test_no_weights_at_all(ckpt: Path) -> None:
    (ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load(ckpt)


def test_corrupt_index(ckpt: Path) -> None:
    (ckpt / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="index.json: unreadable index"):
        load(ckpt)


def test_truncated_shard(ckpt: Path) -> None:
    data = (ckpt / SHARD2).read_bytes()
    (ckpt / SHARD2).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{SHARD2}: unreadable safetensors file"):
        load(ckpt)


def test_garbage_shard_header(ckpt: Path) -> None:
    data = bytearray((ckpt / SHARD2).read_bytes())
    data[8:40] = b"#" * 32
    (ckpt / SHARD2).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{SHARD2}: unreadable safetensors file"):
        load(ckpt)


def test_missing_tensor(ckpt: Path) -> None:
    rewrite_shard(ckpt, shard_of(ckpt, NORM), lambda t: t.pop(NORM))
    with pytest.raises(CheckpointError, match=f"tensor {NORM} is missing"):
        load(ckpt)


def test_tensor_in_index_but_not_in_its_shard(ckpt: Path) -> None:
    shard = shard_of(ckpt, NORM)
    rewrite_shard(ckpt, shard, lambda t: t.pop(NORM), index=False)
    with pytest.raises(CheckpointError, match=f"{shard}: cannot read tensor {NORM}"):
        load(ckpt)


def test_unexpected_tensor(ckpt: Path) -> None:
    extra = "model.layers.1.self_attn.q_norm.weight"
    rewrite_shard(ckpt, SHARD2, lambda t: t.update({extra: torch.ones(4)}))
    with pytest.raises(CheckpointError, match=f"{SHARD2}: unexpected tensor {extra}"):
        load(ckpt)


def test_wrong_shape(ckpt: Path) -> None:
    shard = shard_of(ckpt, NORM)
    rewrite_shard(ckpt, shard, lambda t: t.update({NORM: torch.ones(199, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor {NORM} has shape \[199\], expected \[200\]"):
        load(ckpt)


def test_fp8_weight_without_scale(ckpt: Path) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite_shard(ckpt, shard_of(ckpt, name), lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"FP8 tensor {name} has no {name}_scale_inv"):
        load(ckpt)


def test_scale_of_the_wrong_shape(ckpt: Path) -> None:
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    rewrite_shard(ckpt, shard_of(ckpt, name), lambda t: t.update({name: torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[1, 1\], expected \[2, 1\]"):
        load(ckpt)


def test_orphan_scale(ckpt: Path) -> None:
    name = "model.layers.0.self_attn.q_norm.weight_scale_inv"
    rewrite_shard(ckpt, SHARD2, lambda t: t.update({name: torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=f"scale {name} has no weight"):
        load(ckpt)


def test_scale_of_an_unquantized_weight(ckpt: Path) -> None:
    name = "model.layers.0.input_layernorm.weight_scale_inv"
    rewrite_shard(ckpt, SHARD2, lambda t: t.update({name: torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {name} \\(not FP8"):
        load(ckpt)


def count_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Make the loader's safe_open count every tensor read through it; the counts, by tensor name."""
    reads: Counter[str] = Counter()
    real_open = loader.safe_open

    class CountingHandle:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.handle = real_open(*args, **kwargs)

        def __enter__(self) -> CountingHandle:
            self.handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            reads[name] += 1
            return self.handle.get_tensor(name)

        def keys(self) -> list[str]:
            return self.handle.keys()

    monkeypatch.setattr(loader, "safe_open", CountingHandle)
    return reads


def test_streams_one_tensor_at_a_time_and_skips_mtp_and_inv_freq(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a whole-shard read; each needed tensor read exactly once; MTP / inv_freq tensors never read."""
    reads = count_tensor_reads(monkeypatch)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader read a whole shard")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    for name in ("dsv3", "kimi"):
        root = request.getfixturevalue(f"{name}_ckpt")
        reads.clear()
        model = load(root)
        stored = set(read_weight_map(root))
        skipped = {n for n in stored if n.startswith("model.layers.3.") or n.endswith("rotary_emb.inv_freq")}
        assert skipped, f"the {name} checkpoint should carry tensors to skip"
        assert set(reads) == stored - skipped and set(reads.values()) == {1}
        assert len(model.model.layers) == 3


def test_truncated_model_keeps_the_first_layers(dsv3_ckpt: Path, dsv3_model: torch.nn.Module) -> None:
    small = load_model(dsv3_ckpt, dtype=torch.float32, num_layers=2, progress=False)
    assert small.args.num_hidden_layers == 2 and len(small.model.layers) == 2
    torch.testing.assert_close(small.model.layers[1].mlp.gate.weight, dsv3_model.model.layers[1].mlp.gate.weight)
    for bad in (0, 4):
        with pytest.raises(CheckpointError, match=f"num_layers={bad} is outside 1..3"):
            load_model(dsv3_ckpt, num_layers=bad, progress=False)


def test_single_unquantized_file_gives_the_same_model(
    kimi_ckpt: Path, kimi_model: torch.nn.Module, tmp_path: Path
) -> None:
    """model.safetensors without index, fp32 weights, no quantization_config: same logits as from FP8 blocks."""
    plain = dequantized_copy(kimi_ckpt, tmp_path / "plain")
    assert not (plain / "model.safetensors.index.json").exists()
    model = load(plain)
    assert model.args.fp8_block is None
    prompt = list(range(20, 50))
    torch.testing.assert_close(PagedRunner(model).step({0: prompt})[0], PagedRunner(kimi_model).step({0: prompt})[0])


def test_loads_onto_the_requested_device_and_dtype(kimi_ckpt: Path) -> None:
    model = load_model(kimi_ckpt, dtype=torch.bfloat16, device="cpu", progress=False)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not any(t.is_meta for t in params.values())
    fp32 = {n for n in params if n.endswith(FP32_TENSOR_SUFFIXES)}  # the router's weight and bias
    assert fp32 and all(params[n].dtype == torch.float32 for n in fp32)
    run_dtypes = {t.dtype for n, t in params.items() if n not in fp32 and "rotary" not in n}
    assert run_dtypes == {torch.bfloat16}
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training


def test_tokenizer_code_runs_only_when_asked(tmp_path: Path) -> None:
    """A tokenizer that ships its own Python code (as Kimi-K2's does) is not run without trust_remote_code, and the
    error names the setting that runs it; the code is never imported unasked."""
    marker = tmp_path / "ran"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_x.TokX", None]}, "tokenizer_class": "TokX"}))
    (tmp_path / "tokenization_x.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizer\n"
        "class TokX(PreTrainedTokenizer):\n    pass\n")
    with pytest.raises(CheckpointError, match="ships its own Python code.*pass model.trust_remote_code=true"):
        load_tokenizer(tmp_path)
    assert not marker.exists()


def test_mtp_flag_reads_the_mtp_layer_once(dsv3_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``mtp=True`` every stored tensor is read exactly once, the MTP layer's included (its embedding and head
    too: they are compared with the main model's)."""
    reads = count_tensor_reads(monkeypatch)
    model = load_model(dsv3_ckpt, dtype=torch.float32, progress=False, mtp=True)
    assert set(reads) == set(read_weight_map(dsv3_ckpt)) and set(reads.values()) == {1}
    assert any(n.startswith("model.layers.3.") for n in reads) and model.mtp is not None
