"""GET /api/error-logs: admins only, their own team, newest first, paginated with X-Total-Count."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.db import utcnow
from app.models import ErrorLog, Team
from tests.factories import auth_headers, create_admin, create_team, create_user


async def add_rows(session: AsyncSession, team: Team, count: int, *, code: str = "upstream_error") -> list[ErrorLog]:
    now = utcnow()
    rows = [
        ErrorLog(
            team_id=team.id,
            code=code,
            message=f"failure {i}",
            upstream_status=500,
            detail={"n8n_message": "Error in workflow"},
            created_at=now - timedelta(minutes=count - i),
        )
        for i in range(count)
    ]
    session.add_all(rows)
    await session.commit()
    return rows


async def test_read_error_logs_newest_first_with_total(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    await add_rows(session, team, 3)
    response = await client.get("/api/error-logs", headers=auth_headers(settings, admin))
    assert response.status_code == 200
    assert response.headers["X-Total-Count"] == "3"
    body = response.json()
    assert [row["message"] for row in body] == ["failure 2", "failure 1", "failure 0"]
    assert set(body[0]) == {"id", "code", "message", "upstream_status", "chat_id", "agent_id", "user_id", "created_at"}
    assert "detail" not in response.text
    assert "Error in workflow" not in response.text


async def test_read_error_logs_paginates(client: httpx.AsyncClient, session: AsyncSession, settings: Settings) -> None:
    team = await create_team(session)
    admin = await create_admin(session, team=team)
    await add_rows(session, team, 5)
    headers = auth_headers(settings, admin)
    page = await client.get("/api/error-logs", params={"limit": 2, "offset": 1}, headers=headers)
    assert page.headers["X-Total-Count"] == "5"
    assert [row["message"] for row in page.json()] == ["failure 3", "failure 2"]
    past_end = await client.get("/api/error-logs", params={"offset": 10}, headers=headers)
    assert past_end.json() == []
    assert past_end.headers["X-Total-Count"] == "5"


async def test_read_error_logs_only_own_team(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team, other = await create_team(session), await create_team(session)
    admin = await create_admin(session, team=team)
    await add_rows(session, other, 2)
    response = await client.get("/api/error-logs", headers=auth_headers(settings, admin))
    assert response.json() == []
    assert response.headers["X-Total-Count"] == "0"


async def test_read_error_logs_as_member_is_403(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    team = await create_team(session)
    member = await create_user(session, team=team)
    await add_rows(session, team, 1)
    response = await client.get("/api/error-logs", headers=auth_headers(settings, member))
    assert response.status_code == 403
    assert "failure" not in response.text


async def test_read_error_logs_without_auth_is_401(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/error-logs")).status_code == 401


async def test_read_error_logs_bad_paging_is_422(
    client: httpx.AsyncClient, session: AsyncSession, settings: Settings
) -> None:
    admin = await create_admin(session)
    headers = auth_headers(settings, admin)
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}):
        assert (await client.get("/api/error-logs", params=params, headers=headers)).status_code == 422
    assert (await client.get("/api/error-logs", params={"limit": 100}, headers=headers)).status_code == 200


async def test_record_error_drops_secret_keys_and_missing_ids(session: AsyncSession) -> None:
    import uuid

    from sqlalchemy import select

    from app.services.error_logs import record_error

    team = await create_team(session)
    user = await create_user(session, team=team)
    await record_error(
        session=session,
        team_id=team.id,
        user_id=user.id,
        chat_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        code="upstream_error",
        message="m",
        upstream_status=None,
        detail={"reason": "r", "Authorization": "Bearer x", "webhook_headers": {"k": "v"}, "api_key": "k"},
    )
    await session.commit()
    row = (await session.execute(select(ErrorLog))).scalar_one()
    assert row.detail == {"reason": "r"}
    assert (row.user_id, row.chat_id, row.agent_id) == (user.id, None, None)
