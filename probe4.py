import torch, torch.nn.functional as F, crossent, pickle, io, gc
from crossent._core import dispatch; dispatch.ready("numba", wait=True)
x = torch.randn(1024, 4100)
for f, n in ((F.softmax, "torch"), (crossent.softmax, "cross")):
    o = f(x, 1)
    print(n, "equal-ish", "resizable", o.untyped_storage().resizable(), end=" ")
    try: o.resize_(2048, 4100); print("resize ok", o.shape)
    except Exception as e: print("resize", type(e).__name__, str(e)[:80])
# aliasing after free
a = crossent.softmax(x, 1); pa = a.data_ptr(); del a; gc.collect()
b = crossent.softmax(x * 2, 1); c = crossent.softmax(x * 3, 1)
print("b,c alias?", b.data_ptr() == c.data_ptr(), torch.allclose(b, F.softmax(x*2, 1)), torch.allclose(c, F.softmax(x*3,1)))
buf = io.BytesIO(); torch.save(b, buf); buf.seek(0); print("save/load ok", torch.equal(torch.load(buf), b))
# grad accumulate
l = x.clone().requires_grad_()
crossent.log_softmax(l, 1).sum().backward(); g1 = l.grad.clone()
crossent.log_softmax(l, 1).sum().backward(); print("accum ok", torch.allclose(l.grad, 2*g1, atol=1e-6), l.grad.untyped_storage().resizable())
l2 = x.clone().requires_grad_(); F.log_softmax(l2, 1).sum().backward(); print("grad vs torch", (l2.grad - g1).abs().max())
# view after free of base
v = crossent.softmax(x, 1)[:2]; gc.collect(); w = crossent.softmax(x*5, 1); print("view intact", torch.allclose(v, F.softmax(x[:2], 1)))
# share_memory / numpy
o = crossent.softmax(x, 1); n = o.numpy(); del o; gc.collect(); w2 = crossent.softmax(x*7, 1); w3 = crossent.softmax(x*9,1); print("numpy intact", torch.allclose(torch.from_numpy(n), F.softmax(x,1)))
# pickle of a view
o = crossent.softmax(x, 1); print("pickle", torch.equal(pickle.loads(pickle.dumps(o)), o))
o.share_memory_(); print("shared", o.is_shared())
