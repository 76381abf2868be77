"""RFC 8785 JSON Canonicalization Scheme (JCS), restricted to I-JSON integers.

Everything pyrsia hashes or signs goes through :func:`canonical_json`. The
values are JSON objects, arrays, strings, booleans, null and integers in the
I-JSON safe range; floats are refused (RFC 8785 would render them, but no pyrsia
format needs them, and refusing them removes a whole class of ambiguity).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from .errors import EncodingError

__all__ = ["MAX_SAFE_INTEGER", "JSONValue", "canonical_json", "canonical_loads"]

JSONValue = Any
MAX_SAFE_INTEGER: Final = 2**53 - 1
_MAX_DEPTH: Final = 64

_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _string(s: str, out: list[str]) -> None:
    out.append('"')
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":
            raise EncodingError("lone surrogate in string cannot be encoded as UTF-8")
        else:
            out.append(ch)
    out.append('"')


def _utf16_key(s: str) -> bytes:
    return s.encode("utf-16-be", "surrogatepass")


def _encode(value: Any, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise EncodingError("value is nested too deeply")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise EncodingError(f"integer {value} is outside the I-JSON safe range")
        out.append(str(int(value)))
    elif isinstance(value, float):
        raise EncodingError("floats are not allowed in canonical pyrsia JSON")
    elif isinstance(value, str):
        _string(value, out)
    elif isinstance(value, Mapping):
        keys = list(value.keys())
        for k in keys:
            if not isinstance(k, str):
                raise EncodingError(f"object keys must be strings, got {type(k).__name__}")
        out.append("{")
        for i, k in enumerate(sorted(keys, key=_utf16_key)):
            if i:
                out.append(",")
            _string(k, out)
            out.append(":")
            _encode(value[k], out, depth + 1)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out, depth + 1)
        out.append("]")
    else:
        raise EncodingError(f"cannot canonically encode a {type(value).__name__}")


def canonical_json_reference(value: JSONValue) -> bytes:
    """RFC 8785 written out character by character (the reference the fast path is tested on)."""
    out: list[str] = []
    _encode(value, out, 0)
    return "".join(out).encode("utf-8")


def _bmp_key(k: str) -> bool:
    # For keys without supplementary-plane characters, UTF-16 code-unit order (RFC 8785)
    # and code-point order (Python's sort) agree.
    return k.isascii() or all(c < "\ud800" or "\ue000" <= c <= "\uffff" for c in k)


def _check(value: Any, depth: int) -> bool:
    """Validate types and ranges; return False if a key needs the UTF-16 ordering path."""
    if depth > _MAX_DEPTH:
        raise EncodingError("value is nested too deeply")
    t = type(value)
    if t is dict:
        items: Any = value.items()
        ok = True
        for k, v in items:
            if type(k) is not str:
                raise EncodingError(f"object keys must be strings, got {type(k).__name__}")
            if not k.isascii() and not _bmp_key(k):
                ok = False
            tv = type(v)
            if tv is str or v is None or tv is bool:
                continue
            if tv is int:
                if not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
                    raise EncodingError(f"integer {v} is outside the I-JSON safe range")
                continue
            if not _check(v, depth + 1):
                ok = False
        return ok
    if t is list or t is tuple:
        ok = True
        for v in value:
            tv = type(v)
            if tv is str or v is None or tv is bool:
                continue
            if not _check(v, depth + 1):
                ok = False
        return ok
    if t is str or value is None or t is bool:
        return True
    if t is int:
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise EncodingError(f"integer {value} is outside the I-JSON safe range")
        return True
    if isinstance(value, float):
        raise EncodingError("floats are not allowed in canonical pyrsia JSON")
    # Other mappings/sequences, int/str subclasses: the reference path decides.
    return False


def canonical_json(value: JSONValue) -> bytes:
    """Return the RFC 8785 canonical UTF-8 bytes of ``value``.

    Values are checked in one walk (types, integer range, keys); the bytes are then
    written by the stdlib's C encoder with sorted keys, which for such values is
    exactly RFC 8785 (a property test compares it with the reference encoder).
    """
    if not _check(value, 0):
        return canonical_json_reference(value)
    try:
        return _FAST.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        raise EncodingError("lone surrogate in string cannot be encoded as UTF-8") from None


_FAST: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def canonical_flat_object(value: Mapping[str, str | int]) -> bytes:
    """Fast path of :func:`canonical_json` for a flat object of ASCII keys.

    The values must already be validated strings and I-JSON-safe integers (as a
    :class:`~pyrsia_core.Record`'s are). For such objects the stdlib's C encoder
    with sorted keys and these options writes exactly the RFC 8785 bytes: ASCII
    keys sort the same by code point and by UTF-16 unit, and the escapes it
    emits are the ones RFC 8785 mandates. A property test checks the equality.
    """
    for k, v in value.items():
        if not k.isascii() or not (type(v) is str or type(v) is int):
            return canonical_json(value)
        if type(v) is int and not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
            raise EncodingError(f"integer {v} is outside the I-JSON safe range")
    try:
        return _FAST.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        raise EncodingError("lone surrogate in string cannot be encoded as UTF-8") from None


def _no_float(text: str) -> Any:
    raise EncodingError(f"floats are not allowed in canonical pyrsia JSON: {text!r:.40}")


def _no_constant(text: str) -> Any:
    raise EncodingError(f"{text} is not valid JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise EncodingError(f"duplicate key {k!r:.40} in JSON object")
        out[k] = v
    return out


def canonical_loads(data: bytes | str, *, require_canonical: bool = False) -> JSONValue:
    """Parse JSON strictly: no floats, no duplicate keys, no NaN/Infinity.

    With ``require_canonical`` the input must also be byte-for-byte canonical,
    so that what was signed and what is read are the same value.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(
            text,
            parse_float=_no_float,
            parse_constant=_no_constant,
            object_pairs_hook=_pairs,
        )
    except EncodingError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EncodingError(f"malformed JSON: {exc}") from None
    if require_canonical:
        raw = data if isinstance(data, (bytes, bytearray)) else data.encode("utf-8")
        if canonical_json(value) != bytes(raw):
            raise EncodingError("JSON is not in canonical (RFC 8785) form")
    return value
