"""The bid an interruptible host places, the same rule for every provider that rents by bid."""
from __future__ import annotations

import math

# A bid exactly at the minimum is outbid by the next renter who matches it; a small margin above
# the minimum (capped at max_bid) keeps the machine a little longer for little money.
BID_MARGIN = 0.05


def choose_bid(min_bid: float | None, max_bid: float | None) -> float | None:
    """The bid for an offer: its minimum plus BID_MARGIN, rounded up to 0.0001 per hour and capped
    at max_bid; None when the offer cannot be bid on (no minimum, or a minimum above max_bid)."""
    if min_bid is None or not min_bid > 0:
        return None
    if max_bid is not None and min_bid > max_bid:
        return None
    bid = math.ceil(min_bid * (1.0 + BID_MARGIN) * 10_000 - 1e-6) / 10_000
    return min(bid, max_bid) if max_bid is not None else bid
