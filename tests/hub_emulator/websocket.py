"""MQTT over WebSocket on port 443 at `/$iothub/websocket`, what the SDK uses with `websockets=True`.

Each binary WebSocket message is fed into a StreamReader, so the broker reads the same byte stream as on 8883.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiohttp import WSMsgType, web

from tests.hub_emulator.broker import MAX_PACKET_BYTES, Broker

PATH = "/$iothub/websocket"
OUTBOUND_FRAMES = 1000
"""Frames queued towards a client; a client that lets more pile up is cut off."""


class WebSocketLink:
    transport = "wss"

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self._transport = request.transport
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue(OUTBOUND_FRAMES)
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._out.put_nowait(data)
        except asyncio.QueueFull:
            self.abort()

    async def drain(self) -> None:
        await self._out.join()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._out.put(None)

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        # Unblock drain() and the pump: nothing queued will be sent any more.
        while not self._out.empty():
            self._out.get_nowait()
            self._out.task_done()
        self._out.put_nowait(None)

    async def pump(self) -> None:
        while True:
            frame = await self._out.get()
            try:
                if frame is None:
                    await self._ws.close()
                    return
                await self._ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):
                # The peer went away mid-send; the reader side notices the close and ends the session.
                return
            finally:
                self._out.task_done()


async def serve(broker: Broker, sock: socket.socket, ssl_context: ssl.SSLContext) -> web.AppRunner:
    async def handle(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("mqtt",), max_msg_size=MAX_PACKET_BYTES, autoping=True)
        await ws.prepare(request)
        link = WebSocketLink(ws, request)
        reader = asyncio.StreamReader(limit=MAX_PACKET_BYTES)
        async with asyncio.TaskGroup() as group:
            group.create_task(link.pump(), name=f"hub.ws[{link.peer}].pump")
            session = group.create_task(broker.serve(reader, link), name=f"hub.ws[{link.peer}].session")
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    reader.feed_data(msg.data)
                else:
                    break
            reader.feed_eof()
            # wait(), not await: a session cancelled by Broker.close() is not our own cancellation.
            await asyncio.wait([session])
            await link.close()
        return ws

    app = web.Application()
    app.router.add_get(PATH, handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    return runner
