"""The SSRF policy for webhook URLs: one test per spelling, at save time and at send time (resolver)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from app.config import Settings
from app.crypto import DecryptionError, decrypt_headers, encrypt_headers
from app.webhooks import PolicyResolver, WebhookPolicyError, check_webhook_url
from tests.conftest import make_settings

ALWAYS_BLOCKED = [
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.0.1/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fd00:ec2::254]/",
    "http://100.100.100.200/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://2852039166/",
    "http://0xa9fea9fe/",
    "http://0xA9.0xFE.0xA9.0xFE/",
    "http://0251.0376.0251.0376/",
    "http://169.254.43518/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://0.0.0.0/",
    "http://0/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://169.254.169.254./",
]
PRIVATE = [
    "http://127.0.0.1:5678/webhook/x",
    "http://localhost:5678/webhook/x",
    "http://n8n.localhost/webhook/x",
    "http://[::1]/webhook/x",
    "http://10.0.0.5/webhook/x",
    "http://172.16.3.4/webhook/x",
    "http://192.168.1.10/webhook/x",
    "http://100.64.0.1/webhook/x",
    "http://[fd12:3456::1]/webhook/x",
    "http://2130706433/webhook/x",
    "http://0x7f000001/webhook/x",
    "http://0177.0.0.1/webhook/x",
    "http://127.1/webhook/x",
    "http://[::ffff:127.0.0.1]/webhook/x",
    "http://[::ffff:10.0.0.1]/webhook/x",
]
MALFORMED = [
    "ftp://n8n.example.com/webhook/x",
    "file:///etc/passwd",
    "gopher://n8n.example.com/",
    "http://user:pass@n8n.example.com/webhook/x",
    "http://user@n8n.example.com/webhook/x",
    "http:///webhook/x",
    "http://n8n.example.com:99999/webhook/x",
    "http://n8n.example.com/web hook",
    "http://n8n.example.com/webhook\r\nX-Injected: 1",
    "https://n8n.example.com/" + "a" * 2100,
    "n8n.example.com/webhook/x",
]


@pytest.fixture
def strict(tmp_path: Path) -> Settings:
    return make_settings("sqlite+aiosqlite://", tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False)


@pytest.fixture
def permissive(tmp_path: Path) -> Settings:
    return make_settings("sqlite+aiosqlite://", tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=True)


@pytest.mark.parametrize("url", ALWAYS_BLOCKED)
def test_link_local_and_metadata_always_refused(url: str, permissive: Settings) -> None:
    with pytest.raises(WebhookPolicyError):
        check_webhook_url(url, permissive)


@pytest.mark.parametrize("url", ALWAYS_BLOCKED)
def test_link_local_refused_even_for_allowed_hosts(url: str, tmp_path: Path) -> None:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    settings = make_settings("sqlite+aiosqlite://", tmp_path, WEBHOOK_ALLOWED_HOSTS=[host])
    with pytest.raises(WebhookPolicyError):
        check_webhook_url(url, settings)


@pytest.mark.parametrize("url", PRIVATE)
def test_private_refused_by_default(url: str, strict: Settings) -> None:
    with pytest.raises(WebhookPolicyError, match="private or loopback"):
        check_webhook_url(url, strict)


@pytest.mark.parametrize("url", PRIVATE)
def test_private_allowed_when_enabled(url: str, permissive: Settings) -> None:
    assert check_webhook_url(url, permissive) == url


def test_private_allowed_for_listed_host(tmp_path: Path) -> None:
    settings = make_settings(
        "sqlite+aiosqlite://", tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False, WEBHOOK_ALLOWED_HOSTS=["10.0.0.5"]
    )
    assert check_webhook_url("http://10.0.0.5/webhook/x", settings)
    with pytest.raises(WebhookPolicyError):
        check_webhook_url("http://10.0.0.6/webhook/x", settings)


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_refused(url: str, permissive: Settings) -> None:
    with pytest.raises(WebhookPolicyError):
        check_webhook_url(url, permissive)


@pytest.mark.parametrize(
    "url", ["https://n8n.example.com/webhook/abc", "http://n8n.example.com:5678/webhook/abc?x=1", "https://8.8.8.8/"]
)
def test_public_urls_accepted(url: str, strict: Settings) -> None:
    assert check_webhook_url(url, strict) == url


class FixedResolver(AbstractResolver):
    """Pretends DNS answers `address` for every name (a name that now resolves elsewhere)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [ResolveResult(hostname=host, host=self.address, port=port, family=fam, proto=0, flags=0)]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("address", ["169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "100.100.100.200"])
async def test_resolver_refuses_names_that_resolve_to_metadata(address: str, permissive: Settings) -> None:
    resolver = PolicyResolver(permissive, FixedResolver(address))
    with pytest.raises(WebhookPolicyError):
        await resolver.resolve("n8n.example.com", 443)


async def test_resolver_refuses_private_resolution_when_strict(strict: Settings) -> None:
    resolver = PolicyResolver(strict, FixedResolver("10.1.2.3"))
    with pytest.raises(WebhookPolicyError, match="private"):
        await resolver.resolve("n8n.example.com", 443)


async def test_resolver_passes_allowed_addresses(strict: Settings, permissive: Settings) -> None:
    public = await PolicyResolver(strict, FixedResolver("93.184.216.34")).resolve("n8n.example.com", 443)
    assert public[0]["host"] == "93.184.216.34"
    private = await PolicyResolver(permissive, FixedResolver("10.1.2.3")).resolve("n8n.internal", 443)
    assert private[0]["host"] == "10.1.2.3"


async def test_resolver_refuses_metadata_name(permissive: Settings) -> None:
    with pytest.raises(WebhookPolicyError):
        await PolicyResolver(permissive, FixedResolver("8.8.8.8")).resolve("metadata.google.internal", 80)


def test_headers_roundtrip_and_ciphertext_hides_them() -> None:
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    token = encrypt_headers({"X-N8N-Auth": "s3cret-value"}, key)
    assert token is not None
    assert "s3cret-value" not in token
    assert decrypt_headers(token, key) == {"X-N8N-Auth": "s3cret-value"}
    assert encrypt_headers({}, key) is None
    assert decrypt_headers(None, key) == {}
    with pytest.raises(DecryptionError):
        decrypt_headers(token, Fernet.generate_key().decode())
