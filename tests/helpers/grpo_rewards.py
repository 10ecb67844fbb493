"""Reward functions imported by name (`tests.helpers.grpo_rewards:<function>`) in tests/test_grpo.py, as a
user's `package.module:function` reward would be."""


def token_parity(completion_ids, prompts, answer, **kwargs):
    """Reads three of TRL's arguments: 1.0 for an even-length completion, 0.0 for odd; None (not
    applicable) for an odd one of a row without an answer."""
    out = []
    for ids, prompt, a in zip(completion_ids, prompts, answer, strict=True):
        odd = len(ids) % 2 == 1
        out.append(None if odd and a is None else float(not odd) + 0.01 * len(prompt))
    return out


def first_letter(completions):
    """No **kwargs: jaxlora passes only the arguments a function names."""
    return [float(c[:1].isalpha()) for c in completions]


def broken(prompts, **kwargs):
    """Raises on one row only (prompt "p2"), so the error can name it."""
    return [1.0 / (p != "p2") for p in prompts]


def too_few(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def not_a_number(completions, **kwargs):
    return ["high"] * len(completions)
