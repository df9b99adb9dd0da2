"""Live audit events as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from eep_controller.api.auth import reader
from eep_controller.errors import NotFound
from eep_controller.protocol import NAME_PATTERN, DeploymentSpec, Event
from eep_controller.store import PrefixWatch, Resync, WatchEvent
from eep_controller.tasks import cancel_and_wait

router = APIRouter(tags=["events"], dependencies=[Depends(reader)])

HEARTBEAT_S = 15.0


@router.get(
    "/v1/events",
    summary="Live event stream (text/event-stream); each event's id is its seq",
    description=(
        "Events as they are written. With `since` (or the `Last-Event-ID` header an "
        "EventSource sends when it reconnects, or the `lastEventId` query parameter that "
        "EventSource polyfills send instead) the stored events after that seq come first, "
        "oldest first, so a client that reconnects misses none still kept."
    ),
    response_class=StreamingResponse,
)
async def stream(
    request: Request,
    deployment: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="only this deployment's events")
    ] = None,
    since: Annotated[
        int | None, Query(ge=0, description="replay stored events after this seq")
    ] = None,
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
    last_event_id_param: Annotated[int | None, Query(alias="lastEventId", ge=0)] = None,
) -> StreamingResponse:
    store = request.app.state.ctx.store
    if deployment and await store.get(store.keys.spec(deployment), DeploymentSpec) is None:
        # as GET /v1/deployments/{d}/events answers: a typo must not wait silently for ever
        raise NotFound(f"no deployment named {deployment!r}", resource="deployment")
    prefix = store.keys.events(deployment) if deployment else store.keys.events_root()
    replay_after = next(
        (p for p in (since, last_event_id, last_event_id_param) if p is not None), None
    )
    # listed before the response starts (etcd down: a 503 problem, not a broken stream), so an
    # event written once a client has the response is always streamed to it
    listing = Resync(*await store.snapshot(prefix))

    async def frames() -> AsyncIterator[str]:
        # the watch streams changes after the listing, and lists again after a compaction;
        # events in a listing are sent only when newer (by etcd revision) than the last one
        # sent, so nothing is sent twice or skipped
        watch = PrefixWatch(store, prefix, resume_from=listing.revision)
        queue: asyncio.Queue[WatchEvent | Resync] = asyncio.Queue(maxsize=1000)

        async def pump() -> None:
            async for item in watch:
                await queue.put(item)

        task = asyncio.create_task(pump())
        try:
            yield ": eep event stream\n\n"
            for event in _replayed(listing, None, replay_after):
                yield _frame(event)
            sent_revision = listing.revision
            while not await request.is_disconnected():
                try:
                    item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(item, Resync):
                    for event in _replayed(item, sent_revision, replay_after):
                        yield _frame(event)
                    sent_revision = item.revision
                    continue
                if item.deleted or item.value is None or item.mod_revision <= sent_revision:
                    continue
                sent_revision = item.mod_revision
                live = _parsed(item.value)
                if live is not None:
                    yield _frame(live)
        finally:
            watch.close()
            await cancel_and_wait(task)

    return StreamingResponse(
        frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _parsed(raw: bytes) -> Event | None:
    try:
        return Event.model_validate_json(raw)
    except ValidationError:
        return None


def _replayed(listing: Resync, sent_revision: int | None, replay_after: int | None) -> list[Event]:
    """What a listing adds to the stream, oldest first: by seq (the time it was written in
    ns), across deployments too, so the last event a client got is the newest it was sent
    and resuming after it misses none. The first listing (`sent_revision` None) adds the
    events after seq `replay_after`, or none without it; a later one (after a compaction)
    adds those written after `sent_revision`."""
    if sent_revision is None and replay_after is None:
        return []
    out: list[tuple[int, str, Event]] = []
    for key, (raw, revision) in listing.snapshot.items():
        if sent_revision is not None and revision <= sent_revision:
            continue
        event = _parsed(raw)
        if event is None or (sent_revision is None and event.seq <= (replay_after or 0)):
            continue
        out.append((event.seq, key, event))
    return [event for _, _, event in sorted(out, key=lambda item: item[:2])]


def _frame(event: Event) -> str:
    payload = json.dumps(event.model_dump(mode="json"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {payload}\n\n"
