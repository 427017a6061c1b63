"""LLM: the offline batch API, in vLLM's shape.

from kvsqueeze import LLM, SamplingParams
llm = LLM("path/to/model", policy="ada-snapkv", keep=0.125, kv_memory="1GiB", dtype="bf16")
outputs = llm.generate(["prompt one", "prompt two"], SamplingParams(max_tokens=64))
"""

from __future__ import annotations

from tqdm.auto import tqdm

from kvsqueeze.engine.llm_engine import EngineArgs, LLMEngine
from kvsqueeze.engine.output import RequestOutput
from kvsqueeze.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs) -> None:
        """`model`: a Hugging Face model folder (Llama, Mistral or Qwen2 family); keyword
        arguments are EngineArgs' (policy, keep, tokens, window, alpha, kv_memory, dtype,
        device, max_num_seqs, max_num_batched_tokens, max_kv_tokens, compress_chunks, reserve;
        kv_bits 16/8/4/2, kv_group, kv_residual: KIVI quantization of the stored K/V)."""
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        prefix: str | list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of `prompts`. With
        `prefix` (e.g. a document the prompts ask about), every prompt continues it and
        the prefix is compressed once, question-agnostically, and shared."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params or SamplingParams()] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order = {
            self.engine.add_request(p, sp, prefix=prefix).seq_id: i
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        }
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results
