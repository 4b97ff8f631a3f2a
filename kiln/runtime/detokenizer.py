"""Incremental detokenization and stop-string detection for streamed output.

One :class:`IncrementalDetokenizer` lives for one request.  Every engine step hands it the
newly sampled token ids; it answers with the text that may now be sent to the client and,
when a stop string was completed, which one (the request is then finished).

Decoding uses the prefix_offset / read_offset technique (as in vLLM and TGI): only the
tokens since the last emitted text, plus the short "prefix" window before them, are decoded
each step, so the cost of a step does not depend on how long the output already is.
Byte-level BPE splits multi-byte UTF-8 characters (emoji, CJK) over several tokens; while
the window decodes to text ending in U+FFFD (an incomplete sequence) nothing is emitted,
and the whole character is emitted once the tokens that complete it arrive.

Stop strings may span token boundaries.  Text at the end that could still be the
beginning of a stop string is held back until later text shows it is not one (or until
:meth:`IncrementalDetokenizer.flush`).  Matching only looks at the held-back text plus the
new text: already emitted text can never be part of a future match, because it was only
emitted once no stop string could begin in it.

Which stop string wins when several match: the one completed first, reading the text left
to right; among those completed at the same character, the one that starts earliest (the
longest).  This is exactly what streaming one character at a time would find, so the
result does not depend on how the tokens are grouped into ``add_tokens`` calls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

_REPLACEMENT = "\ufffd"


@dataclass
class DetokenizerStep:
    text: str  # new text that is now safe to emit to the client
    # the stop string matched in this step (the request is then finished), else None
    stop: str | None


@dataclass(frozen=True)
class _StopMatcher:
    """Precomputed lookup tables for one set of stop strings (shared between requests)."""

    by_last_char: dict[str, tuple[str, ...]]  # last char -> stops ending in it, longest first
    first_chars: frozenset[str]  # first chars of all stops
    prefixes: frozenset[str]  # every non-empty proper prefix of every stop
    max_prefix_len: int  # len(longest stop) - 1


@functools.lru_cache(maxsize=256)
def _build_matcher(stops: tuple[str, ...]) -> _StopMatcher:
    by_last: dict[str, list[str]] = {}
    prefixes: set[str] = set()
    for s in stops:
        by_last.setdefault(s[-1], []).append(s)
        for k in range(1, len(s)):
            prefixes.add(s[:k])
    return _StopMatcher(
        by_last_char={c: tuple(sorted(v, key=len, reverse=True)) for c, v in by_last.items()},
        first_chars=frozenset(s[0] for s in stops),
        prefixes=frozenset(prefixes),
        max_prefix_len=max(len(s) for s in stops) - 1,
    )


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text, cutting at stop strings."""

    __slots__ = (
        "_tokenizer",
        "_skip_special",
        "_include_stop",
        "_context_free",
        "_ids",
        "_read_offset",
        "_prefix_text",
        "_matcher",
        "_held",
        "_chunks",
        "_output_cache",
        "_stop_str",
        "_finished",
    )

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._include_stop = include_stop_str_in_output
        # A plain byte-level decoder maps every token to its bytes independently, so the
        # text of the prefix window is exactly the text emitted for it: no need to decode
        # it a second time.  Other decoders (Metaspace, WordPiece, ...) look at context.
        self._context_free = isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel)

        # Only the token window starting at prefix_offset is kept (older ids are dropped),
        # so prefix_offset is always 0 in _ids; read_offset indexes into it.
        self._ids: list[int] = []
        self._read_offset = 0
        self._prefix_text = ""  # decode(_ids[:read_offset])

        stops = tuple(dict.fromkeys(s for s in stop if s))  # drop empties and duplicates
        self._matcher = _build_matcher(stops) if stops else None
        self._held = ""  # decoded text withheld because it may begin a stop string

        self._chunks: list[str] = []
        self._output_cache: str | None = ""
        self._stop_str: str | None = None
        self._finished = False

    # ------------------------------------------------------------------ public API

    @property
    def output_text(self) -> str:
        """All text emitted so far (held-back text is not included)."""
        if self._output_cache is None:
            self._output_cache = "".join(self._chunks)
            self._chunks = [self._output_cache] if self._output_cache else []
        return self._output_cache

    @property
    def finished(self) -> bool:
        """True once a stop string matched (or after flush): nothing more will be emitted."""
        return self._finished

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the output, if any."""
        return self._stop_str

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerStep:
        """Consume newly generated tokens; return the text that is safe to emit now."""
        if self._finished or not token_ids:
            return DetokenizerStep("", None)
        ids = self._ids
        if len(token_ids) == 1:
            ids.append(token_ids[0])
            new_text = self._decode_step()
        else:
            # Try the whole group at once; if it ends in an incomplete character, go token
            # by token so that the complete text before it is not held back with it.
            before = len(ids)
            ids.extend(token_ids)
            new_text = self._decode_step()
            if len(ids) > self._read_offset:  # something pending: redo one at a time
                del ids[before:]
                pieces = [new_text]  # empty: nothing was emitted by the failed attempt
                for t in token_ids:
                    ids.append(t)
                    pieces.append(self._decode_step())
                new_text = "".join(pieces)
        if not new_text:
            return DetokenizerStep("", None)
        if self._matcher is None:
            self._emit(new_text)
            return DetokenizerStep(new_text, None)
        return self._check_stops(new_text)

    def flush(self) -> str:
        """End of a request that did not stop on a string: release everything held back.

        Tokens still waiting for the rest of a UTF-8 character are decoded as they are
        (with U+FFFD), then checked for stop strings like any other text.
        """
        if self._finished:
            return ""
        ids = self._ids
        text = ""
        if len(ids) > self._read_offset:
            full = self._decode(ids)
            text = full[len(self._prefix_text) :] if full.startswith(self._prefix_text) else full
            self._ids = []
            self._read_offset = 0
            self._prefix_text = ""
        if self._matcher is not None:
            emitted = self._check_stops(text).text if text else ""  # _check_stops emits it
            if self._finished:
                return emitted
            held, self._held = self._held, ""
            self._finished = True
            if held:
                self._emit(held)
            return emitted + held
        self._finished = True
        if text:
            self._emit(text)
        return text

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_step(self) -> str:
        """Decode the window after new ids were appended; return newly completed text."""
        ids = self._ids
        prefix_text = self._prefix_text
        new_full = self._decode(ids)  # prefix window + unread tokens
        if new_full.endswith(_REPLACEMENT):
            return ""  # an incomplete UTF-8 sequence at the end: wait for more tokens
        if not self._context_free and len(new_full) <= len(prefix_text):
            return ""
        # (context-free: new_full == prefix_text + delta; an empty delta, e.g. a skipped
        # special token, still slides the window so that it cannot grow.)
        delta = new_full[len(prefix_text) :]
        # Slide the window: the tokens just read become the new prefix.
        read = self._read_offset
        if read:
            del ids[:read]
        self._read_offset = len(ids)
        self._prefix_text = delta if self._context_free else self._decode(ids)
        return delta

    def _emit(self, text: str) -> None:
        self._chunks.append(text)
        self._output_cache = None

    def _check_stops(self, new_text: str) -> DetokenizerStep:
        m = self._matcher
        held = self._held
        buf = held + new_text if held else new_text
        by_last = m.by_last_char
        # A new match must end inside the new text; the first one to end wins.
        for end, c in enumerate(new_text, len(held) + 1):
            cands = by_last.get(c)
            if cands is None:
                continue
            for s in cands:  # longest first: earliest start among those ending here
                if buf.endswith(s, 0, end):
                    cut = end if self._include_stop else end - len(s)
                    text = buf[:cut]
                    self._held = ""
                    self._finished = True
                    self._stop_str = s
                    self._ids = []
                    if text:
                        self._emit(text)
                    return DetokenizerStep(text, s)
        # No match: hold back the longest suffix that is a proper prefix of some stop.
        n = len(buf)
        j = n - m.max_prefix_len
        if j < 0:
            j = 0
        first_chars = m.first_chars
        prefixes = m.prefixes
        split = n
        while j < n:
            if buf[j] in first_chars and buf[j:] in prefixes:
                split = j
                break
            j += 1
        self._held = buf[split:]
        text = buf[:split]
        if text:
            self._emit(text)
        return DetokenizerStep(text, None)
