"""Live audit events as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from eep_controller.api.auth import reader
from eep_controller.protocol import Event
from eep_controller.store import PrefixWatch, WatchEvent
from eep_controller.tasks import cancel_and_wait

router = APIRouter(tags=["events"], dependencies=[Depends(reader)])

HEARTBEAT_S = 15.0


@router.get(
    "/v1/events",
    summary="Live event stream (text/event-stream); each event's id is its seq",
    response_class=StreamingResponse,
)
async def stream(
    request: Request,
    deployment: Annotated[str | None, Query(max_length=63)] = None,
) -> StreamingResponse:
    store = request.app.state.ctx.store
    prefix = store.keys.events(deployment) if deployment else store.keys.events_root()
    start = await store.revision()

    async def frames() -> AsyncIterator[str]:
        watch = PrefixWatch(store, prefix, resume_from=start)
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue(maxsize=1000)

        async def pump() -> None:
            async for ev in watch:
                if isinstance(ev, WatchEvent) and not ev.deleted:
                    await queue.put(ev)

        task = asyncio.create_task(pump())
        try:
            yield ": eep event stream\n\n"
            while not await request.is_disconnected():
                try:
                    ev = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if ev is None or ev.value is None:
                    continue
                try:
                    event = Event.model_validate_json(ev.value)
                except ValidationError:
                    continue
                payload = json.dumps(event.model_dump(mode="json"))
                yield f"id: {event.seq}\nevent: {event.type}\ndata: {payload}\n\n"
        finally:
            watch.close()
            await cancel_and_wait(task)

    return StreamingResponse(
        frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
