#!/usr/bin/env python3
"""Checks a `prunekit transfer` report (--json) against the stability criteria and finds
where the dense model overtakes the pruned ones, with the seeds' spread.

1. Divergence: no run (search or final) stopped as diverged, i.e. no training loss went
   non-finite or above 10x the run's first loss (transfer stops a run there).
2. Monotone in compute: for every model and every budget B run with 2B, the mean error at
   2B is not above the mean at B by more than two standard errors (of the difference).
3. Crossovers, measured (no fitted law): for each pruned model, the smallest budget from
   which the dense model's mean error is below the pruned model's at that budget and at
   every larger one; and the budget from which dense is the compute-optimal model at every
   larger budget. The spread: 2000 bootstrap resamples of the seeds (with replacement,
   within each model and budget), the crossover recomputed on each: its 5th, 50th and
   95th percentiles, and the share of resamples in which dense overtakes at all within the
   budgets run.

    python3 scripts/transfer_check.py REPORT.json [--json OUT.json]

Standard library only. Exit status 1 when a criterion of 1 or 2 fails.
"""
import argparse
import json
import math
import random


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def errors(report):
    """{model: {budget: [every finished seed's error]}} and the models in report order."""
    out, order = {}, []
    for r in report["rows"]:
        if r["model"] not in out:
            order.append(r["model"])
        out.setdefault(r["model"], {})[r["budget_gflops"]] = list(r["val_errors"])
    return out, order


def crossover(curve_dense, curve_other, budgets):
    """The smallest budget from which dense is below `other` at it and every larger budget."""
    found = None
    for b in reversed(budgets):
        if curve_dense[b] < curve_other[b]:
            found = b
        else:
            break
    return found


def dense_optimal_from(curves, budgets):
    best = {b: min(curves, key=lambda m: curves[m][b]) for b in budgets}
    found = None
    for b in reversed(budgets):
        if best[b] == "dense":
            found = b
        else:
            break
    return found


def pct(xs, q):
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * q)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--json")
    ap.add_argument("--resamples", type=int, default=2000)
    a = ap.parse_args()
    report = json.load(open(a.report))
    errs, models = errors(report)
    budgets = sorted({b for m in errs for b in errs[m]})
    result = {"report": a.report}
    ok = True

    runs = report.get("runs", [])
    div = [r for r in runs if r.get("diverged")]
    print(f"1. divergence: {len(div)} of {len(runs)} runs diverged "
          f"({sum(r['kind'] == 'search' for r in div)} search, {sum(r['kind'] == 'final' for r in div)} final)")
    for r in div[:10]:
        print(f"   {r['kind']} {r['model']} budget {r['budget_gflops']} seed {r['seed']} lr {r['lr']}: {r['diverged']}")
    result["runs"], result["diverged"] = len(runs), len(div)
    ok &= not div

    print("2. mean error at 2B within two standard errors of the mean at B:")
    violations = []
    for m in models:
        line = []
        for b in budgets:
            if b not in errs[m] or 2 * b not in errs[m] or not errs[m][b] or not errs[m][2 * b]:
                continue
            x, y = errs[m][b], errs[m][2 * b]
            se = math.sqrt(std(x) ** 2 / len(x) + std(y) ** 2 / len(y))
            fine = mean(y) <= mean(x) + 2 * se
            line.append(f"{b:g}->{2 * b:g} {mean(x):.3f}->{mean(y):.3f}{'' if fine else ' FAIL'}")
            if not fine:
                violations.append({"model": m, "budget": b, "mean_b": mean(x), "mean_2b": mean(y), "two_se": 2 * se})
        print(f"   {m}: " + "; ".join(line))
    print(f"   violations: {len(violations)}")
    result["violations"] = violations
    ok &= not violations

    print("3. crossovers (measured; seeds bootstrapped):")
    rng = random.Random(0)
    means = {m: {b: mean(errs[m][b]) for b in budgets if errs[m].get(b)} for m in models}
    complete = [m for m in models if all(b in means[m] for b in budgets)]
    result["crossovers"] = []
    if "dense" not in complete:
        print("   no dense model at every budget: nothing to cross")
    else:
        targets = [(m, m) for m in complete if m != "dense"] + [("the best pruned model", None)]
        for label, m in targets:

            def find(curves):
                if m is None:
                    return dense_optimal_from(curves, budgets)
                return crossover(curves["dense"], curves[m], budgets)

            point = find(means)
            boot = []
            for _ in range(a.resamples):
                curves = {mm: {b: mean([rng.choice(errs[mm][b]) for _ in errs[mm][b]]) for b in budgets}
                          for mm in complete}
                boot.append(find(curves))
            hits = [b for b in boot if b is not None]
            share = len(hits) / len(boot)
            spread = (pct(hits, 0.05), pct(hits, 0.5), pct(hits, 0.95)) if hits else None
            what = f"dense below {label}" if m else "dense compute-optimal"
            if point is None:
                print(f"   {what}: not within the budgets run (up to {budgets[-1]:g} GFLOPs); "
                      f"in {100 * share:.0f}% of resamples it is" + (f" (median {spread[1]:g})" if spread else ""))
            else:
                print(f"   {what} from {point:g} GFLOPs on; resamples: 5/50/95% at "
                      f"{spread[0]:g}/{spread[1]:g}/{spread[2]:g} GFLOPs, {100 * share:.0f}% of them cross")
            result["crossovers"].append({"against": label, "from_budget": point, "share_crossing": share,
                                         "p05_p50_p95": spread})
    result["ok"] = ok
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
