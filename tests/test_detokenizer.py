"""Tests for kiln.runtime.detokenizer with the real SmolLM2 tokenizer."""

from __future__ import annotations

import random
import time

import pytest

from kiln.runtime.detokenizer import DetokenizerStep, IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "Party time 🎉🎉 with family 👨‍👩‍👧‍👦 and a rocket 🚀.",
    "日本語のテキストと中文文本，还有한국어도 있어요。",
    "Café crème, naïve façade, jalapeño, Ærøskøbing, Straße.",
    "Mixed: ∑ x² ≈ π · r²  →  ∞ ✓ ✗ «quotes» — dash… \n\tnew\nlines  ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kiln.runtime.models.loader import default_gguf_path

    gguf = default_gguf_path()
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return hf_tok.backend_tokenizer


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def stream(det, ids, chunk=1):
    """Feed ids `chunk` at a time; return the list of steps."""
    return [det.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]


# --------------------------------------------------------------------- plain decoding


def test_tokenizer_splits_multibyte_chars(tok):
    # Precondition that makes the UTF-8 tests meaningful: single tokens decode to U+FFFD.
    ids = enc(tok, "🎉日本語")
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 1000])
def test_streaming_reproduces_decode(tok, text, chunk):
    ids = enc(tok, text)
    det = IncrementalDetokenizer(tok)
    steps = stream(det, ids, chunk)
    tail = det.flush()
    assert tail == ""  # nothing pending once every character is complete
    emitted = "".join(s.text for s in steps)
    assert emitted == tok.decode(ids) == text
    assert det.output_text == emitted
    assert all(s.stop is None for s in steps)
    # No piece ever contains a broken character.
    assert all("\ufffd" not in s.text for s in steps)


def test_incomplete_character_held_until_complete(tok):
    ids = enc(tok, "a🎉")
    det = IncrementalDetokenizer(tok)
    out = [det.add_tokens([i]).text for i in ids]
    # The emoji arrives as several byte tokens; nothing is emitted for the first ones.
    assert out[0] == "a"
    assert all(t == "" for t in out[1:-1])
    assert out[-1] == "🎉"


def test_flush_releases_incomplete_utf8(tok):
    ids = enc(tok, "ok 🎉")[:-1]  # cut the emoji short
    det = IncrementalDetokenizer(tok)
    emitted = "".join(s.text for s in stream(det, ids))
    assert "\ufffd" not in emitted
    tail = det.flush()
    assert tail.endswith("\ufffd")
    assert emitted + tail == tok.decode(ids)
    assert det.output_text == tok.decode(ids)


def test_multi_token_call_does_not_hold_complete_text_behind_partial_char(tok):
    ids = enc(tok, "Hello world 🎉")
    det = IncrementalDetokenizer(tok)
    step = det.add_tokens(ids[:-1])  # ends in the middle of the emoji
    assert step.text == "Hello world"  # the space belongs to the emoji token
    assert det.add_tokens(ids[-1:]).text == " 🎉"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = [im_start] + enc(tok, "assistant\nHi 👋") + [im_end, im_end]
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    emitted = "".join(s.text for s in stream(det, ids)) + det.flush()
    assert emitted == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in emitted) is (not skip)


def test_random_tokens_match_decode(tok):
    # Arbitrary token sequences (invalid UTF-8 included) still add up to decode().
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        for chunk in (1, 3):
            det = IncrementalDetokenizer(tok, skip_special_tokens=True)
            emitted = "".join(s.text for s in stream(det, ids, chunk)) + det.flush()
            assert emitted == tok.decode(ids, skip_special_tokens=True)


def test_window_stays_small(tok):
    # The decoded window must not grow with the output.
    calls = []
    det = IncrementalDetokenizer(tok)
    real = det._tokenizer

    class Spy:
        decoder = real.decoder

        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return real.decode(ids, skip_special_tokens=skip_special_tokens)

    det._tokenizer = Spy()
    ids = enc(tok, " ".join(TEXTS) * 20)
    assert len(ids) > 1000
    text = "".join(s.text for s in stream(det, ids))
    assert text == tok.decode(ids)
    assert max(calls) <= 8
    assert len(calls) <= 2 * len(ids)


# --------------------------------------------------------------------- stop strings


def test_stop_spanning_tokens_one_at_a_time(tok):
    text = "The answer is forty-two. END OF ANSWER and then more text"
    ids = enc(tok, text)
    det = IncrementalDetokenizer(tok, stop=["END OF ANSWER"])
    steps = []
    for i in ids:
        steps.append(det.add_tokens([i]))
        if steps[-1].stop is not None:
            break
    # The stop string is several tokens long, so it really spans boundaries.
    assert len(enc(tok, " END OF ANSWER")) > 1
    assert steps[-1].stop == "END OF ANSWER"
    assert all(s.stop is None for s in steps[:-1])
    assert "".join(s.text for s in steps) == "The answer is forty-two. "
    assert det.output_text == "The answer is forty-two. "
    assert det.finished and det.stop_str == "END OF ANSWER"
    # Nothing after the stop is ever emitted.
    assert det.add_tokens(enc(tok, " more")) == DetokenizerStep("", None)
    assert det.flush() == ""
    assert det.output_text == "The answer is forty-two. "


