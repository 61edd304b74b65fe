#!/usr/bin/python3
"""pair_selftest.py: a Python-only consistency check of the oracle itself (no C library needed).

    /usr/bin/python3 tests/reference/pair_selftest.py

1. pair_ref.attention against torch.nn.MultiheadAttention (head layout, causal mask), layer_norm
   against torch.nn.functional.layer_norm;
2. torch.autograd.gradcheck (float64) of the whole block pair, every arch / shortcut_pos / combine,
   with drops, SwiGLU and batch priority;
3. synthetic SCMT files written from the model itself go through pair_ref.py and pass (also B = 0),
   and fail when an output, a gradient or the shortcut position is perturbed.
Prints SELFTEST OK and exits 0, or raises.
"""
import sys, subprocess, itertools, math
import numpy as np, torch
import os, tempfile
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import moe_ref, pair_ref, tensorio
torch.manual_seed(0)
DT = torch.float64

def make_params(cfg, rng):
    d, h, E = cfg["d_model"], cfg["d_hidden"], cfg["n_experts"]
    h1 = 2 * h if cfg["activation"] == 1 else h
    P = {}
    def U(shape, s): return rng.uniform(-s, s, size=shape).astype(np.float32)
    for l in ("l0", "l1"):
        for ln in ("ln_a", "ln_m"):
            P[f"{l}.{ln}.weight"] = 1 + U((d,), 0.3); P[f"{l}.{ln}.bias"] = U((d,), 0.3)
        P[f"{l}.attn.wqkv"] = U((d, 3 * d), math.sqrt(3 / d)); P[f"{l}.attn.bqkv"] = U((3 * d,), 0.3)
        P[f"{l}.attn.wo"] = U((d, d), math.sqrt(3 / d)); P[f"{l}.attn.bo"] = U((d,), 0.3)
    def ffnp(pre):
        P[pre + ".w1"] = U((d, h1), math.sqrt(3 / d)); P[pre + ".b1"] = U((h1,), 0.5)
        P[pre + ".w2"] = U((h, d), math.sqrt(3 / h)); P[pre + ".b2"] = U((d,), 0.5)
    ffnp("l0.mlp")
    P["l1.gate.weight"] = U((d, E), 2.5 / math.sqrt(d))
    for e in range(E): ffnp(f"l1.experts.{e}")
    if cfg["arch"] in (2, 3):
        ffnp("l1.se")
        if cfg["combine"] == 0: P["l1.cg.weight"] = U((d,), 1.0)
    return P

def base_cfg(**kw):
    c = dict(d_model=8, d_hidden=8, n_experts=4, top_k=1, capacity_factor=1.0, renormalize=1, aux_loss_weight=0.5,
             z_loss_weight=0.1, activation=0, priority=0, arch=3, shortcut_pos=2, combine=0, n_heads=2, causal=1,
             batch=2, seq_len=3)
    c.update(kw); return c

