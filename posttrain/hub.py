"""Whether the Hugging Face hub can be reached from this machine.

Model loading (``models.loading``) and dataset loading (``data.formats``) both ask before
they download, so each fails in one line, fast, where no hub is reachable instead of after
minutes of retries; a push (``run.push_to_hub``) is refused the same way before training
(``check_push_target``). ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are huggingface_hub's own
settings (its docs, "Environment variables").
"""

import os
import socket

from posttrain.errors import ConfigError


def hub_offline_set() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_status() -> tuple[bool, str]:
    """``(reachable, host)`` of the Hugging Face hub (``$HF_ENDPOINT``): False at once when
    ``HF_HUB_OFFLINE`` is set, else whether a TCP connection opens within 5 s."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    if hub_offline_set():
        return False, host
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443), timeout=5).close()
        return True, host
    except OSError:
        return False, host


def check_push_target(repo_id: str | None, key: str = "run.push_to_hub") -> None:
    """Refuse, in one line, a push to ``repo_id`` that could not happen: no hub reachable
    (``hub_status``). Nothing to check when ``repo_id`` is None."""
    if repo_id is None:
        return
    reachable, host = hub_status()
    if not reachable:
        why = "HF_HUB_OFFLINE is set" if hub_offline_set() else f"{host} cannot be reached from this machine"
        raise ConfigError(f"{key}: cannot push to {repo_id}: {why}; unset {key} (push later with "
                          f"`posttrain push RUN_DIR {repo_id}`) or run where the hub is reachable")
