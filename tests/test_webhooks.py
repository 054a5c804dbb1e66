"""The SSRF policy for webhook URLs: one test per spelling, at save time and at send time (check and resolver)."""

# ruff: noqa: RUF001  # look-alike Unicode characters are what these tests are about

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from yarl import URL

from app.config import Settings
from app.crypto import DecryptionError, decrypt_headers, encrypt_headers, key_ring
from app.models import ErrorLog
from app.state import app_state
from app.webhooks import PolicyResolver, WebhookPolicyError, check_webhook_url, webhook_target
from tests.conftest import count_rows, make_settings
from tests.factories import auth_headers, branch_of, create_admin, create_agent, create_team
from tests.live import chat_with_agent, data_events, parse_sse
from tools.fake_n8n import FakeN8n

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
    "http://[64:ff9b:1::a9fe:a9fe]/",
    "http://[::ffff:0:a9fe:a9fe]/",
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
    "http://[::ffff:0:7f00:1]/webhook/x",
    "http://[64:ff9b:1::a00:1]/webhook/x",
    "http://[64:ff9b:1:7f00:0:100:808:808]/webhook/x",  # 127.0.0.1 behind a /48 local-use NAT64 prefix
    "http://[fec0::1]/webhook/x",  # site-local: deprecated, still routed inside some networks
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
    # Names no resolver takes (a typo's double dot, a label over 63 or a name over 253 characters): a 422 at
    # save, not an agent whose every message ends upstream_unreachable.
    "http://n8n..example.com/webhook/x",
    "http://.n8n.example.com/webhook/x",
    "http://" + "a" * 64 + ".example.com/webhook/x",
    "http://" + ("a" * 63 + ".") * 4 + "com/webhook/x",
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
        self,
        host: str,
        port: int = 0,
        family: socket.AddressFamily = socket.AF_INET,  # noqa: ARG002 - aiohttp passes it by name
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

    key = key_ring(Fernet.generate_key().decode())
    token = encrypt_headers({"X-N8N-Auth": "s3cret-value"}, key)
    assert token is not None
    assert "s3cret-value" not in token
    assert decrypt_headers(token, key) == {"X-N8N-Auth": "s3cret-value"}
    assert encrypt_headers({}, key) is None
    assert decrypt_headers(None, key) == {}
    with pytest.raises(DecryptionError):
        decrypt_headers(token, key_ring(Fernet.generate_key().decode()))


