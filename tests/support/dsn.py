"""Reading a DSN as a mail client does: parsed with the stdlib email package."""

from __future__ import annotations

from dataclasses import dataclass
from email import message_from_bytes, policy


@dataclass
class Report:
    text: str  # the human-readable part
    reporting: dict[str, str]  # per-message fields (lower-case names)
    recipients: list[dict[str, str]]  # one dict of fields per failed recipient
    headers: str  # the returned original headers


def read_dsn(data: bytes) -> Report:
    message = message_from_bytes(data, policy=policy.default)
    assert message.get_content_type() == "multipart/report", message.get_content_type()
    assert message.get_param("report-type") == "delivery-status"
    human, status, returned = message.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "text/rfc822-headers"
    blocks = [{k.lower(): str(v) for k, v in block.items()} for block in status.get_payload()]
    return Report(text=human.get_content(), reporting=blocks[0], recipients=blocks[1:],
                  headers=returned.get_payload(decode=True).decode("utf-8", "replace"))
