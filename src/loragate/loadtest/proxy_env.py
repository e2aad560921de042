"""The HTTP proxy the environment names for a load test's target, resolved once per run.

As curl, requests and the ``openai`` SDK do: ``{scheme}_proxy`` (lower case first, then upper
case), else ``all_proxy``; none for a host ``no_proxy`` lists (``*``, a name, a domain that
is a suffix of the host, a leading dot optional, or for an IP address a CIDR range such as
``10.0.0.0/8``, as curl 7.86+ reads it). A loopback target (localhost,
``127.0.0.0/8``, ``::1``) is never proxied, as Go's ``ProxyFromEnvironment`` decides: a proxy
elsewhere cannot reach this machine's loopback.

Resolved once, not per request: aiohttp's ``trust_env`` looks the proxy up and reads
``~/.netrc`` in a worker thread on every request (client time in every latency figure of a load
generator), and a ``~/.netrc`` entry for the target turns each request carrying
``--api-key``'s Authorization header into a ValueError.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from loragate.core.errors import ConfigError

PROXY_SCHEMES = ("http", "https")  # what aiohttp can connect through


@dataclass(frozen=True, slots=True)
class EnvProxy:
    url: str  # as aiohttp takes it, credentials included
    variable: str  # the environment variable it came from

    def shown(self) -> str:
        """The URL without its password (for the stderr note)."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = f"{parts.username}:***@{parts.hostname}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def env_proxy(target_url: str, environ: Mapping[str, str] | None = None) -> EnvProxy | None:
    """The proxy for ``target_url`` (None: connect directly); :class:`ConfigError` for a proxy
    aiohttp cannot use (``socks5://``...)."""
    env = os.environ if environ is None else environ
    target = urlsplit(target_url)
    host = (target.hostname or "").lower()
    if not host or _loopback(host) or _bypassed(host, _first(env, "no_proxy")):
        return None
    for name in (f"{target.scheme}_proxy", "all_proxy"):
        found = _named(env, name)
        if found is not None:
            variable, value = found
            url = value if "://" in value else "http://" + value  # curl's default scheme
            scheme = urlsplit(url).scheme.lower()
            if scheme not in PROXY_SCHEMES:
                raise ConfigError(
                    f"a {scheme} proxy cannot be used (http or https only): unset it, list "
                    f"the target's host in NO_PROXY, or pass --no-proxy-env",
                    key=variable,
                )
            return EnvProxy(url, variable)
    return None


def _named(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for variable in (name, name.upper()):
        value = env.get(variable, "").strip()
        if value:
            return variable, value
    return None


def _first(env: Mapping[str, str], name: str) -> str:
    found = _named(env, name)
    return "" if found is None else found[1]


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _address(host)
    return address is not None and address.is_loopback


def _bypassed(host: str, no_proxy: str) -> bool:
    address = _address(host)
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        name = entry.lstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if name and (host == name or host.endswith("." + name)):
            return True
        if address is not None and "/" in name and _in_range(address, name):
            return True
    return False


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _in_range(address: ipaddress.IPv4Address | ipaddress.IPv6Address, cidr: str) -> bool:
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
    return address.version == network.version and address in network
