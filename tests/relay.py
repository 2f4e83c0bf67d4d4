"""A TCP relay for tests: forwards 127.0.0.1 connections to a target port, and can hold a response part-way, so that
a test can cut a real download (TLS passes through untouched) in its middle."""

from __future__ import annotations

import socket
import threading
import time


class Relay:
    """Listens on ``port`` (127.0.0.1) and forwards each connection to ``target_port``, the target-to-client
    direction in ``chunk``-byte pieces. While ``hold_after`` is set, a connection that has carried that many bytes
    to its client stops forwarding (the client waits mid-response) and ``held`` is set; ``cut()`` then drops the
    held connections without forwarding what the target sent after the hold (as a dying network would) and
    stops holding."""

    def __init__(self, port: int, target_port: int, chunk: int = 4096) -> None:
        self.target_port, self.chunk = target_port, chunk
        self.hold_after: int | None = None
        self.held = threading.Event()
        self._cut = False
        self._srv = socket.create_server(("127.0.0.1", port))
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while not self._closed.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        sent = 0
        try:
            while True:
                while to_client and self.hold_after is not None and sent >= self.hold_after:
                    self.held.set()
                    if self._cut:
                        return  # the finally drops both sides
                    time.sleep(0.05)
                data = src.recv(self.chunk)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> None:
        """Drop every held connection and stop holding."""
        self._cut = True
        time.sleep(0.2)  # the held pipes poll every 0.05 s
        self.hold_after, self._cut = None, False

    def close(self) -> None:
        self._closed.set()
        self._srv.close()
