"""Two settings compared over seeds: Welch's t-test, the 95% interval of the
difference, and the smallest difference the seeds could have detected.

    >>> r = welch([27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0,
    ...            21.7, 21.4], [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9,
    ...            22.1, 22.9, 20.5, 24.4])
    >>> round(r["t"], 2), round(r["df"], 1), round(r["p"], 3)
    (-2.46, 25.0, 0.021)

The standard library only (docs/figures.py prints tables without torch).
"""
import math
import statistics

def welch(a, b, level=0.95, power=0.8):
    """mean(a) - mean(b) of two samples, their variances not assumed equal: a dict with
    diff, its interval (low, high) at `level`, t, the Welch-Satterthwaite df, the
    two-sided p, and detectable: the smallest true difference this test finds with
    probability `power` at 1 - level, for the same spread and seeds."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff = statistics.fmean(a) - statistics.fmean(b)
    half = t_quantile(0.5 + level / 2, df) * se
    return dict(diff=diff, low=diff - half, high=diff + half, t=diff / se, df=df,
                p=2 * (1 - t_cdf(abs(diff) / se, df)),
                detectable=(t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * se)

def seeds_needed(a, b, difference, level=0.95, power=0.8, most=1000):
    """The fewest seeds per arm with which welch() would detect `difference`, if the two
    settings keep the spreads of a and b (most + 1: not within most seeds)."""
    va, vb = statistics.variance(a), statistics.variance(b)
    for n in range(2, most + 1):
        se, df = math.sqrt((va + vb) / n), (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2)
        if (t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * se <= difference:
            return n
    return most + 1

def one_sample(x, level=0.95):
    """mean(x) against 0 (Student's t, n - 1 df): a dict with mean, its interval (low,
    high) at `level`, and the two-sided p; for the seeds' gain over one fixed start."""
    n, mean = len(x), statistics.fmean(x)
    se = statistics.stdev(x) / math.sqrt(n)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return dict(mean=mean, low=mean - half, high=mean + half,
                p=2 * (1 - t_cdf(abs(mean) / se, n - 1)) if se else 0.0 if mean else 1.0)

def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (df > 0, not only integers)."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail

def t_quantile(p, df):
    """The t with t_cdf(t, df) = p, by bisection.

    >>> round(t_quantile(0.975, 10), 3), round(t_quantile(0.975, 4), 3), round(t_quantile(0.8, 8), 3)
    (2.228, 2.776, 0.889)
    """
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2

def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction
    (modified Lentz), on the side of x where that converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    def nonzero(v):  # Lentz's guard against a zero denominator
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 400):
        for step in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),             # even terms
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd terms
            d, c = 1 / nonzero(1 + step * d), nonzero(1 + step / c)
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h * math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                        + a * math.log(x) + b * math.log(1 - x)) / a
