"""Segments matched to a dataset's structures: terminology code first, then the alias table and
the built-in aliases, then the normalised name; ambiguity refused."""

from __future__ import annotations

import pytest

from mtkd.data.structure_match import (
    SegmentLabel,
    builtin_aliases,
    match_segments,
    segment_key,
    style_code_key,
)
from mtkd.data.terminology import lookup, table_names
from mtkd.errors import MTKDError

KIDNEY_LEFT = style_code_key(lookup("kidney_left"))
LIVER = style_code_key(lookup("liver"))


def test_builtin_aliases_cover_side_first_and_code_meanings():
    aliases = builtin_aliases()
    assert aliases["left_kidney"] == "kidney_left"
    assert aliases["left_adrenal_gland"] == "adrenal_gland_left"
    assert "kidney" not in aliases  # a table name of its own, never an alias
    table = {name.lower() for name in table_names()}
    assert not set(aliases) & table


def test_code_before_names():
    segments = [SegmentLabel("Niere links", KIDNEY_LEFT), SegmentLabel("kidney_left")]
    assert match_segments(segments, ["kidney_left"]) == {"kidney_left": 0}


def test_names_through_aliases_then_normalised_names():
    segments = [SegmentLabel("Left Kidney"), SegmentLabel("Leber"), SegmentLabel("Spleen ")]
    structures = ["kidney_left", "liver", "spleen", "aorta"]
    assert match_segments(segments, structures, {"liver": ["leber"]}) == {
        "kidney_left": 0, "liver": 1, "spleen": 2
    }  # fmt: skip
    assert "liver" not in match_segments(segments, structures)  # no alias table: no Leber
    assert segment_key(SegmentLabel("Leber"), {"liver": ["leber"]}) == "liver"
    assert segment_key(SegmentLabel("anything", LIVER)) == "liver"


def test_a_code_two_structures_share_falls_back_to_names():
    shared = style_code_key(lookup("phalanges_feet"))
    assert shared == style_code_key(lookup("phalanges_hand"))
    segments = [SegmentLabel("phalanges_hand", shared), SegmentLabel("phalanges_feet", shared)]
    assert match_segments(segments, ["phalanges_feet", "phalanges_hand"]) == {
        "phalanges_feet": 1, "phalanges_hand": 0
    }  # fmt: skip


@pytest.mark.parametrize(
    ("segments", "aliases", "words"),
    [
        ([SegmentLabel("a", LIVER), SegmentLabel("b", LIVER)], {}, ["'a'", "'b'", "code"]),
        ([SegmentLabel("Liver"), SegmentLabel("liver")], {}, ["'Liver'", "'liver'", "name"]),
        ([SegmentLabel("spleen", LIVER)], {}, ["'spleen'", "'liver'", "both"]),
    ],
)
def test_ambiguous_matches_are_refused(segments, aliases, words):
    with pytest.raises(MTKDError) as info:
        match_segments(segments, ["liver", "spleen"], aliases, where="segmentation 'case 7'")
    message = str(info.value)
    assert "case 7" in message
    assert all(word in message for word in words), message


def test_an_alias_that_names_two_structures_is_refused(tmp_path):
    source = tmp_path / "dataset.json"
    with pytest.raises(MTKDError, match="'spleen'.*both 'liver' and 'spleen'") as info:
        match_segments([SegmentLabel("x")], ["liver", "spleen"], {"liver": ["spleen"]},
                       source=source)  # fmt: skip
    assert str(source) in str(info.value)