def test_stop_spanning_tokens_all_at_once(tok):
    text = "The answer is forty-two. END OF ANSWER and then more text"
    ids = enc(tok, text)
    det = IncrementalDetokenizer(tok, stop=["END OF ANSWER"])
    step = det.add_tokens(ids)
    assert step == DetokenizerStep("The answer is forty-two. ", "END OF ANSWER")
    assert det.output_text == "The answer is forty-two. "


def test_stop_inside_a_single_token(tok):
    # The stop is a fragment of one token: the token's text is cut in the middle.
    ids = enc(tok, "unbelievable things")
    det = IncrementalDetokenizer(tok, stop=["liev"])
    text = "".join(s.text for s in stream(det, ids))
    assert text == "unbe"
    assert det.stop_str == "liev"


@pytest.mark.parametrize("chunk", [1, 1000])
def test_include_stop_str_in_output(tok, chunk):
    ids = enc(tok, "Question: why?\nAnswer: because.\nQuestion: next")
    det = IncrementalDetokenizer(tok, stop=["\nQuestion:"], include_stop_str_in_output=True)
    steps = stream(det, ids, chunk)
    assert "".join(s.text for s in steps) == "Question: why?\nAnswer: because.\nQuestion:"
    assert [s.stop for s in steps if s.stop] == ["\nQuestion:"]


@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_stop_with_multibyte_chars(tok, chunk):
    ids = enc(tok, "日本語のテキスト🎉終わり🎉 more")
    det = IncrementalDetokenizer(tok, stop=["終わり🎉"])
    steps = stream(det, ids, chunk)
    assert "".join(s.text for s in steps) == "日本語のテキスト🎉"
    assert [s.stop for s in steps if s.stop] == ["終わり🎉"]


@pytest.mark.parametrize("chunk", [1, 1000])
def test_earliest_match_wins(tok, chunk):
    ids = enc(tok, "alpha beta gamma delta")
    # "gamma" is listed first but "beta" occurs earlier in the text.
    det = IncrementalDetokenizer(tok, stop=["gamma", "delta", "beta"])
    steps = stream(det, ids, chunk)
    assert "".join(s.text for s in steps) == "alpha "
    assert [s.stop for s in steps if s.stop] == ["beta"]


@pytest.mark.parametrize("chunk", [1, 1000])
def test_match_completed_first_wins_same_for_any_grouping(tok, chunk):
    # " b" completes before "a bc d" does, whether the text arrives at once or not.
    ids = enc(tok, "x a bc d y")
    det = IncrementalDetokenizer(tok, stop=["a bc d", " b"])
    steps = stream(det, ids, chunk)
    assert "".join(s.text for s in steps) == "x a"
    assert det.stop_str == " b"
    # Ending at the same character: the longer (earlier starting) one wins.
    det = IncrementalDetokenizer(tok, stop=["bc", "a bc"], include_stop_str_in_output=True)
    steps = stream(det, ids, chunk)
    assert "".join(s.text for s in steps) == "x a bc"
    assert det.stop_str == "a bc"


def test_ambiguous_prefix_held_then_released(tok):
    ids = enc(tok, "Hello there, friend")
    assert tok.decode(ids[:1]) == "Hello"
    det = IncrementalDetokenizer(tok, stop=["Hello world"])
    first = det.add_tokens(ids[:1])
    assert first == DetokenizerStep("", None)  # "Hello" could start "Hello world"
    assert det.output_text == ""
    second = det.add_tokens(ids[1:2])  # " there": not a stop after all
    assert second.stop is None
    assert second.text == "Hello there"
    rest = "".join(s.text for s in stream(det, ids[2:]))
    assert det.flush() == ""
    assert second.text + rest == "Hello there, friend"


def test_partial_release_keeps_possible_stop_start(tok):
    # Tokens "Hello", " Hello", " world": after the second one "Hello " can go out while
    # the second "Hello" may still begin "Hello world".
    ids = enc(tok, "Hello Hello world")
    assert len(ids) == 3
    det = IncrementalDetokenizer(tok, stop=["Hello world"])
    out = [det.add_tokens([i]) for i in ids]
    assert [s.text for s in out] == ["", "Hello ", ""]
    assert [s.stop for s in out] == [None, None, "Hello world"]
    assert det.output_text == "Hello "


