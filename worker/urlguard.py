"""Which image URLs the worker may download, and which network addresses they may reach.

A tenant names image URLs and the worker downloads them from the node. Without a check a URL is a
way into the node's own services (loopback), the cloud's metadata endpoint (link-local), the pod
and service networks (private ranges): server-side request forgery. So a URL must be `http` or
`https` and may reach only globally routable unicast addresses, unless the node's allow-list
(setting `image_url_allowed_cidrs`) names the range, e.g. for an in-cluster image server.

The check is on addresses, never on spellings: `resolve` asks getaddrinfo, which turns `127.1`,
`2130706433`, `0x7f000001` and `0177.0.0.1` into 127.0.0.1 exactly as a connect would, and checks
EVERY address it returns; the caller then connects to one of those addresses (never looking the
name up again, which a DNS rebinding could answer differently). IPv6 forms that carry an IPv4
address (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4) are judged by that IPv4 address
too. Errors here never say what a name resolved to.

Everything is pure except `resolve`, whose resolver is a parameter; a literal address is resolved
with AI_NUMERICHOST, so it never causes a DNS query.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

# Explicit lists rather than only `is_global`, whose meaning changed between Python versions.
REFUSED_IPV4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8",        # "this network"; 0.0.0.0 reaches the node itself
    "10.0.0.0/8",       # RFC 1918
    "100.64.0.0/10",    # carrier-grade NAT (RFC 6598), often cluster-internal
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local: cloud metadata endpoints
    "172.16.0.0/12",    # RFC 1918
    "192.0.0.0/24",     # IETF protocol assignments
    "192.0.2.0/24",     # documentation
    "192.88.99.0/24",   # 6to4 relay anycast
    "192.168.0.0/16",   # RFC 1918
    "198.18.0.0/15",    # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",   # documentation
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and the broadcast address 255.255.255.255
))
REFUSED_IPV6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/128",           # unspecified
    "::1/128",          # loopback
    "::/96",            # IPv4-compatible (deprecated), whatever IPv4 address it carries
    "64:ff9b:1::/48",   # local-use NAT64
    "100::/64",         # discard
    "2001::/23",        # IETF protocol assignments (Teredo, ORCHID...)
    "2001:db8::/32",    # documentation
    "fc00::/7",         # unique local (ULA)
    "fe80::/10",        # link-local
    "fec0::/10",        # site-local (deprecated)
    "ff00::/8",         # multicast
))
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class URLRefused(ValueError):
    """The URL is not one the worker downloads (scheme, syntax). The message is safe to show."""


class HostNotAllowed(ValueError):
    """The URL's host is, or resolves to, an address outside what images may reach."""


@dataclass(frozen=True)
class Target:
    """One URL taken apart for a request to a pinned address."""

    url: str
    scheme: str
    host: str
    """The name (IDNA-encoded) or literal address, without brackets: for the lookup, SNI and the
    certificate check."""
    port: int
    request_path: str
    """Path and query, what goes on the request line."""
    host_header: str
    credentials: str | None
    """`user:password` from the URL's userinfo (sent only to the URL's own origin), or None."""

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def parse(url: str) -> Target:
    """`url` taken apart, or URLRefused (only http and https; a host; a valid port)."""
    if not isinstance(url, str) or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise URLRefused("the URL is empty or contains spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        raise URLRefused("the URL is not valid") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise URLRefused("only http:// and https:// URLs are allowed")
    if not hostname:
        raise URLRefused("the URL has no host")
    if port == 0:
        raise URLRefused("the URL's port is not valid")
    try:
        host = hostname.encode("idna").decode("ascii") if not hostname.isascii() else hostname
    except UnicodeError:
        raise URLRefused("the URL's host is not a valid name") from None
    port = port or DEFAULT_PORTS[scheme]
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port == DEFAULT_PORTS[scheme] else f"{bracketed}:{port}"
    request_path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    credentials = None
    if parts.username is not None or parts.password is not None:
        credentials = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
    return Target(url=url, scheme=scheme, host=host, port=port, request_path=request_path,
                  host_header=host_header, credentials=credentials)


def redact(url: str) -> str:
    """`url` fit for logs: scheme, host, port and path; no userinfo, query or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except (ValueError, AttributeError):
        return "<invalid URL>"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_cidrs(text: str) -> tuple[Network, ...]:
    """The allow-list setting (comma-separated CIDRs) as networks; ValueError names a bad entry."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"image_url_allowed_cidrs: {item!r} is not a CIDR") from None
    return tuple(out)


def literal_address(host: str) -> Address | None:
    """The address `host` spells, if it is a literal in any form getaddrinfo accepts (including
    inet_aton's legacy `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`); None for a name."""
    bare = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if bare and all(c in "0123456789abcdefxABCDEFX." for c in bare):  # inet_aton ignores what follows a space
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, when it carries one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    value = int(ip)
    if value >> 32 == 0 or ip in NAT64:  # IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::a.b.c.d
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def address_allowed(ip: Address | str, allowed: Sequence[Network] = ()) -> bool:
    """Whether an image download may connect to `ip`: inside `allowed`, or a globally routable
    unicast address (and, for an IPv6 address carrying an IPv4 one, that one too)."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    if ip.version == 6:
        ip = ipaddress.IPv6Address(int(ip))  # drop a scope id
    inner = embedded_ipv4(ip) if ip.version == 6 else None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip, inner = ip.ipv4_mapped, None  # ::ffff:a.b.c.d is a.b.c.d on the wire
    if any(ip in net for net in allowed) or (inner is not None and any(inner in net for net in allowed)):
        return True
    for candidate in (ip, inner):
        if candidate is None:
            continue
        refused = REFUSED_IPV4 if candidate.version == 4 else REFUSED_IPV6
        if any(candidate in net for net in refused) or not candidate.is_global or candidate.is_multicast:
            return False
    return True


Resolver = Callable[..., Iterable[tuple]]


def resolve(host: str, port: int, allowed: Sequence[Network] = (),
            getaddrinfo: Resolver | None = None) -> list[Address]:
    """The addresses to connect to for `host`: every address getaddrinfo returns, each checked.

    HostNotAllowed if any of them is refused (a name with one public and one private address is
    refused as a whole: which one a connect would use is up to the resolver's order). OSError
    (socket.gaierror) if the name does not resolve. Under gevent, socket.getaddrinfo runs in the
    hub's thread pool, and the resolver's own time-outs (resolv.conf) bound it.
    """
    literal = literal_address(host)
    if literal is not None and not address_allowed(literal, allowed):
        raise HostNotAllowed("the URL's host is not allowed")
    flags = socket.AI_NUMERICHOST if literal is not None else 0
    # looked up when called: gevent's monkey-patching replaces socket.getaddrinfo
    infos = (getaddrinfo or socket.getaddrinfo)(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP, flags)
    found: list[Address] = []
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not address_allowed(ip, allowed):
            raise HostNotAllowed("the URL's host is not allowed")
        if ip not in found:
            found.append(ip)
    if not found:
        raise socket.gaierror(socket.EAI_NONAME, "no address")
    return found
