"""Pieces of the DICOMweb edge that need no server: Accept parsing, QIDO → Query, PN JSON."""

from __future__ import annotations

import pytest
from multidict import MultiDict, MultiDictProxy

from anim import InvalidQuery, Level
from anim.index.search import _json_value
from web.media import parse_accept
from web.qido import build_query


def _params(**kw: str) -> MultiDictProxy[str]:
    return MultiDictProxy(MultiDict(kw))


def test_person_name_component_groups_are_named_objects() -> None:
    # PS3.18 F.2.2: Alphabetic, Ideographic, Phonetic, each only when present
    v = _json_value("PN", "Yamada^Tarou=山田^太郎=やまだ^たろう\\DOE^JANE")
    assert v["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"},
        {"Alphabetic": "DOE^JANE"},
    ]
    assert _json_value("PN", "=山田^太郎")["Value"] == [{"Ideographic": "山田^太郎"}]


@pytest.mark.parametrize("header", [
    "multipart/related; type=application/octet-stream; transfer-syntax=*",
    'multipart/related; type="application/octet-stream"; transfer-syntax=*',
])
def test_accept_quoted_and_unquoted_read_alike(header: str) -> None:
    [r] = parse_accept(header)
    assert (r.type, r.part_type, r.transfer_syntax) == (
        "multipart/related", "application/octet-stream", "*")


def test_accept_orders_by_q_and_drops_q0() -> None:
    ranges = parse_accept("image/png;q=0.5, image/jpeg, image/gif;q=0")
    assert [r.type for r in ranges] == ["image/jpeg", "image/png"]


def test_qido_translates_tags_lists_and_paging() -> None:
    q, warnings, limit = build_query(
        _params(**{"00100020": "P1", "StudyInstanceUID": "1.2,1.3", "limit": "5",
                   "offset": "10", "fuzzymatching": "true"}), Level.STUDY, {}, 1000)
    assert q.match == {"PatientID": "P1", "StudyInstanceUID": "1.2\\1.3"}
    assert (q.limit, q.offset, limit) == (5, 10, 5)
    assert any("fuzzymatching" in w for w in warnings)


def test_qido_asks_one_more_than_the_server_cap_to_detect_truncation() -> None:
    q, _, limit = build_query(_params(), Level.STUDY, {}, 100)
    assert (q.limit, limit) == (101, 100)


@pytest.mark.parametrize(("params", "reason"), [
    ({"Modality": "CT"}, "series-level"),
    ({"NoSuchKey": "x"}, "unknown attribute"),
    ({"limit": "-1"}, "between 0 and"),
    ({"fuzzymatching": "maybe"}, "true or false"),
    ({"ReferencedStudySequence.ReferencedSOPInstanceUID": "1"}, "sequences"),
])
def test_qido_refuses_what_it_cannot_do_with_a_reason(params: dict[str, str],
                                                      reason: str) -> None:
    with pytest.raises(InvalidQuery, match=reason):
        build_query(_params(**params), Level.STUDY, {}, 1000)