# --- Unicode hosts: judged as yarl (the URL library aiohttp connects with) folds them ----------------
# Each spelling below is folded by yarl's IDNA/UTS46 step to the target next to it (checked by the first test),
# so aiohttp really connects there. Of the Unicode dots, yarl folds exactly U+3002, U+FF0E, U+FF61, U+FE52
# and U+2024; others (U+1801, U+2E3C, U+00B7...) stay part of a label and become an ordinary xn-- name.
FOLDED_LOOPBACK = {
    "http://１２７.０.０.１:5679/x": "127.0.0.1",  # full-width digits
    "http://127。0。0。1/x": "127.0.0.1",  # U+3002 ideographic full stop
    "http://127．0．0．1/x": "127.0.0.1",  # U+FF0E full-width full stop
    "http://127｡0｡0｡1/x": "127.0.0.1",  # U+FF61 halfwidth ideographic full stop
    "http://127﹒0﹒0﹒1/x": "127.0.0.1",  # U+FE52 small full stop
    "http://127․0․0․1/x": "127.0.0.1",  # U+2024 one dot leader
    "http://1２7。0.0．1/x": "127.0.0.1",  # mixed ASCII, full-width and ideographic
    "http://①②⑦.0.0.1/x": "127.0.0.1",  # circled digits
    "http://𝟏𝟐𝟕.0.0.1/x": "127.0.0.1",  # mathematical bold digits
    "http://１２７.０.０.１。/x": "127.0.0.1.",  # trailing ideographic dot
    "http://２１３０７０６４３３/x": "2130706433",  # decimal spelling, full-width
    "http://０ｘ７ｆ０００００１/x": "0x7f000001",  # hex spelling, full-width
    "http://[::ｆｆｆｆ:127.0.0.1]/x": "::ffff:127.0.0.1",  # IPv4-mapped IPv6, full-width hex
    "http://ｌｏｃａｌｈｏｓｔ/x": "localhost",  # full-width letters
    "http://ＬＯＣＡＬhost。/x": "localhost.",  # mixed widths and cases
    "http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/x": "localhost",  # circled letters
    "http://ｎ８ｎ.localhost/x": "n8n.localhost",
    "http://１０。０。０。５/x": "10.0.0.5",
}
FOLDED_METADATA = {
    "http://１６９.２５４.１６９.２５４/latest/meta-data/": "169.254.169.254",
    "http://169。254。169。254/": "169.254.169.254",
    "http://169．254．169．254/": "169.254.169.254",
    "http://169｡254｡169｡254/": "169.254.169.254",
    "http://169﹒254﹒169﹒254/": "169.254.169.254",
    "http://16９。２54.169﹒254/": "169.254.169.254",
    "http://[::ｆｆｆｆ:169.254.169.254]/": "::ffff:169.254.169.254",
    "http://１００。１００。１００。２００/": "100.100.100.200",
    "http://０。０。０。０/": "0.0.0.0",
    "http://metadata。google。internal/computeMetadata/v1/": "metadata.google.internal",
    "http://ｍｅｔａｄａｔａ.ｇｏｏｇｌｅ.ｉｎｔｅｒｎａｌ/": "metadata.google.internal",
    "http://metadata｡goog/": "metadata.goog",
    "http://ｍｅｔａｄａｔａ/": "metadata",
    "http://instance-data﹒ec2․internal/": "instance-data.ec2.internal",
}
#: yarl cannot parse or IDNA-encode these (or the host it gives is no host name): refused, never a crash.
UNPARSEABLE = [
    "http://xn--/x",
    "http://a\u200b.example/x",
    "http://loc\u00adalhost/x",
    "http://\u202e127.0.0.1/x",
    "http://127.0.0.1：5679/x",
    "http://evil.example／@127.0.0.1/x",
    "http://[fe80::1%25ｅｔｈ0]/x",
    "http://a%00b.example/x",
    "http://%31%32%37.0.0.1/x",
    "http://127.0.0.1:９９９９９/x",
]
IDN_ACCEPTED = [
    "http://bücher.example/",
    "http://xn--bcher-kva.example/webhook/x",
    "https://ＥＸＡＭＰＬＥ.com/webhook",
]


@pytest.mark.parametrize(("url", "host"), [*FOLDED_LOOPBACK.items(), *FOLDED_METADATA.items()])
def test_yarl_folds_each_spelling_to_its_target(url: str, host: str) -> None:
    """The lists above are real: this is the host aiohttp connects to (no resolver call for IP literals)."""
    assert URL(url).raw_host == host


@pytest.mark.parametrize("url", FOLDED_LOOPBACK)
def test_unicode_loopback_refused_by_default(url: str, strict: Settings) -> None:
    with pytest.raises(WebhookPolicyError, match="private or loopback"):
        check_webhook_url(url, strict)


@pytest.mark.parametrize("url", FOLDED_LOOPBACK)
def test_unicode_loopback_allowed_when_enabled(url: str, permissive: Settings) -> None:
    assert check_webhook_url(url, permissive) == url


@pytest.mark.parametrize("url", FOLDED_METADATA)
def test_unicode_metadata_always_refused(url: str, permissive: Settings) -> None:
    with pytest.raises(WebhookPolicyError, match="metadata"):
        check_webhook_url(url, permissive)


@pytest.mark.parametrize("url", UNPARSEABLE)
def test_url_yarl_cannot_use_is_refused(url: str, permissive: Settings) -> None:
    with pytest.raises(WebhookPolicyError, match=r"not a valid URL|invalid host|invalid port|invisible"):
        check_webhook_url(url, permissive)


@pytest.mark.parametrize("url", IDN_ACCEPTED)
def test_idn_host_accepted(url: str, strict: Settings) -> None:
    assert check_webhook_url(url, strict) == url


def test_listed_host_matches_its_folded_spelling(tmp_path: Path) -> None:
    settings = make_settings(
        "sqlite+aiosqlite://", tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False, WEBHOOK_ALLOWED_HOSTS=["10.0.0.5"]
    )
    assert check_webhook_url("http://１０。０。０。５/x", settings)
    with pytest.raises(WebhookPolicyError, match="private"):
        check_webhook_url("http://１０。０。０。６/x", settings)


