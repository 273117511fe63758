"""The seeded comparison every run reports: distilled set vs the random-real control.

A distillation method earns its place only if its images train a student better
than the same number of random real images under the same labels. With N
student seeds per set, `compare` adds to results.json

    gain_over_random          mean top-1 difference (distilled - random real), points
    gain_over_random_hard     the same with hard labels (a gain that vanishes with
                              fixed labels is a label effect, not a data effect)
    welch                     Welch's unequal-variance t-test on the per-seed top-1
                              values: {"t", "df", "p", "n"} for soft and hard labels

and `results_table` prints it. Pure functions of the results dict.
"""
from __future__ import annotations

import math
import statistics


def welch_test(a: list[float], b: list[float]) -> dict | None:
    """Two-sided Welch t-test of mean(a) != mean(b); None with fewer than 2 values per side."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    va, vb = statistics.variance(a), statistics.variance(b)
    na, nb = len(a), len(b)
    se2 = va / na + vb / nb
    if se2 == 0.0:  # identical runs on both sides: no spread to test against
        diff = statistics.fmean(a) - statistics.fmean(b)
        return {"t": math.copysign(math.inf, diff) if diff else 0.0, "df": float(na + nb - 2),
                "p": 0.0 if diff else 1.0, "n": [na, nb]}
    res = stats.ttest_ind(a, b, equal_var=False)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return {"t": float(res.statistic), "df": float(df), "p": float(res.pvalue), "n": [na, nb]}


def top1s(summary: dict | None, hard: bool = False) -> list[float]:
    if not summary:
        return []
    if hard:
        return list((summary.get("hard") or {}).get("top1s", []))
    return [r["top1"] for r in summary.get("runs", [])]


def compare(results: dict) -> dict:
    """Add gains and Welch tests (soft and hard labels) to a results dict; returns it."""
    d, r = results.get("distilled"), results.get("random_real")
    if not d or not r:
        return results
    welch = {}
    for key, hard in (("soft", False), ("hard", True)):
        a, b = top1s(d, hard), top1s(r, hard)
        if a and b:
            results["gain_over_random" + ("_hard" if hard else "")] = statistics.fmean(a) - statistics.fmean(b)
            test = welch_test(a, b)
            if test is not None:
                welch[key] = test
    if welch:
        results["welch"] = welch
    return results


def cell(summary: dict | None, hard: bool = False) -> str:
    vals = top1s(summary, hard)
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} +- {statistics.stdev(vals):.2f}"


def results_table(results: dict) -> str:
    """A short markdown table of results.json: top-1 mean +- std over seeds, soft and hard labels."""
    proto = results.get("protocol", {})
    seeds = proto.get("seeds", [])
    lines = [f"{results.get('method')} IPC {results.get('ipc')}, {results.get('num_classes')} classes, "
             f"labels {proto.get('label_mode')}, {len(seeds)} student seed(s)",
             f"| set | top-1 % ({proto.get('label_mode')}) | top-1 % (hard) | top-5 % |", "|---|---:|---:|---:|"]
    for name, key in (("teacher", "teacher"), ("full data", "full_data")):
        if results.get(key):
            lines.append(f"| {name} | {results[key]['top1']:.2f} | | {results[key].get('top5', float('nan')):.2f} |")
    for name, key in (("distilled", "distilled"), ("random real", "random_real")):
        s = results.get(key)
        if s:
            top5 = s.get("top5_mean", s.get("top5"))
            lines.append(f"| {name} | {cell(s)} | {cell(s, hard=True)} | {top5:.2f} |")
    for key, label in (("soft", proto.get("label_mode")), ("hard", "hard")):
        gain = results.get("gain_over_random" + ("_hard" if key == "hard" else ""))
        if gain is None:
            continue
        test = (results.get("welch") or {}).get(key)
        extra = f" (Welch t-test p = {test['p']:.3g}, n = {test['n'][0]}+{test['n'][1]})" if test else ""
        lines.append(f"gain over random real, {label} labels: {gain:+.2f} points{extra}")
    return "\n".join(lines)
