"""Whether the Hugging Face hub can be reached from this machine.

Model loading (``models.loading``) and dataset loading (``data.formats``) both ask before
they download, so each fails in one line, fast, where no hub is reachable instead of after
minutes of retries. ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are huggingface_hub's own
settings (its docs, "Environment variables").
"""

import os
import socket


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
