"""A receiving SMTP server that is not Switchyard: aiosmtpd, with STARTTLS when given a
certificate. Each message it takes is appended to OUT as one JSON line; "ready PORT" is printed
once it listens.

    python3 smtp_sink.py OUT [--cert CERT --key KEY] [--auth USER:PASSWORD] [--port PORT]
                             [--seven-bit]

With --auth, MAIL needs AUTH (offered over TLS only) with those credentials. With --seven-bit it
offers neither 8BITMIME nor SMTPUTF8 (a server of RFC 821's time), and each record says whether
the message held any 8-bit byte.
"""

import argparse
import asyncio
import json
import socket
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Recorder:
    def __init__(self, out, seven_bit=False):
        self.out = out
        self.seven_bit = seven_bit

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.seven_bit:
            responses = [line for line in responses if line[4:] not in ("8BITMIME", "SMTPUTF8")]
        return responses

    async def handle_DATA(self, server, session, envelope):
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "tls": session.ssl is not None,
            "auth": session.auth_data.decode() if isinstance(session.auth_data, bytes) else None,
            "data": envelope.original_content.decode("utf-8", "replace"),
            "eight_bit": any(byte >= 0x80 for byte in envelope.original_content),
        }
        with open(self.out, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return "250 2.0.0 Ok: queued"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--auth")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seven-bit", action="store_true")
    args = parser.parse_args()
    auth = {}
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, data):
            ok = (
                isinstance(data, LoginPassword)
                and data.login.decode() == user
                and data.password.decode() == password
            )
            # handled=False: aiosmtpd then answers a failure itself (535 5.7.8).
            return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)

        auth = dict(authenticator=authenticator, auth_required=True, auth_require_tls=True)
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    # aiosmtpd connects to its own port to see it is up, so it needs the number beforehand.
    port = args.port
    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    controller = Controller(
        Recorder(args.out, args.seven_bit),
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=False,
        decode_data=False,
        **auth,
    )
    controller.start()
    print(f"ready {port}", flush=True)
    try:
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
