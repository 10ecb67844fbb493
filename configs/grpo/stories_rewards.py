"""A reward the 260K-parameter stories model learns in a few dozen CPU steps (the share of a completion's
words that are happy ones), for configs/stories260k-grpo.yaml. Called as TRL calls a reward function."""

import re

HAPPY = {"happy", "smiled", "smile", "fun", "love", "loved", "good", "great", "laughed", "played", "friends"}


def happy_words(completions, **kwargs):
    """[N] floats in [0, 1]: the fraction of each completion's words in `HAPPY`."""
    out = []
    for text in completions:
        words = re.findall(r"[a-z]+", text.lower())
        out.append(sum(w in HAPPY for w in words) / max(len(words), 1))
    return out
