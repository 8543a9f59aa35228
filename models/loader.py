"""Load a DeepSeek-V3 / Kimi-K2 checkpoint directory into ``DeepseekV3ForCausalLM``, one tensor at a time.

The model is built on the meta device, so its state dict is the list of expected tensors (names equal the
checkpoint's, but for the MTP module's: models/mtp.py ``CHECKPOINT_RENAMES``). Each stored tensor is read with
``safe_open`` (never a whole shard), dequantized from FP8 blocks if needed, cast to the run dtype (router bias:
fp32) on the target device and put in place, so peak host memory stays near one tensor. Every inconsistency
between files and architecture is a ``CheckpointError`` naming the file and tensor.

With a ``Parallel`` layout of several ranks, a rank reads only its shard of each split tensor through
safetensors' lazy slices (``get_slice(name)[rows]``), and never opens the experts other ranks hold. FP8 shards
on 128-blocks keep their slice of the scales; a shard that cuts a block (tiny test models) is dequantized from
the blocks that cover it, then cropped (models/parallel.py).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from mla_runner.kernels.fp8_block import DEFAULT_BLOCK, dequantize_fp8_block, scale_grid
from mla_runner.models.config import ModelArgs
from mla_runner.models.deepseek_v3 import FP32_TENSOR_SUFFIXES, DeepseekV3ForCausalLM
from mla_runner.models.errors import CheckpointError
from mla_runner.models.fp8_linear import convert_to_fp8
from mla_runner.models.mtp import SHARED_WITH_MAIN, attach_mtp, checkpoint_name
from mla_runner.models.parallel import Parallel, foreign_expert, fp8_aligned, read_fp8_shard, read_shard, shard_dim

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    num_layers: int | None = None,
    progress: bool = True,
    fp8: bool = False,
    par: Parallel = Parallel(),
    mtp: bool = False,
) -> DeepseekV3ForCausalLM:
    """The model of checkpoint directory ``path`` in ``dtype`` on ``device``, ready to run (``post_load`` done).

    ``fp8``: the linear layers stored in FP8 keep their e4m3 weight and block scales (``FP8Linear``, run by the
    Triton block-scaled GEMM) instead of being dequantized to ``dtype``; kv_b_proj is dequantized either way.

    ``num_layers`` keeps only the first layers (a truncated model for quick runs); ``model.args`` reflects it.
    Skipped: ``*rotary_emb.inv_freq`` and layers >= num_hidden_layers (truncated layers, and the MTP layer unless
    ``mtp``). ``par``: the rank's shards only (see the module doc).

    ``mtp``: also load the multi-token-prediction module as ``model.mtp`` (models/mtp.py), stored as layer
    ``num_hidden_layers`` of the untruncated model (the first, where config.json announces several), FP8 or not
    like the rest. Its embedding and head are the main model's tensors where the stored copies equal them or are
    absent. A ``CheckpointError`` when config.json announces no MTP layer (Kimi-K2) or the files hold none.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    args = ModelArgs.from_dir(root)
    mtp_layer = _mtp_layer(root, args) if mtp else None
    if num_layers is not None:
        if not 1 <= num_layers <= args.num_hidden_layers:
            raise CheckpointError(f"num_layers={num_layers} is outside 1..{args.num_hidden_layers} of {root}")
        args = dataclasses.replace(args, num_hidden_layers=num_layers)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(args, par)
        if mtp_layer is not None:
            attach_mtp(model, mtp_layer)
    weight_map = read_weight_map(root)
    if mtp_layer is not None and not any(n.startswith(f"model.layers.{mtp_layer}.") for n in weight_map):
        raise CheckpointError(f"{root}: config.json announces an MTP layer (num_nextn_predict_layers="
                              f"{args.num_nextn_predict_layers}), but no tensor model.layers.{mtp_layer}.* is stored")
    expected = {name: t.shape for name, t in model.state_dict().items()}
    block = args.fp8_block or DEFAULT_BLOCK
    if fp8:
        convert_to_fp8(model, {n.removesuffix(".weight") for n, shape in expected.items() if n.endswith(".weight")
                               and checkpoint_name(n, mtp_layer) + SCALE_SUFFIX in weight_map
                               and fp8_aligned(n, shape, par, block)})
        expected = {name: t.shape for name, t in model.state_dict().items()}
    stored = {name: checkpoint_name(name, mtp_layer) for name in expected}  # model name -> checkpoint name
    # Loaded last, once the main model's twin is in place: shared with it where equal or absent.
    shareable = {n for n in SHARED_WITH_MAIN if n in expected and n + SCALE_SUFFIX not in expected}

    def unused(name: str) -> bool:
        return is_skipped(name, args.num_hidden_layers, mtp_layer) or foreign_expert(name, par, args.n_routed_experts)

    _check_names(root, weight_map, set(stored.values()), {stored[n] for n in shareable}, unused)

    reader = _TensorReader(root, weight_map)
    with tqdm(total=len(expected), desc=f"loading {root.name}", unit="tensor", disable=not progress) as bar:
        try:
            own_tensors = [n for n in expected if n not in shareable]
            for name in sorted(own_tensors, key=lambda n: weight_map[stored[n]]):  # shard by shard
                if not name.endswith(SCALE_SUFFIX):  # an FP8Linear's scale is put in place with its weight
                    for n, value in _read_tensor(reader, name, stored[name], expected, par, block, dtype,
                                                 device).items():
                        set_tensor(model, n, value)
                bar.update()
            for name in sorted(shareable):
                main = model.get_parameter(SHARED_WITH_MAIN[name])
                value = main
                if stored[name] in weight_map:
                    own = _read_tensor(reader, name, stored[name], expected, par, block, dtype, device)[name]
                    value = main if torch.equal(own, main) else own
                set_tensor(model, name, value)
                bar.update()
        finally:
            reader.close()
    model.post_load()
    return model.eval()


