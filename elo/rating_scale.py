"""The rating scale every rating in the arena is on (Elo's): a difference of SCALE points is
a factor BASE in the odds of winning, +400 points = 10:1; a new version, and the anchored base
model, start at INITIAL_RATING."""

SCALE = 400.0
BASE = 10.0
INITIAL_RATING = 1000.0