def test_flush_releases_held_text(tok):
    ids = enc(tok, "Waiting for Hello wor")
    det = IncrementalDetokenizer(tok, stop=["Hello world"])
    emitted = "".join(s.text for s in stream(det, ids))
    assert emitted == "Waiting for "  # "Hello wor" may still become the stop
    assert det.flush() == "Hello wor"
    assert det.output_text == "Waiting for Hello wor"
    assert det.flush() == ""  # idempotent


def test_flush_with_stops_releases_pending_utf8_once(tok):
    ids = enc(tok, "Hello 🎉")[:-1]
    det = IncrementalDetokenizer(tok, stop=["Hello world"])
    emitted = "".join(s.text for s in stream(det, ids))
    assert emitted == ""  # "Hello" held, " \xf0\x9f" pending
    tail = det.flush()
    assert tail == tok.decode(ids)
    assert det.output_text == tok.decode(ids)  # nothing emitted twice
    assert det.stop_str is None


def test_flush_checks_stops_in_pending_utf8_text(tok):
    # Tokens "abc", " \xf0\x9f", "\x8e" (the emoji is cut short): the space is only ever
    # decoded together with the incomplete emoji, so the stop "c " is found at flush.
    ids = enc(tok, "abc 🎉")[:-1]
    assert tok.decode(ids[1:2]).startswith(" ")
    det = IncrementalDetokenizer(tok, stop=["c "])
    emitted = "".join(s.text for s in stream(det, ids))
    assert emitted == "ab" and det.stop_str is None  # "c" held, the rest pending
    assert det.flush() == ""
    assert det.stop_str == "c "
    assert det.output_text == "ab"


@pytest.mark.parametrize("chunk", [1, 1000])
def test_many_stop_strings(tok, chunk):
    rng = random.Random(1)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(4, 12)))
        for _ in range(499)
    ]
    stops = words + ["the secret word"]
    text = "Long text about nothing in particular, until the secret word appears here."
    assert not any(w in text for w in words)
    ids = enc(tok, text)
    det = IncrementalDetokenizer(tok, stop=stops)
    steps = stream(det, ids, chunk)
    assert "".join(s.text for s in steps) == "Long text about nothing in particular, until "
    assert [s.stop for s in steps if s.stop] == ["the secret word"]


def test_no_stop_found_output_equals_decode_with_stops_set(tok):
    for text in TEXTS:
        ids = enc(tok, text)
        det = IncrementalDetokenizer(tok, stop=["ZZZ never", "\n\n\n", "🎉🎉🎉"])
        emitted = "".join(s.text for s in stream(det, ids)) + det.flush()
        assert emitted == text
        assert det.stop_str is None


def test_empty_and_duplicate_stops_ignored(tok):
    ids = enc(tok, "abc def")
    det = IncrementalDetokenizer(tok, stop=["", "def", "def"])
    assert "".join(s.text for s in stream(det, ids)) == "abc "
    assert det.stop_str == "def"


def test_stop_matches_randomized_against_reference(tok):
    # Compare with a straightforward reference on random texts, stops and chunkings.
    rng = random.Random(2)
    alphabet = "ab ć🎉\n"
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(3)
        ]
        include = rng.random() < 0.5
        # Reference: the first stop to be completed reading left to right, longest on ties.
        best = None
        for s in stops:
            i = text.find(s)
            if i < 0:
                continue
            key = (i + len(s), -len(s))  # ends first, then longest
            if best is None or key < (best[0] + len(best[1]), -len(best[1])):
                best = (i, s)
        if best is None:
            want_text, want_stop = text, None
        else:
            want_text = text[: best[0] + (len(best[1]) if include else 0)]
            want_stop = best[1]
        ids = enc(tok, text)
        chunk = rng.choice([1, 2, 5, 100])
        det = IncrementalDetokenizer(tok, stop=stops, include_stop_str_in_output=include)
        steps = stream(det, ids, chunk)
        got = "".join(s.text for s in steps) + det.flush()
        assert (got, det.stop_str) == (want_text, want_stop), (text, stops, include, chunk)
        assert [s.stop for s in steps if s.stop] == ([want_stop] if want_stop else [])
        # Emitted text never runs ahead of what is certain.
        assert det.output_text == got


# --------------------------------------------------------------------- speed


def test_per_token_cost_is_small_and_flat(tok):
    ids = enc(tok, " ".join(TEXTS)) * 40
    det = IncrementalDetokenizer(tok)
    add = det.add_tokens
    t0 = time.perf_counter()
    for i in ids[: len(ids) // 2]:
        add([i])
    t1 = time.perf_counter()
    for i in ids[len(ids) // 2 :]:
        add([i])
    t2 = time.perf_counter()
    per_tok_first = (t1 - t0) / (len(ids) // 2)
    per_tok_second = (t2 - t1) / (len(ids) - len(ids) // 2)
    # Generous bounds (shared CI machines): a few microseconds expected.
    assert per_tok_first < 50e-6 and per_tok_second < 50e-6
    assert per_tok_second < 3 * per_tok_first + 5e-6  # no growth with output length