def _mtp_layer(root: Path, args: ModelArgs) -> int:
    """The index in the files of the MTP layer to load; a ``CheckpointError`` when config.json announces none."""
    if not args.has_mtp:
        raise CheckpointError(f"{root}: the MTP module was asked for, but this {args.model_type} model has none "
                              f"(num_nextn_predict_layers={args.num_nextn_predict_layers} in config.json)")
    return args.num_hidden_layers


def _read_tensor(reader: _TensorReader, name: str, stored: str, expected: dict[str, torch.Size], par: Parallel,
                 block: tuple[int, int], dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """This rank's part of model tensor ``name`` (stored as ``stored``), dequantized unless its module keeps FP8:
    {name: value}, plus {name + SCALE_SUFFIX: scale} for an FP8Linear."""
    dim = shard_dim(name, par)
    shape = list(expected[name])
    if dim is not None:
        shape[dim] *= par.world
    src = reader.source(stored, torch.Size(shape), lazy=dim is not None)
    stored_dtype = src.dtype if isinstance(src, torch.Tensor) else src.get_dtype()
    is_fp8 = stored_dtype in (torch.float8_e4m3fn, "F8_E4M3")
    stored_scale = stored + SCALE_SUFFIX
    keep_fp8 = name + SCALE_SUFFIX in expected  # an FP8Linear
    if keep_fp8 and not is_fp8:
        raise CheckpointError(f"{reader.file(stored)}: {stored} has a scale but is {stored_dtype}, not FP8")
    if is_fp8 and stored_scale not in reader.weight_map:
        raise CheckpointError(f"{reader.file(stored)}: FP8 tensor {stored} has no {stored_scale}")
    if not is_fp8:
        if stored_scale in reader.weight_map:
            raise CheckpointError(f"{reader.file(stored_scale)}: unexpected tensor {stored_scale} (not FP8: {stored})")
        target = torch.float32 if name.endswith(FP32_TENSOR_SUFFIXES) else dtype
        return {name: read_shard(src, shape, dim, par).to(device=device, dtype=target)}
    scale_src = reader.source(stored_scale, torch.Size(scale_grid(shape, block)), lazy=dim is not None)
    w, scale, crop = read_fp8_shard(src, scale_src, shape, dim, par, block)
    if keep_fp8:  # fp8_aligned made sure the shard is whole blocks: no crop
        return {name: w.to(device), name + SCALE_SUFFIX: scale.to(device=device, dtype=torch.float32)}
    w = dequantize_fp8_block(w.to(device), scale.to(device), block)
    return {name: (w if crop is None else w[crop]).to(dtype)}


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer through transformers (Kimi-K2's tiktoken tokenizer needs remote code).

    A neutral model config is passed so AutoTokenizer picks the class from the tokenizer files alone: left to
    itself it parses config.json, which fails for ``model_type: kimi_k2`` (unknown to transformers).
    """
    from transformers import AutoTokenizer, PretrainedConfig

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(
            str(root), config=PretrainedConfig(), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise CheckpointError(f"{root}: its tokenizer ships its own Python code, which runs only when asked: "
                                  "pass model.trust_remote_code=true to run it") from None
        raise CheckpointError(f"{root}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def read_weight_map(root: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (any shard names) or a single ``model.safetensors``."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index, no weight_map ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not an object")
        for shard in sorted(set(weight_map.values())):
            if not (root / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard} named by the index does not exist")
        return weight_map
    single = root / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise CheckpointError(f"{root}: no {INDEX_FILE} or {SINGLE_FILE}")


def is_skipped(name: str, num_layers: int, mtp_layer: int | None = None) -> bool:
    """Stored tensors the model does not use: RoPE caches, and layers past ``num_layers`` (truncation, and the MTP
    layer unless it is ``mtp_layer``, the one loaded)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= num_layers and int(m.group(1)) != mtp_layer


def _check_names(root: Path, weight_map: dict[str, str], expected: set[str], optional: set[str],
                 unused: Callable[[str], bool]) -> None:
    """Every expected checkpoint name is stored (``optional`` ones may be absent), and every stored one is expected
    or ``unused`` (skipped, or another rank's)."""
    stored = {n for n in weight_map if not unused(n)}
    for name in sorted(stored):
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) not in stored:
            weight = name.removesuffix(SCALE_SUFFIX)
            raise CheckpointError(f"{root / weight_map[name]}: scale {name} has no weight {weight}")
    missing = sorted(expected - optional - stored)
    if missing:
        raise CheckpointError(f"{root}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    extra = sorted(n for n in stored - expected if not n.endswith(SCALE_SUFFIX))
    if extra:
        raise CheckpointError(f"{root / weight_map[extra[0]]}: unexpected tensor {extra[0]} ({len(extra)} in all)")


def _open(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


class _TensorReader:
    """Reads single tensors by name, keeping the shards of the last two reads open (reads come shard by shard; a
    weight and its scale may sit in neighbouring shards)."""

    KEEP_OPEN = 2

    def __init__(self, root: Path, weight_map: dict[str, str]) -> None:
        self.root, self.weight_map = root, weight_map
        self._handles: dict[str, Any] = {}

    def file(self, name: str) -> Path:
        return self.root / self.weight_map[name]

    def source(self, name: str, shape: torch.Size, lazy: bool = False) -> Any:
        """The tensor ``name``, checked to have ``shape``: read whole, or with ``lazy`` a safetensors slice
        from which only the indexed part is read."""
        shard = self.weight_map[name]
        if shard not in self._handles:
            if len(self._handles) == self.KEEP_OPEN:
                self._handles.pop(next(iter(self._handles))).__exit__(None, None, None)
            self._handles[shard] = _open(self.file(name)).__enter__()
        try:
            t = self._handles[shard].get_slice(name) if lazy else self._handles[shard].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.file(name)}: cannot read tensor {name} ({e})") from None
        stored = list(t.get_shape()) if lazy else list(t.shape)
        if stored != list(shape):
            raise CheckpointError(f"{self.file(name)}: tensor {name} has shape {stored}, expected {list(shape)}")
        return t

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the meta parameter or buffer ``name`` with ``value``."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value
