import sys, statistics, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) != 4: continue
    net, case, tree, ms = parts
    d[(net, case, tree)].append(float(ms))
keys = sorted({(n, c) for n, c, _ in d})
print("| net | case | before ms (median of 3) | after ms | after / before |")
print("|---|---|---|---|---|")
for n, c in keys:
    b, a = statistics.median(d[(n, c, "base")]), statistics.median(d[(n, c, "main")])
    print(f"| {n} | {c} | {b:.3f} | {a:.3f} | {a / b:.2f}x |")
