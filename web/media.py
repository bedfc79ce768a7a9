"""Accept headers and media types of DICOMweb (PS3.18 8.7).

An Accept header is a list of media ranges with parameters and q-values. DICOMweb
puts the part's media type and the transfer syntax into parameters of
``multipart/related`` (``type="application/dicom"; transfer-syntax=*``); viewers send
them quoted or not, so both are read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anim import NotAcceptable

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
MULTIPART = "multipart/related"


@dataclass(frozen=True, slots=True)
class MediaRange:
    type: str  # e.g. "multipart/related", lower case
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str:
        """The media type of the parts (``type`` parameter) of a multipart range."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def matches(self, media_type: str) -> bool:
        major, _, minor = self.type.partition("/")
        want_major, _, want_minor = media_type.partition("/")
        return (major == "*" or major == want_major) and (minor == "*" or minor == want_minor)


def _split(text: str, sep: str) -> list[str]:
    """Split on *sep* outside double quotes."""
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (stable for equal q).

    An absent or empty header is ``*/*``.
    """
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for item in _split(header, ","):
        parts = _split(item, ";")
        if not parts:
            continue  # an element of separators only: ignored (RFC 9110 5.6.1)
        mtype = parts[0].lower()
        params: dict[str, str] = {}
        q = 1.0
        for p in parts[1:]:
            k, _, v = p.partition("=")
            k, v = k.strip().lower(), v.strip().strip('"')
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    raise NotAcceptable(f"bad q-value {v!r} in Accept") from None
            else:
                params[k] = v
        if q > 0:
            ranges.append(MediaRange(mtype, params, q))
    return sorted(ranges, key=lambda r: -r.q)


def wants_json(ranges: list[MediaRange]) -> bool:
    """True if DICOM JSON (or plain JSON, or anything) is acceptable."""
    return any(r.matches(DICOM_JSON) or r.type == "application/json" for r in ranges)
