"""Rollouts from a vLLM server in its own process (another GPU, another node, or this CPU).

The trainer talks to an OpenAI-compatible vLLM server (``vllm.entrypoints.openai.api_server``)
over HTTP, token in and token out, through vLLM's own endpoints (vLLM docs, "Scale-out
serving" / "RLHF"):

- ``POST /inference/v1/generate`` (``--enable-scale-out``): prompt ids in, the sampled ids,
  their log-probabilities and the weight versions that produced them out. Nothing is
  re-tokenised: text is decoded here, for rewards and logs only. One request per prompt with
  ``n`` samples, sent concurrently; the seed of prompt ``i`` is ``seed + i * n`` (vLLM gives
  sample ``j`` of a request ``seed + j``, so no two samples of a call share a seed).
- weight sync after every update, full weights: the policy's Hugging Face-named weights
  (``rollout.vllm.policy_state_for_inference``, LoRA merged) are written to
  ``sync_dir/v<N>/model.safetensors`` (only the newest is kept; ``lm_head.weight`` included
  even when tied, see ``with_lm_head``), then ``/pause?mode=keep``
  (requests in flight freeze and go on with the new weights), ``/collective_rpc``
  ``reload_weights(weights_path=...)``, ``/reset_prefix_cache``, ``/update_weight_version N``,
  ``/resume``. These need ``VLLM_SERVER_DEV_MODE=1`` on the server.
- weight sync of a LoRA policy: the adapter alone is saved (peft format) to
  ``sync_dir/adapter_v<N>``, loaded with ``/v1/load_lora_adapter`` as ``policy-v<N>`` (the
  previous one unloaded); requests name it (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``,
  ``--enable-lora``). The server's base weights are the policy's base, unmerged.

Log-probabilities: the server runs with ``--logprobs-mode processed_logprobs``: the log-softmax
of the logits after temperature (and after top-k / top-p truncation when those are set, which
vLLM applies before it reports processed log-probs). With top_p = 1 and top_k = 0 these are
``log_softmax(logits / T)``, the distribution the trainer computes (``rollout.base.Completion``).

Versions: ``engine.version`` counts the syncs (0 = the weights the engine started with);
every completion carries the oldest version among the weights that sampled its tokens (a
request in flight during a sync spans two), or, for a LoRA policy, the adapter's version.

Several trainer ranks (torch.distributed) share one server: every rank calls
``update_weights`` (gathering FSDP-sharded weights is collective), rank 0 alone writes the
files and calls the server, and a barrier keeps every rank from generating before the new
weights are in. When posttrain starts the server (no ``server_url``), rank 0 starts it and
broadcasts its URL.

A server that cannot be reached, exits while starting, or stops answering raises
``RolloutServerError``: one line, which the command line prints as ``error: ...``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from posttrain.errors import UserError
from posttrain.rollout.base import Completion, SamplingParams

SERVED_NAME = "policy"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


class RolloutServerError(UserError):
    """The vLLM server could not be started, reached, or stopped answering (one line)."""


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_log_line(path: Path | None) -> str:
    """The last non-empty line of a log file ('' when there is none)."""
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 8192))
        lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def lora_rank_flag(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of rank ``rank``."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise RolloutServerError(f"rollout: a LoRA rank of {rank} is above vLLM's largest --max-lora-rank "
                             f"({LORA_RANKS[-1]})")


def server_command(python: str, model_dir: Path, port: int, *, dtype: str, max_model_len: int, seed: int,
                   enforce_eager: bool = True, lora_rank: int | None = None, host: str = "127.0.0.1",
                   gpu_memory_utilization: float | None = None, extra: tuple[str, ...] = (),
                   cpu: bool = False) -> list[str]:
    """The command line that starts a vLLM server posttrain can drive (see the module docstring).

    ``cpu``: the server runs on the CPU build, whose seeded sampling cannot rewind a request's
    random generator when a prefill is split over engine steps (vLLM 0.32 CPU: "CPU Generator
    does not use offset", the engine dies); prompts are then prefilled whole
    (``--no-enable-chunked-prefill``, a token budget of at least ``max_model_len``)."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", host,
               "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", str(seed),
               "--enable-scale-out", "--logprobs-mode", "processed_logprobs", "--served-model-name", SERVED_NAME]
    if enforce_eager:
        command.append("--enforce-eager")
    if gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if lora_rank is not None:
        command += ["--enable-lora", "--max-lora-rank", str(lora_rank_flag(lora_rank)), "--max-loras", "2"]
    if cpu:
        command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len, 8192))]
    return command + list(extra)