async def test_resolver_matches_a_listed_host_in_its_unicode_spelling(tmp_path: Path) -> None:
    """aiohttp resolves the xn-- form; an admin may have listed the name as it reads."""
    settings = make_settings(
        "sqlite+aiosqlite://", tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False, WEBHOOK_ALLOWED_HOSTS=["bücher.internal"]
    )
    resolved = await PolicyResolver(settings, FixedResolver("10.1.2.3")).resolve("xn--bcher-kva.internal", 80)
    assert resolved[0]["host"] == "10.1.2.3"
    with pytest.raises(WebhookPolicyError, match="private"):
        await PolicyResolver(settings, FixedResolver("10.1.2.3")).resolve("xn--bcher-kvb.internal", 80)
    assert check_webhook_url("http://BÜCHER.internal/webhook/x", settings)


def test_webhook_target_is_the_url_aiohttp_connects_to(strict: Settings) -> None:
    target = webhook_target("https://ＥＸＡＭＰＬＥ。com/webhook/x?a=1", strict)
    assert isinstance(target, URL)
    assert target.raw_host == "example.com"
    assert str(target) == "https://example.com/webhook/x?a=1"


# --- the same spellings through the API: refused at save time, refused at send time ------------------


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """The app fixtures of this module run with the default policy: no private networks."""
    return make_settings(database_url, tmp_path, WEBHOOK_ALLOW_PRIVATE_NETWORKS=False, N8N_CONNECT_TIMEOUT=0.5)


SAVE_REFUSED = [
    ("http://１２７.０.０.１:5679/x", "private or loopback"),
    ("http://127。0。0。1/x", "private or loopback"),
    ("http://127．0．0．1/x", "private or loopback"),
    ("http://127｡0｡0｡1/x", "private or loopback"),
    ("http://127﹒0﹒0﹒1/x", "private or loopback"),
    ("http://1２7。0.0．1/x", "private or loopback"),
    ("http://ｌｏｃａｌｈｏｓｔ:5678/x", "private or loopback"),
    ("http://１６９.２５４.１６９.２５４/latest/meta-data/", "link-local"),
    ("http://169。254。169。254/", "link-local"),
    ("http://169﹒254﹒169﹒254/", "link-local"),
    ("http://metadata。google。internal/", "metadata"),
    ("http://ｍｅｔａｄａｔａ.ｇｏｏｇｌｅ.ｉｎｔｅｒｎａｌ/", "metadata"),
    ("http://xn--/x", "not a valid URL"),
    ("http://127.0.0.1：5679/x", "not a valid URL"),
]


@pytest.mark.parametrize(("url", "reason"), SAVE_REFUSED)
async def test_create_agent_with_unicode_host_is_422_and_stores_nothing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, url: str, reason: str
) -> None:
    admin = await create_admin(session)
    response = await client.post(
        "/api/agents", json={"name": "Sneaky", "webhook_url": url}, headers=auth_headers(settings, admin)
    )
    assert response.status_code == 422
    assert reason in response.json()["detail"][0]["msg"]
    assert await count_rows(session, "agents") == 0


@pytest.mark.parametrize(("url", "reason"), SAVE_REFUSED)
async def test_update_agent_with_unicode_host_is_422_and_changes_nothing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, url: str, reason: str
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    agent = await create_agent(session, team=team, webhook_url="https://n8n.example.com/webhook/x")
    response = await client.put(
        f"/api/agents/{agent.id}", json={"webhook_url": url}, headers=auth_headers(settings, admin)
    )
    assert response.status_code == 422
    assert reason in response.json()["detail"][0]["msg"]
    await session.refresh(agent)
    assert agent.webhook_url == "https://n8n.example.com/webhook/x"


