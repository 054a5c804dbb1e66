"""SSRF policy for agent webhook URLs: checked when an admin saves one and again on every send.

A URL is judged by the host aiohttp will really connect to: yarl (aiohttp's URL library) IDNA/UTS46-folds
the host, so full-width digits and letters or ideographic dots (U+3002, U+FF0E...) spell `127.0.0.1` or
`localhost` there, and the send path connects with the very `yarl.URL` that was checked (`webhook_target`).
aiohttp skips the resolver for IP literals, so those are judged here; for names the check also runs inside
the DNS resolution aiohttp connects with (`PolicyResolver`), so a name that later resolves somewhere
forbidden is caught too.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import unicodedata

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import AsyncResolver
from yarl import URL

from app.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
#: Never reachable, whatever the settings: link-local (cloud metadata lives there) and metadata services.
ALWAYS_BLOCKED = [
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("100.100.100.200/32"),
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("224.0.0.0/4"),
    ipaddress.ip_network("ff00::/8"),
    ipaddress.ip_network("240.0.0.0/4"),
    ipaddress.ip_network("255.255.255.255/32"),
]
BLOCKED_NAMES = {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
#: Prefixes whose last 32 bits are an IPv4 address a translator (NAT64, SIIT) would connect to: well-known
#: NAT64, local-use NAT64 (RFC 8215, in its /96 form) and IPv4-translated (::ffff:0:a.b.c.d, RFC 2765).
TRANSLATED_IPV4 = (
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("::ffff:0:0:0/96"),
)
#: A host name as yarl hands it to the resolver (IDNA-encoded, so ASCII); `%` escapes, `@` etc. are no name.
HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")


#: DNS limits (RFC 1035): a name no resolver looks up is refused at save, not found unreachable at every send.
MAX_LABEL = 63
MAX_NAME = 253


def _is_host_name(name: str) -> bool:
    """A name a resolver is handed: its characters, no empty label (`n8n..example.com`), DNS lengths."""
    if not HOST_NAME.fullmatch(name) or len(name) > MAX_NAME:
        return False
    return all(0 < len(label) <= MAX_LABEL for label in name.split("."))


class WebhookPolicyError(ValueError):
    """The URL or one of its addresses is not allowed; the message is safe to show an admin."""


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """IPv4 hidden in an IPv6 spelling: mapped (::ffff:a.b.c.d), 6to4, Teredo, NAT64/SIIT, compatible (::a.b.c.d)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if any(addr in net for net in TRANSLATED_IPV4):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if int(addr) >> 32 == 0 and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr))
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """An IP address in any spelling a resolver or browser accepts: dotted, decimal, hex, octal, short."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:
            # inet_aton accepts 2130706433, 0x7f000001, 0177.0.0.1 and 127.1, exactly like the C resolver.
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


@functools.lru_cache(maxsize=512)
def _host_key(host: str) -> str:
    """`host` as yarl encodes it for the wire, lowercased, without trailing dots: the policy's lookup key."""
    try:
        host = URL.build(scheme="http", host=host.strip("[]")).raw_host or host
    except ValueError:  # a configured name yarl cannot encode is compared as written
        pass
    return host.rstrip(".").lower()


def _is_allowed_host(host: str, settings: Settings) -> bool:
    """`host` is listed in WEBHOOK_ALLOWED_HOSTS, whichever spelling (Unicode, xn--, case) either side uses."""
    key = _host_key(host)
    return any(key == _host_key(allowed) for allowed in settings.WEBHOOK_ALLOWED_HOSTS)


#: Local-use NAT64 (RFC 8215): a translator of the operator's own, whose prefix may be of any length RFC 6052
#: allows, so the IPv4 it reaches may sit in other bits than the last 32. A private network as a whole.
LOCAL_USE_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def check_address(addr: IPAddress, *, host: str, settings: Settings) -> None:
    candidates: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            candidates.append(embedded)
    for candidate in candidates:
        if any(candidate in net for net in ALWAYS_BLOCKED if candidate.version == net.version):
            raise WebhookPolicyError("webhook address is link-local, metadata or reserved, which is never allowed")
    if settings.WEBHOOK_ALLOW_PRIVATE_NETWORKS or _is_allowed_host(host, settings):
        return
    for candidate in candidates:
        # Site-local IPv6 (fec0::/10) is deprecated, yet still routed inside some networks; Python calls it global.
        local_v6 = isinstance(candidate, ipaddress.IPv6Address) and (
            candidate.is_site_local or candidate in LOCAL_USE_NAT64
        )
        if (
            candidate.is_loopback
            or candidate.is_private
            or local_v6
            or candidate in ipaddress.ip_network("100.64.0.0/10")
        ):
            raise WebhookPolicyError(
                "webhook address is private or loopback; set WEBHOOK_ALLOW_PRIVATE_NETWORKS or WEBHOOK_ALLOWED_HOSTS"
            )
        if not candidate.is_global:
            raise WebhookPolicyError("webhook address is not a public address")


