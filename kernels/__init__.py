"""Triton kernels for MLA decode: persistent split-KV decode + merge, metadata build, kv indices.

Importing ``kernels`` is cheap: the Triton modules load on first use of the names below (set
``TRITON_INTERPRET=1`` before that on a machine without a GPU).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MLAMetadata": "kernels.metadata",
    "PersistentMetadataBuilder": "kernels.metadata",
    "PerStepMetadataBuilder": "kernels.metadata",
    "make_metadata_builder": "kernels.metadata",
    "mla_decode": "kernels.mla_decode",
    "DecodeConfig": "kernels.mla_decode",
    "mla_merge": "kernels.mla_merge",
    "build_kv_indices": "kernels.plan_kernels",
    "mla_attention_reference": "kernels.reference",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
