"""Reads a delivery status notification (RFC 3464) on standard input with Python's email package
and prints what it says as JSON: subject, the per-message fields, one object per recipient, and
what of the original came back ("headers", "full" or null).
"""

import email
import json
import sys
from email import policy


def main():
    message = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
    result = {
        "content_type": message.get_content_type(),
        "report_type": message.get_param("report-type"),
        "subject": message["Subject"],
        "envid": None,
        "recipients": [],
        "returned": None,
    }
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "message/delivery-status":
            blocks = part.get_payload()
            result["envid"] = blocks[0]["Original-Envelope-Id"]
            for block in blocks[1:]:
                result["recipients"].append({
                    "final": block["Final-Recipient"],
                    "original": block["Original-Recipient"],
                    "action": block["Action"],
                    "status": block["Status"],
                })
        elif kind == "text/rfc822-headers":
            result["returned"] = "headers"
        elif kind == "message/rfc822":
            result["returned"] = "full"
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
