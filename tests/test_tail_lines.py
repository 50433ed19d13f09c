"""The tailer's line splitter: offsets, long lines, encodings, multiline; bytes only (sans-IO)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio.receivers._tail._lines import LineSplitter, supported_encoding


def feed_all(splitter: LineSplitter, data: bytes, step: int | None = None) -> list[str]:
    out: list[str] = []
    if step is None:
        out += splitter.feed(data).texts
    else:
        for i in range(0, len(data), step):
            out += splitter.feed(data[i : i + step]).texts
    return out


SAMPLE = b"first line\nsecond line\r\nthird \xc3\xa9\n\npartial"


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7, 64])
def test_lines_and_offsets_whatever_the_chunking(step):
    s = LineSplitter()
    assert feed_all(s, SAMPLE, step) == ["first line", "second line", "third é", ""]
    assert s.consumed == SAMPLE.index(b"partial")
    assert s.position == len(SAMPLE)
    assert s.pending
    flushed = s.flush()
    assert flushed.texts == ["partial"] and flushed.end == len(SAMPLE) == s.consumed
    assert not s.pending


def test_restarting_at_consumed_repeats_and_loses_nothing():
    data = b"".join(b"line %d\n" % i for i in range(100)) + b"tail"
    first = LineSplitter()
    got = first.feed(data[:333]).texts
    second = LineSplitter(position=first.consumed)
    got += second.feed(data[first.consumed :]).texts
    assert got == [f"line {i}" for i in range(100)]


def test_a_long_line_is_cut_and_never_held_whole():
    s = LineSplitter(max_size=10)
    out = s.feed(b"0123456789abcdefghij")  # no newline yet: only 10 bytes are held
    assert out.texts == [] and len(s._held) == 10
    out = s.feed(b"klmno" * 1000 + b"\nnext\n")
    assert out.texts == ["0123456789", "next"]
    assert out.cut == {0: 10 + 5000}
    assert s.consumed == s.position
    # a complete long line inside one chunk
    out = s.feed(b"x" * 25 + b"\n")
    assert out.texts == ["x" * 10] and out.cut == {0: 15}


def test_invalid_bytes_are_replaced_and_reported():
    s = LineSplitter()
    out = s.feed(b"good\nbad \xff\xfe here\n\x00\x01binary\n")
    assert out.texts == ["good", "bad \ufffd\ufffd here", "\x00\x01binary"]
    assert out.invalid == [1]


def test_a_cut_through_a_character_is_not_invalid():
    s = LineSplitter(max_size=5)
    out = s.feed("abcdé".encode() + b"\n")  # é is two bytes: the cut splits it
    assert out.texts == ["abcd"] and out.cut == {0: 1} and out.invalid == []


def test_byte_order_mark_dropped_only_at_file_start():
    assert LineSplitter().feed(b"\xef\xbb\xbfhello\n").texts == ["hello"]
    assert LineSplitter(position=100).feed(b"\xef\xbb\xbfhello\n").texts == ["\ufeffhello"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("step", [None, 1, 3])
def test_utf16_newlines_at_even_offsets(encoding, step):
    # U+0A00 then U+0041 encodes to bytes holding "\n\0" at an odd offset in UTF-16LE
    text = "a\u0a00\u4100b\nsecond\n"
    s = LineSplitter(encoding=encoding)
    assert feed_all(s, text.encode(encoding), step) == ["a\u0a00\u4100b", "second"]
    assert s.consumed == len(text.encode(encoding))


def test_supported_encodings():
    for ok in ("utf-8", "UTF8", "ascii", "latin-1", "utf-16le", "utf-16be"):
        assert supported_encoding(ok) is None, ok
    assert "unknown" in supported_encoding("klingon")
    assert "not supported" in supported_encoding("utf-32")


def test_multiline_by_start_pattern():
    s = LineSplitter(line_start=re.compile(r"^\d{4}-"))
    out = s.feed(b"2024-01-01 first\n  continued\n  more\n2024-01-02 second\n")
    assert out.texts == ["2024-01-01 first\n  continued\n  more"]
    assert s.consumed == len(b"2024-01-01 first\n  continued\n  more\n")  # the second record is held
    assert s.flush().texts == ["2024-01-02 second"]
    assert s.consumed == s.position


def test_multiline_by_end_pattern():
    s = LineSplitter(line_end=re.compile(r";$"))
    out = s.feed(b"a\nb;\nc;\nd")
    assert out.texts == ["a\nb;", "c;"]
    assert s.consumed == len(b"a\nb;\nc;\n")


def test_multiline_record_is_bounded():
    s = LineSplitter(line_start=re.compile("^START"), max_size=20)
    out = s.feed(b"START " + b"x" * 30 + b"\n" + b"y" * 30 + b"\nSTART two\n")
    assert out.texts[0] == ("START " + "x" * 30)[:20]
    assert out.cut[0] > 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 50))
def test_fuzz_consumed_is_exact(chunks, max_size):
    """Whatever the bytes and chunking: records + held bytes account for every byte, in order."""
    data = b"".join(chunks)
    s = LineSplitter(max_size=max_size)
    texts = []
    for c in chunks:
        out = s.feed(c)
        texts += out.texts
        assert out.end == s.consumed <= s.position
    assert s.position == len(data)
    assert s.consumed == data.rfind(b"\n") + 1
    complete = data[: s.consumed].split(b"\n")[:-1]
    assert len(texts) == len(complete)
    for text, raw in zip(texts, complete):
        raw = raw.removeprefix(b"\xef\xbb\xbf") if raw is complete[0] else raw
        if len(raw) <= max_size:
            try:
                assert text == raw.decode().removesuffix("\r")
            except UnicodeDecodeError:
                assert "\ufffd" in text
