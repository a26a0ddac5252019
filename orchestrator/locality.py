"""Whether a model entry runs on this machine or network: what ``local: true`` may hold.

A model is local when it runs in-process (``llamacpp/``) or its host is an IP
literal that is loopback, private or link-local, ``localhost``, or a name listed
in ``local_hosts``. ``ollama/`` models with no ``api_base`` go to
``OLLAMA_HOST`` (default ``127.0.0.1:11434``). Names are never resolved: DNS
answers change after load, so a name that is not listed is not local. Ollama's
cloud models (``gpt-oss:120b-cloud``, ``gemma4:cloud``) are forwarded by the
local server to ollama.com, so they are never local whatever the host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from urllib.parse import urlsplit

OLLAMA_DEFAULT_HOST = "127.0.0.1:11434"
_CLOUD_TAG = re.compile(r"[-:]cloud(?![a-z0-9])")
# Only plain hosts and ports: user info, backslashes or spaces are read
# differently by different URL parsers, so such an address is never judged local.
_NETLOC = re.compile(r"^(?:[A-Za-z0-9._~-]*|\[[0-9A-Fa-f:.%A-Za-z]+\])(?::[0-9]{0,5})?$")
_HOST_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?$")


def why_not_local(
    model: str, api_base: str | None, *, local_hosts: Collection[str], ollama_host: str | None
) -> str | None:
    """Why ``model`` at ``api_base`` is not local, or None when it is."""
    provider, _, name = model.partition("/")
    if provider == "llamacpp":
        return None
    if provider.startswith("ollama") and _CLOUD_TAG.search(name.lower()):
        return f"{model} is an Ollama cloud model: Ollama forwards it to ollama.com"
    if api_base is not None:
        address, what = api_base, "api_base"
    elif provider == "ollama":
        address, what = ollama_host or OLLAMA_DEFAULT_HOST, "OLLAMA_HOST"
    else:
        return f"{model} is a hosted provider; give it an api_base on your network"
    host = _host_of(address, ollama=provider == "ollama")
    if host is None:
        return f"{what} '{address}' is not a plain http(s) address with a host"
    if is_local_host(host, local_hosts):
        return None
    return (
        f"{what} host '{host}' is not loopback, a private address or in local_hosts"
        " (host names are not resolved)"
    )


def is_local_host(host: str, local_hosts: Collection[str]) -> bool:
    """``host`` (no port, no brackets) is loopback, private, ``localhost`` or listed."""
    host = normalise_host(host)
    if host == "localhost" or host in {normalise_host(h) for h in local_hosts}:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: only listed names count, never what DNS says today
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private or ip.is_link_local


def normalise_host(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")


def check_local_host_entry(host: str) -> str:
    """A ``local_hosts`` entry, normalised; ``ValueError`` unless it is a bare name or IP."""
    bare = normalise_host(host)
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not _HOST_NAME.match(bare):
        raise ValueError(f"'{host}' is not a host name or IP address (no scheme, port or path)")
    return bare


def _host_of(address: str, *, ollama: bool) -> str | None:
    # The ollama client accepts "host:port" with no scheme, as OLLAMA_HOST does.
    url = address if "://" in address else f"http://{address}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not _NETLOC.match(parts.netloc):
        return None
    if not parts.hostname:
        # Ollama reads ":11434" as 127.0.0.1:11434; for anything else, no host is no answer.
        return "127.0.0.1" if ollama else None
    return parts.hostname


def is_loopback_url(address: str) -> bool:
    """``address`` names this machine: a loopback IP or ``localhost``."""
    host = _host_of(address, ollama=False)
    if host is None:
        return False
    host = normalise_host(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
