"""A TLS front for the embedded PostgreSQL, which is built without SSL and listens on a Unix socket.

`TlsFront(socket_path, certificate, key)` listens on 127.0.0.1 (a free port) and speaks the start
of PostgreSQL's protocol as a server that requires TLS does:

- an SSLRequest (8 bytes: length 8, code 80877103) is answered 'S', the TLS handshake follows, and
  from then on the decrypted bytes go to and from the server's socket unchanged;
- a GSSENCRequest is answered 'N' (no GSSAPI encryption), and the client goes on;
- a plain StartupMessage is refused with the ErrorResponse a server whose pg_hba.conf has only
  `hostssl` lines sends (FATAL 28000, `no pg_hba.conf entry for host ..., no encryption`).

With `tls=False` it is a server without SSL support instead: the SSLRequest is answered 'N' and
the plain StartupMessage that follows is passed through.

`certificates(directory)` makes, for a test run, with Debian's `openssl`: a CA, a server
certificate it signs for localhost and 127.0.0.1, one it signs for another host, and a second CA
that signed neither.
"""
import asyncio
import ssl
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
PIPE_BYTES = 65536


@dataclass(frozen=True)
class Certificates:
    ca: Path  # signed server and other_host
    other_ca: Path  # signed nothing the fronts present
    server: tuple  # (certificate, key) for localhost and 127.0.0.1
    other_host: tuple  # (certificate, key) for db.example.net only


def certificates(directory):
    """The Certificates of a test run, written into `directory`."""
    directory = Path(directory)
    ca, other_ca = _ca(directory, "ca"), _ca(directory, "other-ca")
    server = _signed(directory, "server", ca, "DNS:localhost,IP:127.0.0.1")
    other_host = _signed(directory, "other-host", ca, "DNS:db.example.net")
    return Certificates(ca=ca[0], other_ca=other_ca[0], server=server, other_host=other_host)


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(directory, name):
    certificate, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN=Test {name}", "-keyout", str(key), "-out", str(certificate))
    return certificate, key


def _signed(directory, name, ca, names):
    certificate, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN={names.split(',')[0].split(':')[1]}", "-addext", f"subjectAltName={names}",
             "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-keyout", str(key), "-out", str(certificate))
    return certificate, key


class TlsFront:
    """The front (module docstring), served by an asyncio loop in a thread of its own; `port` once
    started. Use it as a context manager."""

    def __init__(self, socket_path, certificate=None, key=None, tls=True):
        self.socket_path, self.tls = str(socket_path), tls
        self.context = None
        if tls:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(certificate, key)
        self.port = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front", daemon=True)

    def __enter__(self):
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc):
        async def close():
            self._server.close()
            connections = asyncio.all_tasks() - {asyncio.current_task()}
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        return False

    async def _serve(self, reader, writer):
        try:
            first = await self._negotiate(reader, writer)
            if first is not None:
                await self._forward(reader, writer, first)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away or refused our certificate: its side of the story is the test's
        except asyncio.CancelledError:
            pass  # the front is closing
        finally:
            writer.close()

    async def _negotiate(self, reader, writer):
        """Answer the client's requests until the connection is ready to forward: the bytes to send the
        server first (a plain StartupMessage passed through), or None when the client was refused."""
        while True:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if length == 8 and code == GSSENC_REQUEST:
                writer.write(b"N")
            elif length == 8 and code == SSL_REQUEST:
                writer.write(b"S" if self.tls else b"N")
                await writer.drain()
                if self.tls:
                    await writer.start_tls(self.context)
                    return b""
            elif self.tls:  # a plain StartupMessage, where TLS is required
                startup = _parameters(await reader.readexactly(length - 8))
                writer.write(no_encryption_error(startup.get("user", ""), startup.get("database", "")))
                await writer.drain()
                return None
            else:
                return struct.pack("!ii", length, code) + await reader.readexactly(length - 8)

    async def _forward(self, reader, writer, first):
        """Bytes both ways between the client and the server's socket, until either side closes."""
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.socket_path)
        upstream_writer.write(first)
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            upstream_writer.close()


async def _pipe(reader, writer):
    try:
        while data := await reader.read(PIPE_BYTES):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def _parameters(body):
    """The StartupMessage's parameters ({name: value}): its bytes after length and protocol version."""
    fields = body.split(b"\0")
    return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2) if fields[i]}


def no_encryption_error(user, database):
    """The ErrorResponse of a server that requires TLS to a client that did not ask for it."""
    message = f'no pg_hba.conf entry for host "127.0.0.1", user "{user}", database "{database}", no encryption'
    fields = b"".join(kind + text.encode() + b"\0" for kind, text in
                      ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28000"), (b"M", message)))
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body
