"""Verifies a message with dkimpy, the independent verifier.

    python3 dkim_verify.py MESSAGE RECORDS          every DKIM signature: "SELECTOR ALGORITHM pass|fail"
    python3 dkim_verify.py --arc MESSAGE RECORDS    the ARC chain (RFC 8617): "CV REASON"

RECORDS is a JSON object from record names ("sel._domainkey.example.com") to their TXT text;
it stands in for DNS so the test talks to nothing but files.
"""

import json
import re
import sys

import dkim


def main():
    arguments = sys.argv[1:]
    arc = arguments[0] == "--arc"
    if arc:
        arguments = arguments[1:]
    message = open(arguments[0], "rb").read()
    records = json.load(open(arguments[1], encoding="utf-8"))

    def dnsfunc(name, timeout=5):
        key = name.decode() if isinstance(name, bytes) else name
        text = records.get(key.rstrip("."))
        return text.encode() if text is not None else None

    if arc:
        cv, _results, reason = dkim.arc_verify(message, dnsfunc=dnsfunc)
        print(cv.decode(), reason)
        return 0
    verifier = dkim.DKIM(message)
    signatures = [
        value
        for (name, value) in verifier.headers
        if name.lower() == b"dkim-signature"
    ]
    if not signatures:
        print("no signature")
        return 1
    for index, value in enumerate(signatures):
        tags = dict(
            (part.split(b"=", 1)[0].strip(), part.split(b"=", 1)[1].strip())
            for part in re.sub(rb"\s+", b"", value).split(b";")
            if b"=" in part
        )
        ok = dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc)
        print(tags[b"s"].decode(), tags[b"a"].decode(), "pass" if ok else "fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
