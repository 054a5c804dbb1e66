"""Helpers shared by the auth, teams, users and rate-limit tests."""

from __future__ import annotations

import uuid
from http.cookies import SimpleCookie
from typing import Any

import httpx
from fastapi import FastAPI

from tests.factories import DEFAULT_PASSWORD


def https_client(app: FastAPI, client: tuple[str, int] = ("127.0.0.1", 50000)) -> httpx.AsyncClient:
    """Cookies are Secure by default, so cookie flows go over https://."""
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url="https://test")


async def login(
    client: httpx.AsyncClient,
    email: str,
    password: str = DEFAULT_PASSWORD,
    team_id: uuid.UUID | None = None,
    **kwargs: Any,
) -> httpx.Response:
    body: dict[str, Any] = {"email": email, "password": password}
    if team_id is not None:
        body["team_id"] = str(team_id)
    return await client.post("/api/auth/login", json=body, **kwargs)


def set_cookies(response: httpx.Response) -> dict[str, dict[str, str]]:
    """Every Set-Cookie of the response: name -> attributes (lower-case keys, plus 'value')."""
    cookies: dict[str, dict[str, str]] = {}
    for header in response.headers.get_list("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        for name, morsel in jar.items():
            attrs = {key: str(morsel[key]) for key in morsel if morsel[key]}
            attrs["value"] = morsel.value
            flags = {part.strip().lower() for part in header.split(";")}
            attrs["httponly"] = "true" if "httponly" in flags else ""
            attrs["secure"] = "true" if "secure" in flags else ""
            cookies[name] = attrs
    return cookies


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
