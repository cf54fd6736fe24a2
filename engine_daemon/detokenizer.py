"""Incremental detokenization with stop strings that may span token boundaries.

Text is released only when it is whole (no dangling UTF-8 bytes) and cannot still turn into
the start of a stop string: the last ``longest stop - 1`` characters are held back until the
next token or the end of the request.
"""

from __future__ import annotations

from engine_daemon.sequence import Sequence
from engine_daemon.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what a byte-level decoder yields for an unfinished UTF-8 sequence


def append_token_text(seq: Sequence, tokenizer: Tokenizer | None) -> bool:
    """Decode the newest output token into seq.text; True when a stop string ended the text."""
    if tokenizer is None:
        return False
    ids = seq.output_ids
    prefix_text = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset])
    full_text = tokenizer.decode(ids[seq.prefix_offset :])
    if full_text.endswith(_INCOMPLETE) or len(full_text) <= len(prefix_text):
        return False  # wait for the rest of a multi-byte character
    searched_from = max(0, len(seq.text) - _longest_stop(seq) + 1)
    seq.text += full_text[len(prefix_text) :]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    for stop in seq.params.stop:
        at = seq.text.find(stop, searched_from)
        if at != -1:
            seq.text = seq.text[:at]
            return True
    return False


def take_new_text(seq: Sequence, finished: bool) -> str:
    """The text not yet handed out; holds back a possible stop-string prefix until finished."""
    hold = 0 if finished else max(0, _longest_stop(seq) - 1)
    upto = max(seq.emitted_chars, len(seq.text) - hold)
    new = seq.text[seq.emitted_chars : upto]
    seq.emitted_chars = upto
    return new


def _longest_stop(seq: Sequence) -> int:
    return max((len(s) for s in seq.params.stop), default=0)


def resume(seq: Sequence, token_ids: list[int], sent_text: str | None, tokenizer: Tokenizer | None) -> None:
    """Set up a sequence that continues after tokens another engine already delivered.

    The text is rebuilt up to the last token that ends on a whole character; the bytes of an
    unfinished character stay undecoded, so they come out with the next token, as they would
    have. Of that text, only ``sent_text`` counts as handed out (a stop-string hold-back or a
    split character may have kept the rest from the client).
    """
    seq.output_ids = list(token_ids)
    whole = len(token_ids)
    text = ""
    if tokenizer is not None:
        while whole > 0:
            text = tokenizer.decode(token_ids[:whole])
            if not text.endswith(_INCOMPLETE):
                break
            whole -= 1
        if whole == 0:
            text = ""
    seq.text = text
    seq.prefix_offset = seq.read_offset = whole
    delivered = len(text) if sent_text is None else len(sent_text)
    if sent_text is not None and not text.startswith(sent_text):
        delivered = 0  # cannot happen with one tokenizer; resend the whole text rather than lose any
    seq.emitted_chars = min(delivered, len(text))