# 1. attention vs nn.MultiheadAttention
for causal in (0, 1):
    B, T, d, H = 3, 5, 12, 3
    P = {"a.wqkv": torch.randn(d, 3 * d, dtype=DT), "a.bqkv": torch.randn(3 * d, dtype=DT),
         "a.wo": torch.randn(d, d, dtype=DT), "a.bo": torch.randn(d, dtype=DT)}
    a = torch.randn(B, T, d, dtype=DT)
    mine = pair_ref.attention(a.reshape(B * T, d), P, "a", B, T, H, causal).reshape(B, T, d)
    mha = torch.nn.MultiheadAttention(d, H, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(P["a.wqkv"].T); mha.in_proj_bias.copy_(P["a.bqkv"])
        mha.out_proj.weight.copy_(P["a.wo"].T); mha.out_proj.bias.copy_(P["a.bo"])
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None
    ref, _ = mha(a, a, a, attn_mask=mask, need_weights=False)
    print("attention vs MHA causal=%d max diff %.3e" % (causal, (mine - ref).abs().max()))
    assert (mine - ref).abs().max() < 1e-10
# LN vs F.layer_norm
v = torch.randn(7, 10, dtype=DT); P = {"n.weight": torch.randn(10, dtype=DT), "n.bias": torch.randn(10, dtype=DT)}
assert (pair_ref.layer_norm(v, P, "n") - torch.nn.functional.layer_norm(v, (10,), P["n.weight"], P["n.bias"], 1e-5)).abs().max() < 1e-12
print("layernorm ok")

# 2. gradcheck of the whole pair, every variant
rng = np.random.default_rng(1)
variants = [dict(arch=0), dict(arch=1), dict(arch=2, combine=0), dict(arch=2, combine=1)] + \
           [dict(arch=3, shortcut_pos=p, combine=c) for p in (1, 2, 3) for c in (0, 1)] + \
           [dict(arch=3, activation=1, causal=0, capacity_factor=0.5, priority=1), dict(arch=0, activation=1, capacity_factor=0.5, renormalize=0)]
for v in variants:
    cfg = base_cfg(**v)
    Pn = make_params(cfg, rng)
    names = list(Pn)
    x0 = torch.tensor(rng.uniform(-1, 1, (cfg["batch"], cfg["seq_len"], cfg["d_model"])), dtype=DT, requires_grad=True)
    dy = torch.tensor(rng.uniform(-1, 1, (cfg["batch"] * cfg["seq_len"], cfg["d_model"])), dtype=DT)
    leaves = [torch.tensor(Pn[n], dtype=DT, requires_grad=True) for n in names]
    drops = []
    def fn(x, *ps):
        P = dict(zip(names, ps))
        y, aux, z, info = pair_ref.pair_forward(x, P, cfg, warn=lambda m: None)
        drops.append(info["dropped"])
        return (y * dy).sum() + cfg["aux_loss_weight"] * aux + cfg["z_loss_weight"] * z
    ok = torch.autograd.gradcheck(fn, [x0] + leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    print("gradcheck", v, ok, "dropped", sorted(set(drops)))

TMP = os.path.join(tempfile.mkdtemp(prefix="pair_selftest_"), "pair.scmt")

# 3. synthetic files through pair_ref.py: pass, and fail when perturbed
def write_case(path, cfg, perturb=None):
    Pn = make_params(cfg, rng)
    B, T, d = cfg["batch"], cfg["seq_len"], cfg["d_model"]
    x = rng.uniform(-1, 1, (B, T, d)).astype(np.float32); dy = rng.uniform(-1, 1, (B, T, d)).astype(np.float32)
    xt = moe_ref.leaf(x); P = {n: moe_ref.leaf(a) for n, a in Pn.items()}
    y, aux, z, info = pair_ref.pair_forward(xt, P, cfg)
    L = (y * torch.tensor(dy, dtype=DT).reshape(y.shape)).sum() + cfg["aux_loss_weight"] * aux + cfg["z_loss_weight"] * z
    gs = torch.autograd.grad(L, [xt] + [P[n] for n in Pn], allow_unused=True)
    rec = [("cfg." + k, np.float32(v)) for k, v in cfg.items()] + [("x", x), ("dy", dy)] + list(Pn.items())
    rec += [("out.y", y.detach().numpy().reshape(B, T, d)), ("out.aux_loss", aux.item()), ("out.z_loss", z.item()),
            ("out.dropped", info["dropped"]), ("grad.x", gs[0].numpy())]
    rec += [("grad." + n, np.zeros(Pn[n].shape) if g is None else g.numpy()) for n, g in zip(Pn, gs[1:])]
    rec = dict(rec)
    if perturb: perturb(rec)
    tensorio.write(path, rec)
    p = subprocess.run(["/usr/bin/python3", os.path.join(HERE, "pair_ref.py"), path, "-q"], capture_output=True, text=True)
    return p.returncode, p.stdout.strip().splitlines()[-1]

for v in variants + [dict(arch=3, batch=0), dict(arch=0, batch=0)]:
    rc, line = write_case(TMP, base_cfg(**v))
    print("file", v, rc, line[:150]); assert rc == 0, line
def bump(name, rel=1e-2):
    def f(rec):
        a = np.array(rec[name], dtype=np.float32); a.flat[1] += rel * np.abs(a).max(); rec[name] = a
    return f
for name in ("out.y", "grad.x", "grad.l0.ln_a.weight", "grad.l1.cg.weight", "grad.l0.attn.bqkv", "grad.l1.gate.weight"):
    rc, line = write_case(TMP, base_cfg(arch=3), bump(name))
    print("perturbed", name, rc, line[:140]); assert rc == 1
rc, line = write_case(TMP, base_cfg(arch=3, shortcut_pos=2), lambda r: r.__setitem__("cfg.shortcut_pos", np.float32(1)))
print("wrong shortcut_pos", rc, line[:140]); assert rc == 1
os.remove(TMP)
os.rmdir(os.path.dirname(TMP))
print("SELFTEST OK")
