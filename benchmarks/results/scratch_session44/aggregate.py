import json, sys, statistics
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
short = {"adamw": "AdamW", "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal": "flagship", "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8": "plain net"}
d = defaultdict(list); by_rep = {}
for r in rows:
    d[(r["task"], r["label"], r["tree"])].append(r)
    by_rep[(r["task"], r["label"], r["tree"], r["rep"])] = r["seconds"]
tasks = list(dict.fromkeys(r["task"] for r in rows))
print("| task | optimizer | before, ms | after, ms | after / before | page faults before / after | / AdamW before | / AdamW after |")
print("|---|---|---|---|---|---|---|---|")
agg = defaultdict(list)
for t in tasks:
    for label in ("adamw", "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal", "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8"):
        o, n = d.get((t, label, "old")), d.get((t, label, "new"))
        if not o or not n: continue
        ms = lambda rs: statistics.median(x["seconds"] for x in rs) * 1e3
        fl = lambda rs: statistics.median(x["faults"] for x in rs)
        reps = sorted({x["rep"] for x in o} & {x["rep"] for x in n})
        ratio = statistics.median(by_rep[(t, label, "new", k)] / by_rep[(t, label, "old", k)] for k in reps)
        vs = lambda tree: statistics.median(by_rep[(t, label, tree, k)] / by_rep[(t, "adamw", tree, k)] for k in reps if (t, "adamw", tree, k) in by_rep)
        agg[short[label]].append(ratio)
        agg[short[label] + " vs AdamW before"].append(vs("old")); agg[short[label] + " vs AdamW after"].append(vs("new"))
        print(f"| {t} | {short[label]} | {ms(o):.3g} | {ms(n):.3g} | {ratio:.2f} | {fl(o):.0f} / {fl(n):.0f} | {vs('old'):.2f}x | {vs('new'):.2f}x |")
print()
for k, v in agg.items():
    if "vs" in k:
        print(f"{k}: median over tasks {statistics.median(v):.2f}x")
    else:
        print(f"{k}: after / before, median over tasks {statistics.median(v):.3f} (min {min(v):.2f}, max {max(v):.2f})")
