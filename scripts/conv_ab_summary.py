#!/usr/bin/env python3
"""Summarise alternating A/B rounds of conv-bench (A = before, B = after) and PyTorch.

    scripts/conv_ab_summary.py DIR TAG [TAG ...]   (files DIR/{A,B,T}-TAG-ROUND.json)

Per (mode, sparsity, layer, pass): the median over the rounds of A's ms, B's ms and torch's
ms (torch timed on the same shapes right after A and B in each round), the ratios
torch/A and torch/B (above 1: prunekit is faster), and B's speedup A/B. Prints a markdown
table per tag, the rows below 0.5x, and geometric means per pass and overall (also over
the minimum of the rounds, the least disturbed run of each side on a shared machine).
"""
import glob, json, math, statistics as st, sys, collections

def load(d, kind, tag):
    out = collections.defaultdict(list)
    for f in sorted(glob.glob(f"{d}/{kind}-{tag}-*.json")):
        for r in json.load(open(f)):
            key = (r.get("mode", "filters"), r["sparsity"], r["layer"], r["pass"])
            out[key].append(r["torch_ms"] if kind == "T" else r["ms"])
            out[key + ("row",)] = r
    return out

def gm(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")

d = sys.argv[1]
for tag in sys.argv[2:]:
    A, B, T = load(d, "A", tag), load(d, "B", tag), load(d, "T", tag)
    keys = [k for k in A if len(k) == 4 and k in B and k in T]
    nr = min(len(A[k]) for k in keys)
    print(f"\n### {tag} ({nr} rounds, medians)\n")
    print("| mode | sparsity | layer | pass | c | k | h | rxs/stride | before ms | after ms | torch ms | before x | after x | speedup |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    res, mins = [], []
    for k in keys:
        r = A[k + ("row",)]
        a, b, t = st.median(A[k]), st.median(B[k]), st.median(T[k])
        res.append((k, r, a, b, t))
        mins.append((min(A[k]), min(B[k]), min(T[k])))
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {r['c']} | {r['k']} | {r['h']} | {r['r']}x{r['s']}/{r['stride']} | {a:.2f} | {b:.2f} | {t:.2f} | {t/a:.2f} | {t/b:.2f} | {a/b:.2f} |")
    mn = lambda f: gm([f(*m) for m in mins])
    print(f"\nMinimum over the rounds instead of the median (least disturbed run of each side): geomean vs oneDNN "
          f"before {mn(lambda a, b, t: t / a):.2f}, after {mn(lambda a, b, t: t / b):.2f}, speedup {mn(lambda a, b, t: a / b):.2f}")
    print()
    for lbl, sel in [("all", res)] + [(p, [x for x in res if x[0][3] == p]) for p in ("fprop", "dgrad", "wgrad")] + \
            [(f"{m} s={s}", [x for x in res if (x[0][0], x[0][1]) == (m, s)]) for m, s in sorted({(x[0][0], x[0][1]) for x in res})]:
        if sel:
            print(f"- {tag} {lbl}: geomean vs oneDNN before {gm([t/a for _,_,a,_,t in sel]):.2f}, after {gm([t/b for _,_,_,b,t in sel]):.2f}; "
                  f"geomean speedup {gm([a/b for _,_,a,b,_ in sel]):.2f}; total ms before {sum(a for _,_,a,_,_ in sel):.1f}, after {sum(b for _,_,_,b,_ in sel):.1f}, torch {sum(t for *_,t in sel):.1f} ({len(sel)} rows)")
    # Rows whose code path the change left alone are the control group: their speedup is the
    # run-to-run drift of a shared machine (the classification is that of the conv2 branch's change).
    def touched(r, p):
        pointwise = r["r"] == 1 and r["s"] == 1 and r["stride"] == 1 and r["pad"] == 0
        if pointwise:
            return False
        if p == "dgrad":
            flip = r["stride"] == 1 and r["r"] == r["s"] and r["pad"] < r["r"] and r["n"] * r["h"] * r["w"] >= 4 * r["k"]
            return flip
        return True
    ch = [x for x in res if touched(x[1], x[0][3])]
    un = [x for x in res if not touched(x[1], x[0][3])]
    if ch and un:
        g_ch, g_un = gm([a / b for _, _, a, b, _ in ch]), gm([a / b for _, _, a, b, _ in un])
        print(f"- {tag} changed paths (im2col users, flipped dgrad): geomean speedup {g_ch:.2f} ({len(ch)} rows); "
              f"untouched paths (1x1 stride 1, scatter dgrad): {g_un:.2f} ({len(un)} rows, the drift); "
              f"changed relative to untouched: {g_ch / g_un:.2f}")
    lo_a = [x for x in res if x[4] / x[2] < 0.5]
    lo_b = [x for x in res if x[4] / x[3] < 0.5]
    print(f"\n- below 0.5x oneDNN before: {len(lo_a)}: " + ", ".join(f"{k[0][0]} s={k[1]} {k[2]} {k[3]} ({t/a:.2f})" for k,_,a,_,t in [(x[0],x[1],x[2],x[3],x[4]) for x in lo_a]))
    print(f"- below 0.5x oneDNN after: {len(lo_b)}: " + ", ".join(f"{k[0][0]} s={k[1]} {k[2]} {k[3]} ({t/b:.2f})" for k,_,_,b,t in [(x[0],x[1],x[2],x[3],x[4]) for x in lo_b]))
    slow = sorted(res, key=lambda x: x[4] / x[3])[:8]
    print("- slowest after (vs oneDNN): " + ", ".join(f"{k[0][0]} s={k[1]} {k[2]} {k[3]} ({t/b:.2f})" for k,_,_,b,t in slow))
