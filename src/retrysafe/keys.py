"""Reading the ``Idempotency-Key`` header.

A key is a Structured Field string (``"abc"``, RFC 9651) or a bare token (``abc``, as Stripe
sends it); both name the same key. After unquoting it is 1 to 255 printable ASCII characters.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MAX_KEY_LENGTH", "MalformedKey", "find_key", "parse_key"]

MAX_KEY_LENGTH = 255


class MalformedKey(ValueError):
    """The header is present but does not carry exactly one valid key."""


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


def parse_key(raw: bytes) -> str:
    """Return the key carried by one header value, or raise :class:`MalformedKey`."""
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedKey("the key must be printable ASCII") from None
    value = value.strip(" \t")
    if value.startswith('"'):
        key = _unquote(value)
    else:
        if "," in value:
            raise MalformedKey("a list of keys was sent; send exactly one")
        key = value
    if not key:
        raise MalformedKey("the key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise MalformedKey(f"the key is longer than {MAX_KEY_LENGTH} characters")
    if not _printable(key):
        raise MalformedKey("the key must be printable ASCII, without control characters")
    return key


def _unquote(value: str) -> str:
    """Unquote an RFC 9651 sf-string that must make up the whole value (parameters refused)."""
    out: list[str] = []
    i, end = 1, len(value)
    while i < end:
        ch = value[i]
        if ch == "\\":
            if i + 1 >= end or value[i + 1] not in '"\\':
                raise MalformedKey("broken escape in the quoted key")
            out.append(value[i + 1])
            i += 2
        elif ch == '"':
            if i != end - 1:
                raise MalformedKey("unexpected text after the quoted key (a list or parameters?)")
            return "".join(out)
        else:
            out.append(ch)
            i += 1
    raise MalformedKey("the quoted key is not closed")


def find_key(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """Return the key in ``headers`` (raw, lower-case names), None if absent.

    ``name`` must be lower-case. A repeated header is refused: two values cannot name one key.
    """
    found: bytes | None = None
    for header, value in headers:
        if header == name or (len(header) == len(name) and header.lower() == name):
            if found is not None:
                raise MalformedKey("the key header was sent more than once")
            found = value
    if found is None:
        return None
    return parse_key(found)
