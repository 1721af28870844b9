"""Layout plans: where a picture's objects go, written as text before it.

A plan names each object with the chess-board cell of its centre on an 8 × 8 board: column a–h from the left,
then row 1–8 from the top ("red circle b4, blue square f3."). The backbone writes the plan; `plan_entries`
reads it back from the tokens, so that a flow head with a plan input (`FlowHead`, `plan_input`) gets each
entry's states at its cell: colour and shape arrive together, where the object goes.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

BOARD_COLUMNS = "abcdefgh"
BOARD_SIZE = len(BOARD_COLUMNS)

# An entry may end with one word after its cell, a running count of the entries a question asks about
# ("blue square f3 one,").
_TALLY = r"(?:\s[a-z]+)?"
_CELL = re.compile(rf"(?<=\s)([{BOARD_COLUMNS}])([1-{BOARD_SIZE}])(?={_TALLY}[,.])")
_BREAK = re.compile(r"[,.;:!?\n]")
_ENTRY = rf"[^.,;:!?\n]*\s[{BOARD_COLUMNS}][1-{BOARD_SIZE}]{_TALLY}"
_PLAN_SENTENCE = re.compile(rf"(?:^|(?<=[.?!]))(?:{_ENTRY},)*{_ENTRY}\.")


def board_cell(x: float, y: float) -> str:
    """The cell of a point (x from the left, y from the top, both in [0, 1]): 'b3'."""
    column, row = (min(int(v * BOARD_SIZE), BOARD_SIZE - 1) for v in (x, y))
    return f"{BOARD_COLUMNS[column]}{row + 1}"


@dataclass(frozen=True)
class PlanEntry:
    """One object of a plan: its tokens, counted back from the end of the text it was read from (-1 is the
    last token), and the centre of its cell (x from the left, y from the top, in [0, 1])."""

    first: int
    last: int
    x: float
    y: float


def plan_entries(pieces: Sequence[str]) -> list[PlanEntry]:
    """The plan entries in a text given as the strings of its tokens, in order.

    An entry is a cell (a space, a column letter, a row digit, then ',' or '.', or a tally word and one of them)
    and the words before it back to the previous punctuation or the start of the text. Its tokens are those
    that hold any of its characters (a tally is not one of them)."""
    ends = list(itertools.accumulate(len(piece) for piece in pieces))
    text = "".join(pieces)
    breaks = [0] + [b.end() for b in _BREAK.finditer(text)]

    def token_at(char: int) -> int:
        return bisect.bisect_right(ends, char)

    entries = []
    for match in _CELL.finditer(text):
        begin = breaks[bisect.bisect_right(breaks, match.start()) - 1]
        while text[begin].isspace():
            begin += 1
        column, row = BOARD_COLUMNS.index(match.group(1)), int(match.group(2)) - 1
        entries.append(PlanEntry(first=token_at(begin) - len(pieces), last=token_at(match.end() - 1) - len(pieces),
                                 x=(column + 0.5) / BOARD_SIZE, y=(row + 0.5) / BOARD_SIZE))
    return entries


def without_plans(text: str) -> str:
    """The text without its plan sentences (those whose every comma-separated part ends with a cell), so that a
    reader of captions and story steps sees only the words around them."""
    return _PLAN_SENTENCE.sub("", text)