#: Characters that cannot be seen (or read) in the admin page, which yarl percent-encodes into the request
#: path: a URL pasted with a trailing no-break space looks right and 404s at n8n on every message. And an IPv6
#: zone id names an interface of this server, meaningful for link-local addresses only (always refused).
UNSEEN_OR_ZONED = [
    ("https://n8n.example.com/webhook/x\u00a0", "whitespace"),
    ("https://n8n.example.com/webhook/x\u2028", "whitespace"),
    ("https://n8n.example.com/webhook/x\u3000", "whitespace"),
    ("https://n8n.example.com/webhook/x\u200b", "invisible"),
    ("https://n8n.example.com/webhook/x\ufeff", "invisible"),
    ("https://n8n.example.com/web\u202ehook/x", "invisible"),
    ("https://n8n.example.com/webhook/x\x0b", "control"),
    ("https://n8n.example.com/webhook/x\x1b", "control"),
    ("https://n8n.example.com/webhook/x\x7f", "control"),
    ("https://n8n.example.com/webhook/x?q=\x85", "control"),
    ("http://[2606:4700:4700::1111%25eth0]/webhook/x", "zone"),
    ("http://[2606:4700:4700::1111%eth0]/webhook/x", "zone"),
]


@pytest.mark.parametrize(("url", "reason"), UNSEEN_OR_ZONED)
async def test_unseen_characters_and_zone_ids_in_the_url_are_422_and_change_nothing(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, url: str, reason: str
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    agent = await create_agent(session, team=team, webhook_url="https://n8n.example.com/webhook/x")
    created = await client.post(
        "/api/agents", json={"name": "Pasted", "webhook_url": url}, headers=auth_headers(settings, admin)
    )
    assert created.status_code == 422
    assert reason in created.json()["detail"][0]["msg"]
    updated = await client.put(
        f"/api/agents/{agent.id}", json={"webhook_url": url}, headers=auth_headers(settings, admin)
    )
    assert updated.status_code == 422
    assert reason in updated.json()["detail"][0]["msg"]
    assert await count_rows(session, "agents") == 1
    await session.refresh(agent)
    assert agent.webhook_url == "https://n8n.example.com/webhook/x"


@pytest.mark.parametrize("url", IDN_ACCEPTED)
async def test_create_agent_with_idn_host_is_accepted(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings, url: str
) -> None:
    admin = await create_admin(session)
    response = await client.post(
        "/api/agents", json={"name": "Books", "webhook_url": url}, headers=auth_headers(settings, admin)
    )
    assert response.status_code == 201
    assert response.json()["webhook_url"] == url


SEND_REFUSED = [
    "http://１２７.０.０.１:{port}/webhook/agent-stream",
    "http://127。0。0。1:{port}/webhook/agent-stream",
    "http://127．0．0．1:{port}/webhook/agent-stream",
    "http://127｡0｡0｡1:{port}/webhook/agent-stream",
    "http://127﹒0﹒0﹒1:{port}/webhook/agent-stream",
    "http://127․0․0․1:{port}/webhook/agent-stream",
    "http://1２7。0.0．1:{port}/webhook/agent-stream",
    "http://[::ｆｆｆｆ:127.0.0.1]:{port}/webhook/agent-stream",
    "http://ｌｏｃａｌｈｏｓｔ:{port}/webhook/agent-stream",
    "http://１６９.２５４.１６９.２５４:{port}/latest/meta-data/",
    "http://169。254。169。254:{port}/latest/meta-data/",
    "http://metadata。google。internal:{port}/computeMetadata/v1/",
    "http://xn--:{port}/webhook/agent-stream",
]


@pytest.mark.parametrize("url", SEND_REFUSED)
async def test_send_to_stored_unicode_host_is_refused_before_connecting(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession, settings: Settings, fake: FakeN8n, url: str
) -> None:
    """An agent saved before the fix (inserted directly): the message never reaches the listening server."""
    setup = await chat_with_agent(session, settings, url.format(port=fake.port))
    response = await client.post(f"/api/chats/{setup.chat.id}/messages", json={"content": "hi"}, headers=setup.headers)
    assert response.status_code == 200
    last = data_events(parse_sse(response.text))[-1].data
    assert last is not None
    assert last["type"] == "error"
    assert last["data"]["code"] == "upstream_blocked"
    assert fake.requests == []
    async with app_state(app).db.sessionmaker() as s:
        messages = await branch_of(s, setup.chat.id)
        codes = list((await s.execute(select(ErrorLog.code))).scalars())
    assert messages[-1]["role"] == "assistant"
    assert messages[-1]["status"] == "error"
    assert codes == ["upstream_blocked"]
