"""Verifies a message's ARC chain (RFC 8617) with dkimpy, the independent verifier, and prints
"CV REASON" (cv is pass, fail or none).

    python3 arc_verify.py MESSAGE RECORDS

RECORDS is a JSON object from record names to their TXT text, standing in for DNS.
"""

import json
import sys

import dkim


def main():
    message = open(sys.argv[1], "rb").read()
    records = json.load(open(sys.argv[2], encoding="utf-8"))

    def dnsfunc(name, timeout=5):
        key = name.decode() if isinstance(name, bytes) else name
        text = records.get(key.rstrip("."))
        return text.encode() if text is not None else None

    cv, _results, reason = dkim.arc_verify(message, dnsfunc=dnsfunc)
    print(cv.decode(), reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