#: ASCII controls, space and DEL; beyond ASCII, what `_has_unseen_characters` judges by category.
_UNSEEN_ASCII = re.compile(r"[\x00-\x20\x7f]")
#: Controls (C1, NEL among them), format characters (zero-width, BOM, bidi) and separators (spaces, lines).
UNSEEN_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _has_unseen_characters(url: str) -> bool:
    """Whitespace, controls or invisible format characters (NBSP, U+2028, zero-width space, BOM, bidi
    overrides): yarl percent-encodes them into the path, so a URL pasted with one looks right on the admin
    page and 404s at n8n on every message. None of them belongs in a host either."""
    if _UNSEEN_ASCII.search(url):
        return True
    if url.isascii():
        return False
    return any(not c.isascii() and (c.isspace() or unicodedata.category(c) in UNSEEN_CATEGORIES) for c in url)


def webhook_target(url: str, settings: Settings) -> URL:
    """The `yarl.URL` aiohttp will connect to for `url`, judged by its folded host (no DNS).

    Raises WebhookPolicyError with a reason safe to show an admin. The send path posts to the returned
    object itself, so what was checked and what is connected to cannot disagree.
    """
    if len(url) > MAX_URL_LENGTH:
        raise WebhookPolicyError(f"webhook_url is longer than {MAX_URL_LENGTH} characters")
    if _has_unseen_characters(url):
        raise WebhookPolicyError("webhook_url contains whitespace, control or invisible characters")
    try:
        target = URL(url)
        scheme, host, port = target.scheme, target.raw_host, target.port
        has_credentials = target.raw_user is not None or target.raw_password is not None
        authority = target.raw_authority
        target.host  # noqa: B018  # decodes the IDNA labels: a broken `xn--` label raises here, not later
    except ValueError as exc:  # UnicodeError (IDNA) is a ValueError too
        raise WebhookPolicyError("webhook_url is not a valid URL") from exc
    if scheme not in ("http", "https"):
        raise WebhookPolicyError("webhook_url must start with http:// or https://")
    if has_credentials or "@" in authority:
        raise WebhookPolicyError("webhook_url must not contain a user name or password; use webhook_headers")
    if not host:
        raise WebhookPolicyError("webhook_url has no host")
    if port == 0:
        raise WebhookPolicyError("webhook_url has an invalid port")
    name = host.rstrip(".").lower()
    if ":" in name and "%" in name:
        raise WebhookPolicyError(
            "webhook_url has an IPv6 zone id (%...), which names a network interface of this server: "
            "use the address alone"
        )
    literal = parse_ip_literal(name)
    if literal is None and not _is_host_name(name):
        raise WebhookPolicyError("webhook_url has an invalid host")
    if name in BLOCKED_NAMES:
        raise WebhookPolicyError("webhook host is a cloud metadata service, which is never allowed")
    if literal is not None:
        check_address(literal, host=name, settings=settings)
    elif (name == "localhost" or name.endswith(".localhost")) and not (
        settings.WEBHOOK_ALLOW_PRIVATE_NETWORKS or _is_allowed_host(name, settings)
    ):
        raise WebhookPolicyError(
            "webhook address is private or loopback; set WEBHOOK_ALLOW_PRIVATE_NETWORKS or WEBHOOK_ALLOWED_HOSTS"
        )
    return target


def check_webhook_url(url: str, settings: Settings) -> str:
    """Validate a webhook URL at save time; return it unchanged (stored as the admin wrote it)."""
    webhook_target(url, settings)
    return url


class PolicyResolver(AbstractResolver):
    """aiohttp resolver that refuses any resolved address the policy forbids (DNS rebinding included).

    Lookups go through aiodns (c-ares), not threads: one that hangs held one of asyncio's few default threads,
    so a team's agents on names whose DNS never answers could stall every lookup of every team."""

    def __init__(self, settings: Settings, inner: AbstractResolver | None = None) -> None:
        self.settings = settings
        self.inner = inner or AsyncResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.rstrip(".").lower() in BLOCKED_NAMES:
            raise WebhookPolicyError("webhook host is a cloud metadata service, which is never allowed")
        results = await self.inner.resolve(host, port, family)
        for result in results:
            check_address(ipaddress.ip_address(result["host"]), host=host.rstrip(".").lower(), settings=self.settings)
        return results

    async def close(self) -> None:
        await self.inner.close()
