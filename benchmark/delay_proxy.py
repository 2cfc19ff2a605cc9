"""A TCP proxy that delays every byte: a database far away, made on one machine.

    python -m benchmark.delay_proxy --target /path/to/socket/.s.PGSQL.5432 --delay-ms 25 [--port 0]

It listens on 127.0.0.1 and forwards each connection to `--target` (a Unix socket path, or
HOST:PORT), holding every chunk it reads for `--delay-ms` before passing it on, in each direction,
in order, without limiting the bandwidth: a round trip through it costs twice the delay more than
a direct one (`measure_added_ms` measures what it really adds). It prints `listening on PORT` when
ready. SIGUSR1 makes the connections open at that moment go silent: nothing more is forwarded on
them and nothing is closed, as when a home router drops its NAT entry (new connections work).
SIGUSR2 makes it print the bytes it has forwarded so far, `bytes up U down D` (up: from the clients
to the server).

`DelayProxy` runs it in a thread of the calling process (for a test that needs no precision);
`ProxyProcess` runs it as a process of its own, so that timing the caller does not share a GIL
with it (the benchmark).
"""
import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

CHUNK = 65536


class Forwarder:
    """The proxy itself, on an asyncio loop."""

    def __init__(self, target, delay_ms):
        self.target, self.delay = target, delay_ms / 1000
        self.links = set()  # the open connections' silence flags
        self.writers = set()  # the open connections' sockets, both sides
        self.forwarded = {"up": 0, "down": 0}  # bytes, to the server and back
        self.server = None

    async def start(self, port=0):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return self.server.sockets[0].getsockname()[1]

    def silence(self):
        """The connections open now forward nothing more, and stay open."""
        for link in list(self.links):
            link.set()

    async def _connect(self):
        if ":" in self.target and not self.target.startswith("/"):
            host, port = self.target.rsplit(":", 1)
            return await asyncio.open_connection(host, int(port))
        return await asyncio.open_unix_connection(self.target)

    async def _serve(self, client_reader, client_writer):
        try:
            await self._forward(client_reader, client_writer)
        except asyncio.CancelledError:
            pass  # the proxy is shutting down

    async def _forward(self, client_reader, client_writer):
        try:
            server_reader, server_writer = await self._connect()
        except OSError:
            client_writer.close()
            return
        silent = asyncio.Event()
        self.links.add(silent)
        self.writers.update((client_writer, server_writer))

        def cut():
            """One side failed (a client that exits with data unread resets its connection): both sides close, so
            that the server's session ends, as it does when no proxy is between them (not on a silent link)."""
            if not silent.is_set():
                for writer in (client_writer, server_writer):
                    writer.close()

        try:
            await asyncio.gather(self._pipe(client_reader, server_writer, silent, "up", cut),
                                 self._pipe(server_reader, client_writer, silent, "down", cut))
        finally:
            self.links.discard(silent)
            for writer in (client_writer, server_writer):
                self.writers.discard(writer)
                writer.close()

    def close_all(self):
        """Close every connection, both sides (the server's sessions behind a silent link end)."""
        for writer in list(self.writers):
            writer.close()

    async def _pipe(self, reader, writer, silent, direction, cut):
        """Copy `reader` to `writer`, each chunk `delay` seconds late, in order; drop it all once `silent`;
        `cut()` when either fails."""
        pending = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await pending.get()
                if data is None:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if silent.is_set():
                    continue
                writer.write(data)
                await writer.drain()
            if not silent.is_set() and writer.can_write_eof():
                writer.write_eof()

        delivery = asyncio.ensure_future(deliver())
        delivery.add_done_callback(lambda task: task.cancelled() or task.exception() is None or cut())
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if not silent.is_set():
                    self.forwarded[direction] += len(data)
                    pending.put_nowait((time.monotonic() + self.delay, data))
            if silent.is_set():
                await asyncio.Event().wait()  # a silent link never says it closed
            pending.put_nowait((0, None))
            await delivery
        except (ConnectionError, OSError):
            cut()
        finally:
            delivery.cancel()


class DelayProxy:
    """The proxy in a thread of this process: `with DelayProxy(target, delay_ms) as proxy: proxy.port`."""

    def __init__(self, target, delay_ms=0.0):
        self.forwarder = Forwarder(target, delay_ms)
        self.loop = asyncio.new_event_loop()
        self.port = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="delay proxy", daemon=True)

    def __enter__(self):
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.forwarder.start(), self.loop).result(10)
        return self

    def silence(self):
        self.loop.call_soon_threadsafe(self.forwarder.silence)

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._shut_down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _shut_down(self):
        """Close every connection and end every task of the proxy, quietly."""
        self.forwarder.close_all()
        self.forwarder.server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ProxyProcess:
    """The proxy as a process of its own: `with ProxyProcess(target, delay_ms) as proxy: proxy.port`."""

    def __init__(self, target, delay_ms=0.0):
        self.target, self.delay_ms = target, delay_ms
        self.process, self.port = None, None

    def __enter__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmark.delay_proxy", "--target", self.target, "--delay-ms", str(self.delay_ms)],
            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(f"the delay proxy did not start: {line!r}")
        self.port = int(line.split()[-1])
        return self

    def silence(self):
        self.process.send_signal(signal.SIGUSR1)

    def forwarded(self):
        """(bytes up, bytes down) forwarded so far."""
        self.process.send_signal(signal.SIGUSR2)
        line = self.process.stdout.readline().split()
        return int(line[2]), int(line[4])

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure_added_ms(connect_direct, connect_proxied, times=20):
    """(round trip through the proxy, direct, in ms): the best of `times` `SELECT 1` on each of two
    new connections made by the callables."""
    from askdrchaffee.round_trips import measure_ms

    figures = []
    for connect in (connect_proxied, connect_direct):
        connection = connect()
        try:
            connection.autocommit = True
            figures.append(measure_ms(connection, times))
        finally:
            connection.close()
    return tuple(figures)


def main(argv=None):
    parser = argparse.ArgumentParser(description="A TCP proxy that delays every byte (see the module docstring).")
    parser.add_argument("--target", required=True, help="a Unix socket path, or HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="each direction's delay (a round trip adds twice this)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    loop = asyncio.new_event_loop()
    forwarder = Forwarder(args.target, args.delay_ms)
    port = loop.run_until_complete(forwarder.start(args.port))
    loop.add_signal_handler(signal.SIGUSR1, forwarder.silence)
    loop.add_signal_handler(signal.SIGUSR2, lambda: print(
        f"bytes up {forwarder.forwarded['up']} down {forwarder.forwarded['down']}", flush=True))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    print(f"listening on {port}", flush=True)
    loop.run_forever()
    os._exit(0)  # the connections still open go with the process, unannounced


if __name__ == "__main__":
    main()
