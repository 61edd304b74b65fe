#!/usr/bin/python3
"""pair_ref.py: an independent PyTorch model of the scmoe BLOCK PAIR (dense block l, MoE block l+1).

    /usr/bin/python3 tests/reference/pair_ref.py FILE [FILE...] [--tol-out 1e-4] [--tol-grad 1e-3] [-q]

FILE (SCMT format) holds the moe_ref.py cfg.* scalars plus cfg.arch (0 top2, 1 top1, 2 shared,
3 scmoe), cfg.shortcut_pos (1|2|3), cfg.combine (0 CG1, 1 add), cfg.n_heads, cfg.causal, cfg.batch,
cfg.seq_len; x [B, T, d], dy, every parameter by name, out.y, out.aux_loss, out.z_loss
[, out.dropped], grad.x and grad.<name>. Written from the specification, float64 autograd:

    LN(v; n)   LayerNorm over the last dim, eps 1e-5, n.weight / n.bias
    (cfg.precision 1: every GEMM below but the gates' in bf16, as bf16_ref.py)
    Attn(a; p) qkv = a p.wqkv + p.bqkv; q | k | v column blocks; head h uses columns h*hd..(h+1)*hd-1
               of each; softmax(q k^T / sqrt(hd)) per (batch, head), causal mask j > i if causal;
               heads concatenated in column order; out = o p.wo + p.bo
    FFN(v; p)  GELU / SwiGLU expert FFN with p.w1 p.b1 p.w2 p.b2
    a0 = LN(x; l0.ln_a); A = x + Attn(a0; l0.attn); m0 = LN(A; l0.ln_m); H = A + FFN(m0; l0.mlp)
    a1 = LN(H; l1.ln_a); A2 = H + Attn(a1; l1.attn); m1 = LN(A2; l1.ln_m)
    top2 (k=2) / top1 (k=1): y = A2 + MoE(m1)
    shared (k=1):            y = A2 + Cs(m1) + MoE(m1)
    scmoe (k=1):             y = A2 + Cs(m1) + MoE(X_sc), X_sc = a1 (pos 1), m0 (pos 2), a0 (pos 3)
    Cs(m1) = sigmoid(m1 . l1.cg.weight) * FFN(m1; l1.se) (CG1) or FFN(m1; l1.se) (ADD)
    MoE = moe_ref.moe_layer with l1.gate.weight and l1.experts.{e}.*, over all B*T rows
    L = sum(y * dy) + aux_loss_weight * aux + z_loss_weight * z
Exit status as moe_ref.py (with several files, the worst of theirs). Each file's report ends in one
line that starts "pair_ref.py " and names the file, with PASS or FAIL.
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bf16_ref  # noqa: E402
import moe_ref  # noqa: E402

ARCH_TOP2, ARCH_TOP1, ARCH_SHARED, ARCH_SCMOE = 0, 1, 2, 3
ARCH_NAMES = ("top2", "top1", "shared", "scmoe")
LN_EPS = 1e-5


def layer_norm(v, P, name):
    mu = v.mean(dim=-1, keepdim=True)
    var = ((v - mu) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    return (v - mu) / torch.sqrt(var + LN_EPS) * P[name + ".weight"] + P[name + ".bias"]


def attention(a, P, prefix, B, T, n_heads, causal, bf16=False):
    """a [B*T, d] -> [B*T, d]. bf16: the four GEMMs as SCMOE_PRECISION_BF16 runs them (bf16_ref.py)."""
    d = a.shape[1]
    hd = d // n_heads
    qkv = bf16_ref.matmul(a, P[prefix + ".wqkv"], bf16) + P[prefix + ".bqkv"]
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]

    def heads(m):  # [B*T, d] -> [B, H, T, hd], head h = columns h*hd .. h*hd+hd-1
        return m.reshape(B, T, n_heads, hd).permute(0, 2, 1, 3)

    q, k, v = heads(q), heads(k), heads(v)
    scores = bf16_ref.matmul(q, k.transpose(-1, -2), bf16, 1.0 / math.sqrt(hd))
    if causal:
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # j > i
        scores = scores.masked_fill(mask, float("-inf"))
    o = bf16_ref.matmul(torch.softmax(scores, dim=-1), v, bf16)  # [B, H, T, hd]
    o = o.permute(0, 2, 1, 3).reshape(B * T, d)                 # heads back in column order
    return bf16_ref.matmul(o, P[prefix + ".wo"], bf16) + P[prefix + ".bo"]


def ffn(v, P, prefix, activation, bf16=False):
    return moe_ref.ffn(v, P[prefix + ".w1"], P[prefix + ".b1"], P[prefix + ".w2"], P[prefix + ".b2"], activation, bf16)


def arch_top_k(arch):
    if arch == ARCH_TOP2:
        return 2
    if arch in (ARCH_TOP1, ARCH_SHARED, ARCH_SCMOE):
        return 1
    raise ValueError("unknown arch %r" % arch)


def pair_forward(x, P, cfg, warn=None):
    """x [B, T, d] (or [B*T, d] with cfg batch/seq_len). Returns y [B*T, d], aux, z, info."""
    B, T, d = cfg["batch"], cfg["seq_len"], cfg["d_model"]
    H, causal, act, arch = cfg["n_heads"], cfg["causal"], cfg["activation"], cfg["arch"]
    if d % H:
        raise ValueError("n_heads %d does not divide d_model %d" % (H, d))
    k = arch_top_k(arch)
    bf = cfg.get("precision", 0) == 1
    xs = x.reshape(B * T, d)
    a0 = layer_norm(xs, P, "l0.ln_a")
    A = xs + attention(a0, P, "l0.attn", B, T, H, causal, bf)
    m0 = layer_norm(A, P, "l0.ln_m")
    Hh = A + ffn(m0, P, "l0.mlp", act, bf)
    a1 = layer_norm(Hh, P, "l1.ln_a")
    A2 = Hh + attention(a1, P, "l1.attn", B, T, H, causal, bf)
    m1 = layer_norm(A2, P, "l1.ln_m")
    if arch in (ARCH_TOP2, ARCH_TOP1, ARCH_SHARED):
        moe_in = m1
    else:
        pos = cfg["shortcut_pos"]
        if pos not in (1, 2, 3):
            raise ValueError("shortcut_pos %r" % pos)
        moe_in = {1: a1, 2: m0, 3: a0}[pos]
    r, aux, z, info = moe_ref.moe_layer(moe_in, P, cfg, prefix="l1.", k=k, warn=warn)
    y = A2 + r
    if arch in (ARCH_SHARED, ARCH_SCMOE):
        se = ffn(m1, P, "l1.se", act, bf)
        if cfg["combine"] == 0:
            g = torch.sigmoid(m1 @ P["l1.cg.weight"].reshape(-1))
            se = g.unsqueeze(1) * se
        elif cfg["combine"] != 1:
            raise ValueError("unknown combine %r" % cfg["combine"])
        y = y + se
    info["k"] = k
    return y, aux, z, info


def check_file(path, tol_out, tol_grad, quiet):
    """Checks one file; prints its report ending in one line "pair_ref.py FILE: PASS|FAIL ..."; returns 0/1/2."""
    try:
        rec, cfg, pnames = moe_ref.load(path)
        cfg.setdefault("renormalize", 1)
        cfg.setdefault("priority", 0)
        cfg.setdefault("combine", 0)
        cfg.setdefault("shortcut_pos", 2)
        for key in ("d_model", "d_hidden", "n_experts", "capacity_factor", "aux_loss_weight", "z_loss_weight",
                    "activation", "arch", "n_heads", "causal", "batch", "seq_len"):
            if key not in cfg:
                raise KeyError("cfg." + key)
        B, T, d = cfg["batch"], cfg["seq_len"], cfg["d_model"]
        x = moe_ref.leaf(np.asarray(rec["x"]).reshape(B, T, d))
        dy = torch.tensor(np.asarray(rec["dy"], dtype=np.float64)).reshape(B * T, d)
        P = {n: moe_ref.leaf(rec[n]) for n in pnames}
    except (KeyError, ValueError, OSError) as exc:
        print("pair_ref.py %s: FAIL bad input file: %r" % (path, exc))
        return 2
    if cfg.get("precision", 0) == 1:  # SCMOE_PRECISION_BF16: bf16_ref.py derives the tolerance
        tol_out = tol_grad = max(bf16_ref.BF16_TOL, tol_out, tol_grad)
    rep = moe_ref.Report(tol_out, tol_grad, quiet)
    rep.line("pair_ref: arch=%s pos=%s combine=%s B=%d T=%d d=%d H=%d causal=%d h=%d E=%d CF=%g act=%s "
             "aux_w=%g z_w=%g" % (ARCH_NAMES[cfg["arch"]] if 0 <= cfg["arch"] < 4 else cfg["arch"],
                                  cfg["shortcut_pos"], ("cg1", "add")[cfg["combine"]] if cfg["combine"] in (0, 1)
                                  else cfg["combine"], B, T, d, cfg["n_heads"], cfg["causal"], cfg["d_hidden"],
                                  cfg["n_experts"], cfg["capacity_factor"], ("gelu", "swiglu")[cfg["activation"]],
                                  cfg["aux_loss_weight"], cfg["z_loss_weight"]))
    try:
        y, aux, z, info = pair_forward(x, P, cfg, warn=rep.warn)
    except KeyError as exc:
        print("pair_ref.py %s: FAIL parameter missing from the file: %s" % (path, exc))
        return 2
    except ValueError as exc:
        print("pair_ref.py %s: FAIL %s" % (path, exc))
        return 2
    L = (y * dy).sum() + cfg["aux_loss_weight"] * aux + cfg["z_loss_weight"] * z
    rep.compare("out", "out.y", rec.get("out.y"), y)
    rep.compare("out", "out.aux_loss", rec.get("out.aux_loss"), aux)
    rep.compare("out", "out.z_loss", rec.get("out.z_loss"), z)
    if "out.dropped" in rec:
        rep.exact("out.dropped", rec["out.dropped"], info["dropped"])
    if "out.capacity" in rec:
        rep.exact("out.capacity", rec["out.capacity"], -1 if info["capacity"] is None else info["capacity"])
    if "out.expert_tokens" in rec:
        rep.exact("out.expert_tokens", rec["out.expert_tokens"], info["expert_kept"])
    moe_ref.check_gradients(rep, rec, L, x, P, pnames)
    return rep.summary("pair_ref.py", path)


def parse_args(argv):
    """FILE... [--tol-out T] [--tol-grad T] [-q]; several files share one interpreter (torch loads once)."""
    tol_out, tol_grad, quiet, paths = 1e-4, 1e-3, False, []
    usage = "usage: pair_ref.py FILE [FILE...] [--tol-out T] [--tol-grad T] [-q]"
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("--tol-out", "--tol-grad"):
            if i + 1 >= len(argv):
                raise SystemExit(usage)
            if a == "--tol-out":
                tol_out = float(argv[i + 1])
            else:
                tol_grad = float(argv[i + 1])
            i += 1
        elif a in ("-q", "--quiet"):
            quiet = True
        else:
            paths.append(a)
        i += 1
    if not paths:
        raise SystemExit(usage)
    return paths, tol_out, tol_grad, quiet


def main(argv):
    """Every FILE is checked; the exit status is the worst of theirs (0 all pass, 1 a mismatch, 2 a bad file)."""
    torch.set_grad_enabled(True)
    paths, tol_out, tol_grad, quiet = parse_args(argv)
    worst = 0
    for path in paths:
        try:
            rc = check_file(path, tol_out, tol_grad, quiet)
        except Exception as exc:  # one broken file must not hide the verdict on the others
            print("pair_ref.py %s: FAIL exception %s: %s" % (path, type(exc).__name__, exc))
            rc = 2
        sys.stdout.flush()
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv))
