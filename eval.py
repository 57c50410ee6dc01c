"""eval.py: batched evaluation (generation part lands later)."""

import math
import operator


def _as_int(name, value):
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # ints and numpy ints, not floats
    except TypeError:
        raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}") from None


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. 2021: 1 - C(n-c, k) / C(n, k).

    n samples were drawn for a problem and c of them are correct; the result is the
    chance that at least one of k samples (drawn without replacement) is correct.
    The binomial ratio is computed as prod_{i=n-c+1..n} (1 - k/i), which never builds
    the huge binomials and so stays exact-ish for large n.
    """
    n, c, k = _as_int("n", n), _as_int("c", c), _as_int("k", k)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    prob_all_wrong = math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    return 1.0 - prob_all_wrong
