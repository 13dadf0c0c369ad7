"""What stands between the viewer and a client that would exhaust it: bounded request bodies, a
deadline for request headers, a cap on open connections — and ``serve``, which runs the app under
uvicorn with them.

* ``BodyLimit`` (ASGI middleware) answers 413 for a declared ``Content-Length`` over the endpoint's
  limit before reading anything, and cuts a body off *while it streams* (chunked uploads included)
  as soon as it passes the limit: nothing larger than the limit is ever held or spooled to disk.
* ``GuardedHttp`` (uvicorn's h11 protocol) closes a connection whose request headers have not arrived
  within ``header_timeout`` seconds (a slow-header, "slowloris" client) and refuses connections beyond
  ``max_connections``, so half-sent connections cannot use up the process's file descriptors.
"""
from __future__ import annotations

import resource
from collections.abc import Callable

from ..extras import require

JSON_BODY_LIMIT = 64 * 1024  # every endpoint but the upload takes small JSON or form bodies
MULTIPART_OVERHEAD = 64 * 1024  # the form fields and boundaries around an upload


class BodyLimit:
    """ASGI middleware: at most ``limit_for(path)`` bytes of request body; 413 otherwise."""

    def __init__(self, app, limit_for: Callable[[str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(send, limit)
            return
        received, too_large, refused = 0, False, False

        async def limited_receive():
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # stop reading: the app sees a client that went away
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            nonlocal refused
            if not too_large:
                await send(message)
            elif not refused:  # whatever the app answers to the cut-off body, the client gets 413
                refused = True
                await self._refuse(send, limit)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not refused:
            await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = b'{"detail":"request body larger than %d bytes"}' % limit
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def guarded_protocol(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol with a header deadline and a cap on open connections (see the module)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedHttp(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._awaited = None
            if len(self.connections) > max_connections:
                transport.close()  # full: refuse at once rather than run out of file descriptors
                return
            self._expect_headers()

        def _expect_headers(self) -> None:
            self._awaited = self.cycle  # headers are complete once a new request cycle begins
            self._deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is self._awaited and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._awaited and self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._expect_headers()  # a kept-alive connection owes the next request's headers in time

        def connection_lost(self, exc) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return GuardedHttp


def file_descriptor_budget() -> int:
    """Raise this process's open-file limit to its hard limit; return how many connections to allow
    (the limit less a margin for the model's, the store's and the uploads' files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(16, min(soft if soft != resource.RLIM_INFINITY else 65536, 65536) - 256)


def serve(app, host: str, port: int, header_timeout: float = 10.0, max_connections: int | None = None) -> None:
    """Run the viewer under uvicorn with the guards above (blocks until stopped)."""
    uvicorn = require("uvicorn", "viewer")
    connections = min(max_connections or file_descriptor_budget(), file_descriptor_budget())
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=guarded_protocol(header_timeout,
                                                                                                    connections),
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024)
    uvicorn.Server(config).run()
