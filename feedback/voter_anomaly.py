"""How unlike an honest voter a session votes: an online anomaly score, pure logic.

Chatbot Arena's outlier test asks, per voter, how likely their votes are under the outcome
rates every other voter established for the same pairs. Here each vote on a pair with an
established record (at least MIN_PAIR_VOTES votes) is scored against that pair's outcome
rates P = (a wins, b wins, tie, both bad) as shown, Laplace-smoothed, by three tests; each
sums per-vote terms whose mean and variance under an honest voter are known from P, and
standardises the sum (z, normal approximation), so it reads the same whatever the pairs:

1. surprise: -ln P(outcome); honest mean H(P), variance sum P (ln P)^2 - H^2. A voter who
   picks at random or against the crowd collects more (one-sided).
2. agreement, decisive votes only: ln(2 q_chosen) with q = P(a) / (P(a) + P(b)). An honest
   voter gains it in proportion to how lopsided the pairs are; a random picker does not
   (one-sided, too little is anomalous).
3. side: how often side a was picked among decisive votes against sum q (1/2 where the rates
   are not established), two-sided. Always "a" is the cheapest way to stuff votes and is
   invisible to the other two on even pairs.

The score is -log10 of the smallest p-value times three (Bonferroni); a session is flagged at
FLAG_SCORE (p < 0.001). Signals that only add, and never flag on their own (the simulated
crowd is fast and honest): the share of votes cast faster than the two answers can be read
(READ_WORDS_PER_S) and of bursts (votes less than BURST_GAP_S apart), ADD_* at most each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy.stats import norm

MIN_PAIR_VOTES = 30  # a pair's outcome rates count as established from here on
MIN_SCORED_VOTES = 5  # the outcome test speaks only after this many votes on such pairs
MIN_SIDED_VOTES = 8  # the side test speaks only after this many decisive votes
PRIOR = 1.0  # Laplace smoothing of the outcome rates (pseudo-votes per outcome)
FLAG_SCORE = 3.0  # -log10 p: flagged below p = 0.001 (after the two-test correction)
READ_WORDS_PER_S = 25.0  # faster than anyone reads (skimming is ~10 words/s)
BURST_GAP_S = 1.0
ADD_FAST = 0.25  # at most this much score for voting faster than reading, every time
ADD_BURST = 0.25
MAX_SCORE = 50.0  # the score is capped: beyond it every p-value is 0 in floating point


@dataclass
class VoterStats:
    """A session's running sums (all that the score needs; kept per session in Redis)."""

    votes: int = 0
    scored: int = 0  # votes on pairs with established rates
    surprise: float = 0.0  # sum of -ln P(outcome)
    expected: float = 0.0  # sum of H(P)
    variance: float = 0.0  # sum of Var[-ln P(outcome)]
    agreement: float = 0.0  # sum over decisive scored votes of ln(2 q_chosen)
    agreement_expected: float = 0.0  # its expectation for an honest voter
    agreement_variance: float = 0.0
    decisive: int = 0  # votes for a or b
    side_a: int = 0  # of those, for a
    side_expected: float = 0.0  # sum of P(a | decisive) under the pairs' rates
    side_variance: float = 0.0  # sum of P(1 - P)
    fast: int = 0  # votes cast faster than the answers can be read
    bursts: int = 0  # votes within BURST_GAP_S of the session's previous vote
    last_voted_at: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


OUTCOMES = ("a", "b", "tie", "both_bad")
OUTCOME_INDEX = {outcome: i for i, outcome in enumerate(OUTCOMES)}
Rates = tuple[float, ...]  # P(outcome) in OUTCOMES order


def outcome_rates(*counts: float) -> Rates | None:
    """Smoothed P(outcome) of an ordered pair from its counts per outcome (OUTCOMES order,
    sides as shown); None while the pair has too few votes."""
    total = sum(counts)
    if total < MIN_PAIR_VOTES:
        return None
    return tuple((n + PRIOR) / (total + len(counts) * PRIOR) for n in counts)


def add_vote(stats: VoterStats, winner: str, rates: Rates | None,
             reading_s: float, words: int, voted_at: float) -> VoterStats:
    """The stats after one more vote. `rates`: outcome_rates of its pair (None: not
    established, or a version against itself); `reading_s`: from the answers to the vote;
    `words`: of the two answers."""
    stats.votes += 1
    if rates is not None:
        p = rates[OUTCOME_INDEX[winner]]
        entropy = -sum(q * math.log(q) for q in rates)
        stats.scored += 1
        stats.surprise += -math.log(p)
        stats.expected += entropy
        stats.variance += sum(q * math.log(q) ** 2 for q in rates) - entropy**2
    if winner in ("a", "b") and rates is not None:
        q = rates[0] / (rates[0] + rates[1])  # P(a | decisive) with the crowd
        gain_a, gain_b = math.log(2 * q), math.log(2 * (1 - q))
        mean = q * gain_a + (1 - q) * gain_b
        stats.agreement += gain_a if winner == "a" else gain_b
        stats.agreement_expected += mean
        stats.agreement_variance += q * gain_a**2 + (1 - q) * gain_b**2 - mean**2
    if winner in ("a", "b"):
        q = rates[0] / (rates[0] + rates[1]) if rates is not None else 0.5
        stats.decisive += 1
        stats.side_a += winner == "a"
        stats.side_expected += q
        stats.side_variance += q * (1 - q)
    if reading_s < words / READ_WORDS_PER_S:
        stats.fast += 1
    if stats.last_voted_at and voted_at - stats.last_voted_at < BURST_GAP_S:
        stats.bursts += 1
    stats.last_voted_at = max(stats.last_voted_at, voted_at)
    return stats


def outcome_p_value(stats: VoterStats) -> float:
    """One-sided: P(an honest voter collects at least this much surprise)."""
    if stats.scored < MIN_SCORED_VOTES or stats.variance <= 0:
        return 1.0
    z = (stats.surprise - stats.expected) / math.sqrt(stats.variance)
    return float(norm.sf(z))


def agreement_p_value(stats: VoterStats) -> float:
    """One-sided: P(an honest voter agrees this little with the crowd on decisive votes)."""
    if stats.decisive < MIN_SIDED_VOTES or stats.agreement_variance <= 1e-12:
        return 1.0
    z = (stats.agreement - stats.agreement_expected) / math.sqrt(stats.agreement_variance)
    return float(norm.cdf(z))


def side_p_value(stats: VoterStats) -> float:
    """Two-sided: P(an honest voter picks side a at least this far from expected)."""
    if stats.decisive < MIN_SIDED_VOTES or stats.side_variance <= 0:
        return 1.0
    z = (stats.side_a - stats.side_expected) / math.sqrt(stats.side_variance)
    return float(2 * norm.sf(abs(z)))


def anomaly_score(stats: VoterStats) -> float:
    """-log10 of the smallest of the three tests' p-values (x3), plus the add-only signals."""
    p = min(1.0, 3 * min(outcome_p_value(stats), agreement_p_value(stats),
                         side_p_value(stats)))
    score = min(MAX_SCORE, -math.log10(max(p, 10 ** -MAX_SCORE)))
    if stats.votes:
        score += ADD_FAST * stats.fast / stats.votes + ADD_BURST * stats.bursts / stats.votes
    return score


def is_flagged(score: float) -> bool:
    return score >= FLAG_SCORE
