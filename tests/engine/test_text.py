"""TextAssembler: incremental detokenization, stop strings, held-back partial text."""

from __future__ import annotations

import pytest

from retrieval_attn.engine.text import TextAssembler

PIECES = {1: "Hel", 2: "lo", 3: ",", 4: " wor", 5: "ld", 6: "!", 7: " S", 8: "T", 9: "O",
          10: "P", 11: " after", 12: "ay", 13: " here", 14: "abcSTOPdef", 15: "\n"}


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def feed(asm: TextAssembler, ids: list[int]) -> list[str]:
    return [asm.add(i) for i in ids]


@pytest.mark.parametrize("ids", [
    pytest.param([1, 2, 3, 4, 5, 6], id="hello-world"),
    pytest.param([7, 8, 12, 13], id="near-stop"),
    pytest.param([1], id="one-token"),
])
@pytest.mark.parametrize("stop", [
    pytest.param([], id="no-stop"),
    pytest.param(["zzz"], id="absent-stop"),
    pytest.param(["STOP", "\n\n"], id="two-absent-stops"),
])
def test_no_stop_all_text_comes_out(ids, stop):
    asm = TextAssembler(decode, stop)
    out = feed(asm, ids)
    assert "".join(out) + asm.flush() == decode(ids)
    assert asm.stopped is False
    assert asm.flush() == ""  # nothing twice


def test_without_stops_text_streams_immediately():
    asm = TextAssembler(decode, [])
    assert feed(asm, [1, 2, 3]) == ["Hel", "lo", ","]


def test_stop_split_across_tokens_is_cut():
    asm = TextAssembler(decode, ["STOP"])
    out = feed(asm, [1, 2, 7, 8, 9])  # "Hello" " S" "T" "O": could still become STOP
    assert "S" not in "".join(out)
    assert asm.stopped is False
    out.append(asm.add(10))  # "P" completes it
    assert asm.stopped is True
    assert "".join(out) == "Hello "
    assert asm.text == "Hello "
    # nothing after the stop string ever comes out
    assert asm.add(11) == ""
    assert asm.flush() == ""
    assert asm.stopped is True


def test_stop_inside_one_token():
    asm = TextAssembler(decode, ["STOP"])
    out = feed(asm, [1, 14])
    assert asm.stopped is True
    assert "".join(out) + asm.flush() == "Helabc"


def test_stop_at_the_very_start():
    asm = TextAssembler(decode, ["Hel"])
    assert asm.add(1) == ""
    assert asm.stopped is True
    assert asm.flush() == ""


@pytest.mark.parametrize("stop", [
    pytest.param(["wor", "lo"], id="later-first"),
    pytest.param(["lo", "wor"], id="earlier-first"),
])
def test_earliest_of_several_stops_wins(stop):
    asm = TextAssembler(decode, stop)
    out = feed(asm, [1, 14, 2, 4])  # "HelabcSTOPdeflo wor"
    assert asm.stopped is True
    assert "".join(out) + asm.flush() == "HelabcSTOPdef"


def test_possible_stop_prefix_is_held_then_released():
    asm = TextAssembler(decode, ["STOP"])
    out = feed(asm, [1, 2, 7, 8])  # "Hello ST"
    assert "S" not in "".join(out)  # held back: it may be the start of STOP
    out += feed(asm, [12, 13])  # "Hello STay here": it was not
    assert "".join(out).startswith("Hello STay")  # released before the end
    assert asm.stopped is False
    assert "".join(out) + asm.flush() == "Hello STay here"


def test_trailing_replacement_char_is_held_until_completed():
    byte_pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!"}

    def decode_bytes(ids: list[int]) -> str:
        return b"".join(byte_pieces[i] for i in ids).decode("utf-8", errors="replace")

    asm = TextAssembler(decode_bytes, [])
    assert asm.add(1) == "caf"
    assert asm.add(2) == ""  # "caf\ufffd": the character is not complete yet
    assert asm.add(3) == "\u00e9"
    assert asm.add(4) == "!"
    assert asm.flush() == ""


def test_flush_releases_held_text():
    asm = TextAssembler(decode, ["STOP"])
    shown = "".join(feed(asm, [1, 2]))  # "Hello": the tail may be the start of a stop
    held = asm.flush()
    assert held  # something was held back
    assert shown + held == "Hello"
    assert asm.stopped is False
