"""Verifies every DKIM signature of a message with dkimpy, the independent verifier, and
prints one line per signature: "SELECTOR ALGORITHM pass|fail".

    python3 dkim_verify.py MESSAGE RECORDS

RECORDS is a JSON object from record names ("sel._domainkey.example.com") to their TXT text;
it stands in for DNS so the test talks to nothing but files.
"""

import json
import re
import sys

import dkim


def main():
    message = open(sys.argv[1], "rb").read()
    records = json.load(open(sys.argv[2], encoding="utf-8"))

    def dnsfunc(name, timeout=5):
        key = name.decode() if isinstance(name, bytes) else name
        text = records.get(key.rstrip("."))
        return text.encode() if text is not None else None

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
