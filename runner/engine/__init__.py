"""The engine: the loop that takes requests to outputs (``LLMEngine``, never a tensor), and the model runner that
holds the model, its paged KV cache, the step's buffers and CUDA graphs (``ModelRunner``, never a request queue);
with the scheduler, the block manager and the requests between them."""
from mla_runner.engine.llm_engine import LLMEngine
from mla_runner.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from mla_runner.engine.request import Request, Status

__all__ = ["LLMEngine", "ModelRunner", "Request", "Status", "resolve_device", "resolve_dtype"]
