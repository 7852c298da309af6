"""Token modality labels shared by calibration, statistics and the modality-aware solvers."""

from __future__ import annotations

from enum import IntEnum


class TokenKind(IntEnum):
    """What a calibration token is: the unit VEQ and MBQ weight their losses by.

    Stored as int8 masks `[T]`; vision tokens are image placeholders after the vision tower,
    prompt tokens the text the user sent, answer tokens the assistant's reply.
    """

    VISION = 0
    PROMPT = 1
    ANSWER = 2
