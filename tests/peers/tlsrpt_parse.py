"""Reads a TLS report message (RFC 8460) on standard input with Python's email package and
prints the report it carries: the application/tlsrpt+gzip part, decompressed, as JSON, with
the message's TLS-Report-Domain header beside it.
"""

import email
import gzip
import json
import sys


def main():
    message = email.message_from_bytes(sys.stdin.buffer.read())
    for part in message.walk():
        if part.get_content_type() == "application/tlsrpt+gzip":
            report = json.loads(gzip.decompress(part.get_payload(decode=True)))
            print(json.dumps({
                "content_type": message.get_content_type(),
                "report_type": message.get_param("report-type"),
                "report_domain": message["TLS-Report-Domain"],
                "report": report,
            }))
            return 0
    print("no application/tlsrpt+gzip part", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