def server_env(kv_cache_gb: float, lora: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a posttrain-driven server needs: dev-mode endpoints (pause, collective_rpc,
    weight versions), runtime LoRA loading, and the CPU KV-cache size."""
    env = dict(os.environ if base is None else base)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def _is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stop_with_parent() -> None:
    """In the server's process, before exec: SIGTERM when the trainer that started it dies, even
    by SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``), so no server outlives its run."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ServerProcess:
    """A vLLM server this process started: its own session (so its engine-core children stop
    with it), its log file, ``stop()`` at exit."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_stop_with_parent if sys.platform == "linux" else None)
        atexit.register(self.stop)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server (it stops its engine processes), then SIGKILL to whatever of its
        process group is left after ``timeout_s``."""
        if self.process.poll() is None:
            try:
                self.process.terminate()
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: only what it started
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(10.0)
        if not self._log.closed:
            self._log.close()


class ServerClient:
    """JSON over HTTP to one vLLM server; every failure to get an answer is a ``RolloutServerError``."""

    def __init__(self, url: str, timeout_s: float, *, checkpoint_hint: str = ""):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.checkpoint_hint = checkpoint_hint

    def request(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace").strip().replace("\n", " ")
            raise RolloutServerError(f"rollout: the vLLM server at {self.url} refused {method} {path}: "
                                     f"HTTP {exc.code} {detail[:400]}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RolloutServerError(f"rollout: the vLLM server at {self.url} stopped answering ({method} {path}: "
                                     f"{reason}){self.checkpoint_hint}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode("utf-8", "replace")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False


class VLLMServerEngine:
    """``RolloutEngine`` on a vLLM server in another process (see the module docstring).

    Build it with ``VLLMServerEngine.start`` (posttrain starts a server for the run) or
    ``VLLMServerEngine.connect`` (a server someone started, e.g. ``posttrain rollout-server``).
    ``error_hint`` ends the one-line error of a server that stops answering (for example
    ``"; the last checkpoint in runs/x/checkpoints is intact"``).
    """

    def __init__(self, client: ServerClient, tokenizer: Any, sync_dir: Path, *, dtype: torch.dtype,
                 lora: bool = False, process: ServerProcess | None = None, owns_sync_dir: bool = False,
                 max_workers: int = 64):
        self.client = client
        self.tokenizer = tokenizer
        self.sync_dir = Path(sync_dir)
        self.dtype = dtype
        self.lora = lora
        self.process = process
        self.version = 0
        self.model_name = SERVED_NAME
        self._owns_sync_dir = owns_sync_dir
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vllm-server")
        self._closed = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def start(cls, policy: torch.nn.Module, tokenizer: Any, *, sync_dir: str | Path | None = None,
              log_dir: str | Path | None = None, python: str | None = None, seed: int = 0,
              max_model_len: int = 2048, kv_cache_gb: float = 2.0, gpu_memory_utilization: float = 0.3,
              enforce_eager: bool = True, extra_args: tuple[str, ...] = (), start_timeout_s: float = 600.0,
              timeout_s: float = 600.0, error_hint: str = "") -> VLLMServerEngine:
        """Export the policy (LoRA: its base, unmerged), start a server on it on this machine
        (rank 0 only; the other ranks get its URL) and wait until it answers."""
        lora = _is_lora(policy)
        on_gpu = torch.cuda.is_available()
        dtype = torch.bfloat16 if on_gpu else torch.float32
        owns = sync_dir is None
        sync_path = Path(tempfile.mkdtemp(prefix="posttrain-vllm-sync-")) if owns else Path(sync_dir)
        rank, _ = _dist()
        process = None
        outcome: str | RolloutServerError | None = None
        if rank == 0:
            from posttrain.rollout.vllm import export_for_vllm

            model_dir = export_for_vllm(policy, tokenizer, sync_path / "model", dtype, merge=not lora)
            port = free_port()
            lora_rank = max(int(cfg.r) for cfg in policy.peft_config.values()) if lora else None
            command = server_command(python or sys.executable, model_dir, port, dtype=str(dtype).removeprefix("torch."),
                                     max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                                     lora_rank=lora_rank, gpu_memory_utilization=gpu_memory_utilization if on_gpu else None,
                                     extra=tuple(extra_args), cpu=not on_gpu)
            log_path = Path(log_dir or sync_path) / "vllm_server.log"
            process = ServerProcess(command, server_env(kv_cache_gb, lora), log_path)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until_up(url, process, start_timeout_s)
                ServerClient(url, timeout_s).request("POST", "/update_weight_version", {"new_version": "0"})
                outcome = url
            except RolloutServerError as exc:
                process.stop()
                outcome = exc  # every rank raises it
        else:
            from posttrain.rollout.vllm import policy_state_for_inference

            policy_state_for_inference(policy, merge=not lora)  # FSDP: rank 0's export gathers collectively
        outcome = _broadcast(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        engine = cls(ServerClient(outcome, timeout_s, checkpoint_hint=error_hint), tokenizer, sync_path, dtype=dtype,
                     lora=lora, process=process, owns_sync_dir=owns and rank == 0)
        if lora:
            engine._sync_adapter(policy, version=0)
        _barrier()
        return engine

    @classmethod
    def connect(cls, url: str, policy: torch.nn.Module, tokenizer: Any, *, sync_dir: str | Path,
                timeout_s: float = 600.0, error_hint: str = "") -> VLLMServerEngine:
        """Drive a server that is already running: check it answers and can take weights, then
        push the policy's current weights (LoRA: the base, then the adapter), so it samples from
        the trainer's weights from the first step (a resumed run included)."""
        client = ServerClient(url, timeout_s, checkpoint_hint=error_hint)
        lora = _is_lora(policy)
        rank, _ = _dist()
        outcome: torch.dtype | RolloutServerError | None = None
        if rank == 0:
            try:
                if not client.healthy():
                    raise RolloutServerError(f"rollout.server_url: no vLLM server answers /health at {client.url}")
                outcome = _check_server(client, lora)
            except RolloutServerError as exc:
                outcome = exc
        outcome = _broadcast(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        dtype = outcome
        engine = cls(client, tokenizer, Path(sync_dir), dtype=dtype, lora=lora)
        engine._sync_full(policy, version=0)  # LoRA: the base weights, unmerged
        if lora:
            engine._sync_adapter(policy, version=0)
        return engine

    # ----------------------------------------------------------------- RolloutEngine
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        """``n`` completions per prompt, in prompt order (one concurrent request per prompt)."""
        model = self.model_name
        lora_version = self.version if self.lora else None
        requests = [self._request_body(ids, params, index, model) for index, ids in enumerate(prompt_ids)]
        responses = list(self._pool.map(lambda body: self.client.request("POST", "/inference/v1/generate", body),
                                        requests))
        completions = []
        for index, response in enumerate(responses):
            choices = sorted(response.get("choices") or [], key=lambda choice: choice.get("index", 0))
            if len(choices) != params.n:
                raise RolloutServerError(f"rollout: the vLLM server at {self.client.url} returned {len(choices)} "
                                         f"completions for a prompt, not n = {params.n}")
            for choice in choices:
                completions.append(self._completion(index, choice, params, lora_version))
        return completions

    def update_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's current weights (or LoRA adapter) to the server: ``version`` + 1."""
        if self.lora:
            self._sync_adapter(model, version=self.version + 1)
        else:
            self._sync_full(model, version=self.version + 1)

    def close(self) -> None:
        """Stop the server posttrain started (a server given by URL keeps running)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.process is not None:
            self.process.stop()
        if self._owns_sync_dir:
            shutil.rmtree(self.sync_dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- details
    def _request_body(self, ids: list[int], params: SamplingParams, index: int, model: str) -> dict[str, Any]:
        sampling: dict[str, Any] = {
            "n": params.n, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "max_tokens": params.max_new_tokens, "skip_special_tokens": False, "include_stop_str_in_output": True,
        }
        if params.stop:
            sampling["stop"] = list(params.stop)
        if params.seed is not None:
            sampling["seed"] = params.seed + index * params.n
        if params.return_logprobs:
            sampling["logprobs"] = 0
        return {"token_ids": [int(token) for token in ids], "sampling_params": sampling, "model": model}

    def _completion(self, index: int, choice: dict[str, Any], params: SamplingParams,
                    lora_version: int | None) -> Completion:
        token_ids = [int(token) for token in choice.get("token_ids") or []]
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise RolloutServerError(f"rollout: the vLLM server at {self.client.url} ended a completion with "
                                     f"finish_reason {reason!r} (aborted or paused by another client?)")
        logprobs = None
        if params.return_logprobs:
            content = (choice.get("logprobs") or {}).get("content") or []
            if len(content) != len(token_ids):
                raise RolloutServerError(f"rollout: the vLLM server at {self.client.url} returned {len(content)} "
                                         f"log-probs for {len(token_ids)} tokens")
            logprobs = [float(entry["logprob"]) for entry in content]
        if lora_version is not None:
            version = lora_version
        else:
            spans = [span.get("version") for span in choice.get("weight_versions") or []]
            numbers = [int(v) for v in spans if isinstance(v, (int, str)) and str(v).lstrip("-").isdigit()]
            version = min(numbers) if numbers else None
        return Completion(prompt_index=index, token_ids=token_ids,
                          text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                          finish_reason=reason, logprobs=logprobs, weight_version=version)

    def _sync_full(self, model: torch.nn.Module, *, version: int) -> None:
        from safetensors.torch import save_file

        from posttrain.rollout.vllm import policy_state_for_inference

        state = policy_state_for_inference(model, merge=not self.lora)  # collective under FSDP
        rank, _ = _dist()
        error: RolloutServerError | None = None
        if rank == 0:
            target = self.sync_dir / f"v{version}"
            try:
                tmp = self.sync_dir / f".v{version}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                tensors = {name: tensor.to(self.dtype).contiguous() for name, tensor in with_lm_head(state).items()}
                save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
                del tensors
                self._reload(target, version)
                self._remove_older(f"v{version}", prefix="v")
            except RolloutServerError as exc:
                error = exc
            except (OSError, SafetensorError) as exc:  # a full or unwritable disk
                error = self._write_error(target, exc)
        del state
        error = _broadcast(error)
        if error is not None:
            raise error
        self.version = version
        _barrier()

    def _reload(self, weights_dir: Path, version: int) -> None:
        client = self.client
        client.request("POST", "/pause?mode=keep")
        try:
            client.request("POST", "/collective_rpc", {"method": "reload_weights",
                                                       "kwargs": {"weights_path": str(weights_dir.resolve())}})
            client.request("POST", "/reset_prefix_cache")
            client.request("POST", "/update_weight_version", {"new_version": str(version)})
        finally:
            client.request("POST", "/resume")

    def _sync_adapter(self, model: torch.nn.Module, *, version: int) -> None:
        """Save the LoRA adapter alone and have the server load it as ``policy-v<version>``."""
        state = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                state[name] = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu()
        rank, _ = _dist()
        error: RolloutServerError | None = None
        if rank == 0:
            name = f"{SERVED_NAME}-v{version}"
            target = self.sync_dir / f"adapter_v{version}"
            try:
                shutil.rmtree(target, ignore_errors=True)
                model.save_pretrained(str(target), state_dict=state, safe_serialization=True)
                self.client.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(target.resolve())})
                previous = self.model_name
                if previous != SERVED_NAME and previous != name:
                    self.client.request("POST", "/v1/unload_lora_adapter", {"lora_name": previous})
                self.client.request("POST", "/update_weight_version", {"new_version": str(version)})
                self._remove_older(f"adapter_v{version}", prefix="adapter_v")
            except RolloutServerError as exc:
                error = exc
            except (OSError, SafetensorError) as exc:  # a full or unwritable disk
                error = self._write_error(target, exc)
        error = _broadcast(error)
        if error is not None:
            raise error
        self.version = version
        self.model_name = f"{SERVED_NAME}-v{version}"
        _barrier()

    def _write_error(self, target: Path, exc: Exception) -> RolloutServerError:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return RolloutServerError(f"rollout: writing the weights for the vLLM server to {target} failed ({reason})"
                                  f"{self.client.checkpoint_hint}")

    def _remove_older(self, keep: str, *, prefix: str) -> None:
        for path in self.sync_dir.glob(f"{prefix}*"):
            if path.name != keep and path.name[len(prefix):].isdigit():
                shutil.rmtree(path, ignore_errors=True)


def with_lm_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with ``lm_head.weight`` present (a copy of the input embeddings when they are tied).

    vLLM 0.32's in-place ``reload_weights`` from a file without ``lm_head.weight`` leaves a tied
    output layer stale (measured on CPU: log-probs off by ~100 nats after a sync that changed the
    embeddings); with it in the file the reload is exact, tied or not.
    """
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}
    return state


def wait_until_up(url: str, process: ServerProcess, timeout_s: float) -> None:
    """Poll ``/health`` until the server answers; a server that exits or never answers is one line."""
    client = ServerClient(url, 5.0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.running():
            line = last_log_line(process.log_path)
            raise RolloutServerError(f"rollout: the vLLM server exited while starting (status "
                                     f"{process.process.returncode}); the last line of {process.log_path}: {line}")
        if client.healthy():
            return
        time.sleep(1.0)
    raise RolloutServerError(f"rollout: the vLLM server did not answer {url}/health within {timeout_s:.0f} s "
                             f"(rollout.server_start_timeout_s); its log: {process.log_path}")


def _check_server(client: ServerClient, lora: bool) -> torch.dtype:
    """The dtype the server holds weights in; one-line errors when it cannot take weight syncs."""
    try:
        client.request("GET", "/weight_info", timeout_s=30)
        info = client.request("GET", "/server_info?config_format=json", timeout_s=60)
    except RolloutServerError as exc:
        raise RolloutServerError(f"{exc} (posttrain needs a server started with VLLM_SERVER_DEV_MODE=1 and "
                                 f"--enable-scale-out: `posttrain rollout-server`, README 'Scaling out')") from None
    config = (info or {}).get("vllm_config") or {}
    model_config = config.get("model_config") or {}
    mode = model_config.get("logprobs_mode")
    if mode not in (None, "processed_logprobs"):
        raise RolloutServerError(f"rollout.server_url: the server at {client.url} reports log-probs as {mode!r}; "
                                 f"start it with --logprobs-mode processed_logprobs")
    served = model_config.get("served_model_name")
    served = served if isinstance(served, list) else [served]
    if SERVED_NAME not in served:
        raise RolloutServerError(f"rollout.server_url: the server at {client.url} serves {served}, not "
                                 f"'{SERVED_NAME}'; start it with --served-model-name {SERVED_NAME}")
    if lora and not config.get("lora_config"):
        raise RolloutServerError(f"rollout.server_url: the policy is LoRA but the server at {client.url} was started "
                                 f"without --enable-lora")
    dtype = str(model_config.get("dtype", "float32")).removeprefix("torch.")
    return getattr(torch, dtype, torch.float32)
