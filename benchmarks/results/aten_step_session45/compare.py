import sys, torch
a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
assert a.keys() == b.keys()
diff = [k for k in a if not torch.equal(a[k], b[k])]
print(len(a), "tensors,", len(diff), "differ")
for k in diff[:10]: print("  ", k, (a[k]-b[k]).abs().max().item())
