"""Scanner stand-ins for bench/relay-scanner-stubs.sh, which cost next to no CPU, so that what a
server spends on scanning is its own part alone.

  scanner-stubs.py serve CLAMD_PORT RSPAMD_PORT DELAY_MS [close] [serial]
      clamd (zIDSESSION, zINSTREAM: "N: stream: OK") and rspamd (POST /checkv2: a fixed
      1.6 KB report of twelve symbols, as rspamd 3.4 gives for a plain message) answering after
      DELAY_MS; with `close`, rspamd's answer says `Connection: close` and the connection is
      closed after it, as rspamd 3.4's normal worker does; with `serial`, rspamd answers one
      request at a time, DELAY_MS each (sleeping, not computing), as one rspamd worker does.
  scanner-stubs.py feed RSPAMD_PORT RATE
      sends a 1 KB message to a (real) rspamd RATE times a second: the contention control, a
      scanner as busy as in the path but with someone else's mail.
"""
import asyncio
import json
import struct
import sys
import time

REPORT = json.dumps({
    "is_skipped": False, "score": 1.3, "required_score": 15.0, "action": "no action",
    "symbols": {f"SYMBOL_NUMBER_{i}": {"name": f"SYMBOL_NUMBER_{i}", "score": 0.1 * i,
                "metric_score": 0.1 * i, "description": "A symbol that matched the message",
                "options": ["one.test", "two.test"]} for i in range(12)},
    "messages": {}, "message-id": "x@y", "time_real": 0.01, "milter": {"add_headers": {}},
}).encode()


def serve(clamd_port, rspamd_port, delay, close, serial):
    turn = None
    async def clamd(reader, writer):
        session, n = False, 0
        try:
            while True:
                command = await reader.readuntil(b"\0")
                if command == b"zIDSESSION\0":
                    session = True
                    continue
                if command != b"zINSTREAM\0":
                    return
                while True:
                    size = struct.unpack(">I", await reader.readexactly(4))[0]
                    if size == 0:
                        break
                    await reader.readexactly(size)
                n += 1
                if delay:
                    await asyncio.sleep(delay)
                writer.write((f"{n}: " if session else "").encode() + b"stream: OK\0")
                if not session:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def rspamd(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if serial:
                    async with turn:
                        await asyncio.sleep(delay)
                elif delay:
                    await asyncio.sleep(delay)
                connection = b"Connection: close\r\n" if close else b""
                writer.write(b"HTTP/1.1 200 OK\r\n" + connection
                             + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(REPORT) + REPORT)
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        nonlocal turn
        turn = asyncio.Lock()
        a = await asyncio.start_server(clamd, "127.0.0.1", clamd_port)
        b = await asyncio.start_server(rspamd, "127.0.0.1", rspamd_port)
        await asyncio.gather(a.serve_forever(), b.serve_forever())

    asyncio.run(main())


def feed(port, rate):
    message = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: hi\r\n\r\n" + b"x" * 1000 + b"\r\n"

    async def one():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /checkv2 HTTP/1.1\r\nHost: rspamd\r\nFrom: a@b.test\r\n"
                         b"Rcpt: c@d.test\r\nIP: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                         % len(message) + message)
            await reader.read()
            writer.close()
        except OSError:
            pass

    async def main():
        start, n, tasks = time.monotonic(), 0, set()
        while True:
            n += 1
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))

    asyncio.run(main())


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) / 1000,
              "close" in sys.argv[5:], "serial" in sys.argv[5:])
    else:
        feed(int(sys.argv[2]), float(sys.argv[3]))
