#!/usr/bin/python3
"""moe_ref.py: an independent PyTorch model of ONE scmoe MoE layer, used as an oracle.

    /usr/bin/python3 tests/reference/moe_ref.py FILE [--tol-out 1e-4] [--tol-grad 1e-3] [-q]

FILE (SCMT format, tests/reference/tensorio.py) was written by a C test and holds:
    cfg.d_model cfg.d_hidden cfg.n_experts cfg.top_k cfg.capacity_factor cfg.renormalize
    cfg.aux_loss_weight cfg.z_loss_weight cfg.activation (0 gelu, 1 swiglu) cfg.priority (0 token, 1 batch)
    [cfg.capacity_scope (0 global, 1 local) and route.sources (tokens of each rank, rank-major)]
    x [n, d], dy [n, d], every parameter by name (gate.weight, experts.{e}.w1/b1/w2/b2),
    out.y, out.aux_loss, out.z_loss, out.dropped, [out.capacity, out.expert_tokens],
    grad.x and grad.<param> for each parameter.
The model is written from the specification (Tutel/GShard semantics), in float64 with autograd:

    logits = x Wg; p = softmax(logits); top-k by p (ties -> lower index); w_j = p[e_j]
    (k > 1 and renormalize: w_j = p[e_j] / max(sum_j p[e_j], FLT_EPSILON));
    C = k * floor(CF * ceil(S / E)), CF <= 0 dropless; rounds j = 0..k-1, tokens in priority order
    (token order, or by top-1 probability descending with ties by token index), loc = fill[e]++ counting
    every assignment, kept iff loc < C; capacity_scope local: the same within each source's slice of
    the rows, with that slice's own S, fill and priority order (Tutel: capacity per source rank);
    y[t] = sum_{kept j} w_j FFN_{e_j}(x[t]);
    aux = E * sum_e mean_t p[t,e] * mean_t 1[top1(t) = e];  z = mean_t logsumexp(logits_t)^2;
    L = sum(y * dy) + aux_loss_weight * aux + z_loss_weight * z.

It prints the relative error max|c - ref| / (max|ref| + 1e-8) of every tensor and a summary line, and
exits 0 when every output (y, aux, z) is within --tol-out, every gradient within --tol-grad, and the
drop count (and per-expert counts, if written) match exactly; 1 otherwise; 2 on a bad file.
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bf16_ref  # noqa: E402
import tensorio  # noqa: E402

FLT_EPSILON = 1.1920928955078125e-07
DTYPE = torch.float64
RESERVED_PREFIXES = ("cfg.", "out.", "grad.", "route.")
RESERVED_NAMES = ("x", "dy")

CFG_INT_KEYS = ("d_model", "d_hidden", "n_experts", "top_k", "renormalize", "activation", "priority", "capacity_scope",
                "arch", "shortcut_pos", "combine", "n_heads", "causal", "batch", "seq_len", "precision")


# ---------------------------------------------------------------- loading

def load(path):
    """Records of FILE, its cfg dict (ints where integral), and the parameter names (file order)."""
    rec = tensorio.read(path)
    cfg = {}
    for name, a in rec.items():
        if name.startswith("cfg."):
            key = name[4:]
            v = float(np.asarray(a).reshape(-1)[0])
            cfg[key] = int(round(v)) if key in CFG_INT_KEYS else v
    pnames = [n for n in rec if not n.startswith(RESERVED_PREFIXES) and n not in RESERVED_NAMES]
    return rec, cfg, pnames


def leaf(a):
    return torch.tensor(np.asarray(a, dtype=np.float64)).requires_grad_(True)


# ---------------------------------------------------------------- the math

def gelu_tanh(z):
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z * z * z)))


def ffn(x, w1, b1, w2, b2, activation, bf16=False):
    """GELU: gelu_tanh(x W1 + b1) W2 + b2.  SwiGLU: pre = x W1 + b1 (W1 [d, 2h]); silu(pre[:, :h]) * pre[:, h:].
    bf16: both GEMMs as the library's SCMOE_PRECISION_BF16 runs them (bf16_ref.py)."""
    pre = bf16_ref.matmul(x, w1, bf16) + b1
    if activation == 0:
        hid = gelu_tanh(pre)
    elif activation == 1:
        h = w2.shape[0]
        if pre.shape[1] != 2 * h:
            raise ValueError("SwiGLU: w1 has %d columns, expected 2*%d" % (pre.shape[1], h))
        g, u = pre[:, :h], pre[:, h:]
        hid = g * torch.sigmoid(g) * u
    else:
        raise ValueError("unknown activation %r" % activation)
    return bf16_ref.matmul(hid, w2, bf16) + b2


def capacity(S, E, k, cf):
    """C = k * floor(CF * ceil(S / E)); None = dropless (CF <= 0). CF is the float32 value the C
    config holds, and the product is formed in float32 as a float config would be."""
    if cf <= 0:
        return None
    per = (S + E - 1) // E
    return k * int(math.floor(float(np.float32(cf) * np.float32(per))))


def route(p, k, cf, priority, warn, sources=None):
    """Routing decisions (constants): choice [S, k] (long), kept [S, k] (bool), capacity, and the
    counts of all / kept assignments per expert. p is detached. sources: the row counts of the slices
    that each count capacity on their own (capacity_scope local); None: one slice, the whole batch.
    The capacity returned is the first slice's (what its rank reports)."""
    S, E = p.shape
    pn = p.detach().numpy()
    choice = np.zeros((S, k), dtype=np.int64)
    for t in range(S):
        # descending by p, ties by lower index: a stable sort on -p
        order = sorted(range(E), key=lambda e: (-pn[t, e], e))
        choice[t] = order[:k]
        # near-ties the float32 C code may resolve differently
        ranked = pn[t, order]
        for j in range(min(k, E - 1)):
            if ranked[j] - ranked[j + 1] < 1e-6 * max(ranked[0], 1e-30):
                warn("token %d: near-tie between experts %d and %d (p %.9g vs %.9g): routing may differ "
                     "from the float32 C code" % (t, order[j], order[j + 1], ranked[j], ranked[j + 1]))
    fill = np.zeros(E, dtype=np.int64)
    kept = np.zeros((S, k), dtype=bool)
    C0, start = None, 0
    for s_i, n in enumerate(sources if sources is not None else [S]):
        rows = list(range(start, start + n))
        start += n
        C = capacity(n, E, k, cf)
        if s_i == 0:
            C0 = C
        if priority == 0:
            prio = rows
        elif priority == 1:
            top1 = {t: pn[t, choice[t, 0]] for t in rows}
            prio = sorted(rows, key=lambda t: (-top1[t], t))
            if C is not None:
                for a, b in zip(prio, prio[1:]):
                    if top1[a] - top1[b] < 1e-6 * max(top1[a], 1e-30):
                        warn("tokens %d and %d: near-equal top-1 probability (%.9g vs %.9g): batch priority "
                             "may order them differently from the float32 C code" % (a, b, top1[a], top1[b]))
        else:
            raise ValueError("unknown priority %r" % priority)
        slice_fill = np.zeros(E, dtype=np.int64)
        for j in range(k):
            for t in prio:
                e = choice[t, j]
                loc = slice_fill[e]
                slice_fill[e] += 1
                kept[t, j] = C is None or loc < C
        fill += slice_fill
    if start != S:
        raise ValueError("route.sources add up to %d rows, x has %d" % (start, S))
    kept_count = np.zeros(E, dtype=np.int64)
    for t in range(S):
        for j in range(k):
            if kept[t, j]:
                kept_count[choice[t, j]] += 1
    return torch.from_numpy(choice), torch.from_numpy(kept), C0, fill, kept_count


def moe_layer(x, P, cfg, prefix="", k=None, warn=None, sources=None):
    """One MoE layer over the rows of x [S, d]. P: name -> tensor. Returns y, aux, z, info.
    sources: see route (used when cfg capacity_scope is local)."""
    warn = warn or (lambda msg: print("warning: " + msg))
    E = cfg["n_experts"]
    k = cfg["top_k"] if k is None else k
    act = cfg["activation"]
    S = x.shape[0]
    wg = P[prefix + "gate.weight"]
    logits = x @ wg
    p = torch.softmax(logits, dim=1)
    local = cfg.get("capacity_scope", 0) == 1
    choice, kept, C, fill, kept_count = route(p.detach(), k, cfg["capacity_factor"], cfg["priority"], warn,
                                              sources if local else None)
    w = torch.gather(p, 1, choice) if S else p.new_zeros((0, k))
    if k > 1 and cfg["renormalize"]:
        w = w / torch.clamp(w.sum(dim=1, keepdim=True), min=FLT_EPSILON)
    y = x.new_zeros(x.shape)
    for e in range(E):
        sel = (choice == e) & kept
        t_idx, j_idx = torch.nonzero(sel, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        pre = "%sexperts.%d." % (prefix, e)
        out = ffn(x[t_idx], P[pre + "w1"], P[pre + "b1"], P[pre + "w2"], P[pre + "b2"], act,
                  cfg.get("precision", 0) == 1)
        y = y.index_add(0, t_idx, w[t_idx, j_idx].unsqueeze(1) * out)
    if S:
        frac = torch.nn.functional.one_hot(choice[:, 0], E).to(x.dtype).mean(dim=0)  # no gradient
        aux = E * (p.mean(dim=0) * frac).sum()
        z = (torch.logsumexp(logits, dim=1) ** 2).mean()
    else:
        aux = x.new_zeros(()) + 0.0 * wg.sum()
        z = x.new_zeros(()) + 0.0 * wg.sum()
    info = {"dropped": int(fill.sum() - kept_count.sum()), "capacity": C, "expert_count": fill,
            "expert_kept": kept_count}
    return y, aux, z, info


# ---------------------------------------------------------------- comparison

class Report:
    def __init__(self, tol_out, tol_grad, quiet=False):
        self.tol_out, self.tol_grad, self.quiet = tol_out, tol_grad, quiet
        self.worst = {"out": (0.0, "-"), "grad": (0.0, "-")}
        self.failures = []
        self.warnings = []

    def line(self, s):
        if not self.quiet:
            print(s)

    def warn(self, msg):
        if msg not in self.warnings:
            self.warnings.append(msg)
            print("warning: " + msg)

    def compare(self, kind, name, c_val, ref):
        """kind 'out' or 'grad'; c_val numpy from the file (or None if missing); ref a tensor or None (zero)."""
        if c_val is None:
            self.failures.append("%s: missing from the file" % name)
            self.line("  %-28s MISSING" % name)
            return
        c = np.asarray(c_val, dtype=np.float64)
        r = np.zeros_like(c) if ref is None else ref.detach().numpy().astype(np.float64)
        if c.size != r.size:
            self.failures.append("%s: shape %s in the file, %s in the reference" % (name, c.shape, r.shape))
            self.line("  %-28s SHAPE %s vs ref %s" % (name, c.shape, r.shape))
            return
        c = c.reshape(r.shape)
        if not np.all(np.isfinite(c)):
            err = float("inf")
            diff = float("inf")
            mref = float(np.max(np.abs(r))) if r.size else 0.0
        else:
            diff = float(np.max(np.abs(c - r))) if r.size else 0.0
            mref = float(np.max(np.abs(r))) if r.size else 0.0
            err = diff / (mref + 1e-8)
        tol = self.tol_out if kind == "out" else self.tol_grad
        bad = not (err <= tol)
        self.line("  %-28s rel %.3e  (max|diff| %.3e, max|ref| %.3e)%s" % (name, err, diff, mref,
                                                                             "  FAIL" if bad else ""))
        if bad:
            self.failures.append("%s: rel err %.3e > %.1e" % (name, err, tol))
        e_key = err if err == err else float("inf")  # NaN counts as worst
        if self.worst[kind][1] == "-" or e_key > self.worst[kind][0]:
            self.worst[kind] = (e_key, name)

    def exact(self, name, c_val, ref_val):
        c = np.asarray(c_val).reshape(-1).astype(np.int64) if c_val is not None else None
        r = np.asarray(ref_val).reshape(-1).astype(np.int64)
        ok = c is not None and c.shape == r.shape and np.array_equal(c, r)
        self.line("  %-28s %s  (C %s, ref %s)" % (name, "equal" if ok else "DIFFER FAIL",
                                                 None if c is None else c.tolist(), r.tolist()))
        if not ok:
            self.failures.append("%s: C %s, reference %s" % (name, None if c is None else c.tolist(), r.tolist()))

    def summary(self, tool, path):
        ok = not self.failures
        wo, wg = self.worst["out"], self.worst["grad"]
        print("%s %s: %s  worst output rel err %.3e (%s), worst grad rel err %.3e (%s)%s" % (
            tool, os.path.basename(path), "PASS" if ok else "FAIL", wo[0], wo[1], wg[0], wg[1],
            "" if ok else "; " + "; ".join(self.failures[:4]) + (" ..." if len(self.failures) > 4 else "")))
        return 0 if ok else 1


def parse_args(argv, tool):
    tol_out, tol_grad, quiet, path = 1e-4, 1e-3, False, None
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--tol-out":
            tol_out = float(argv[i + 1]); i += 1
        elif a == "--tol-grad":
            tol_grad = float(argv[i + 1]); i += 1
        elif a in ("-q", "--quiet"):
            quiet = True
        elif path is None:
            path = a
        else:
            raise SystemExit("usage: %s FILE [--tol-out T] [--tol-grad T] [-q]" % tool)
        i += 1
    if path is None:
        raise SystemExit("usage: %s FILE [--tol-out T] [--tol-grad T] [-q]" % tool)
    return path, tol_out, tol_grad, quiet


def check_gradients(rep, rec, L, x, P, pnames):
    """Gradients of L w.r.t. x and every parameter in the file against grad.x / grad.<name>."""
    leaves = [x] + [P[n] for n in pnames]
    if L.requires_grad:
        grads = torch.autograd.grad(L, leaves, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    rep.compare("grad", "grad.x", rec.get("grad.x"), grads[0])
    for n, g in zip(pnames, grads[1:]):
        if g is None and "experts." not in n:  # an expert without tokens is normal; anything else is not
            rep.warn("parameter %s does not enter the reference model (its gradient is taken as 0)" % n)
        rep.compare("grad", "grad." + n, rec.get("grad." + n), g)


def main(argv):
    torch.set_grad_enabled(True)
    path, tol_out, tol_grad, quiet = parse_args(argv, "moe_ref.py")
    try:
        rec, cfg, pnames = load(path)
        for key in ("d_model", "d_hidden", "n_experts", "top_k", "capacity_factor", "renormalize",
                    "aux_loss_weight", "z_loss_weight", "activation", "priority"):
            if key not in cfg:
                raise KeyError("cfg." + key)
        x = leaf(rec["x"]).reshape(-1, cfg["d_model"]).detach().requires_grad_(True)
        dy = torch.tensor(np.asarray(rec["dy"], dtype=np.float64)).reshape(x.shape)
        P = {n: leaf(rec[n]) for n in pnames}
    except (KeyError, ValueError, OSError) as exc:
        print("moe_ref.py %s: FAIL bad input file: %r" % (path, exc))
        return 2
    if cfg.get("precision", 0) == 1:  # SCMOE_PRECISION_BF16: bf16_ref.py derives the tolerance
        tol_out = tol_grad = max(bf16_ref.BF16_TOL, tol_out, tol_grad)
    rep = Report(tol_out, tol_grad, quiet)
    rep.line("moe_ref: S=%d d=%d h=%d E=%d k=%d CF=%g renorm=%d act=%s prio=%s aux_w=%g z_w=%g capacity=%s" % (
        x.shape[0], cfg["d_model"], cfg["d_hidden"], cfg["n_experts"], cfg["top_k"], cfg["capacity_factor"],
        cfg["renormalize"], ("gelu", "swiglu")[cfg["activation"]], ("token", "batch")[cfg["priority"]],
        cfg["aux_loss_weight"], cfg["z_loss_weight"],
        "local" if cfg.get("capacity_scope", 0) == 1 else "global"))
    sources = None
    if "route.sources" in rec:
        sources = [int(round(v)) for v in np.asarray(rec["route.sources"]).reshape(-1)]
    if cfg.get("capacity_scope", 0) not in (0, 1):
        print("moe_ref.py %s: FAIL bad input file: capacity_scope %r" % (path, cfg["capacity_scope"]))
        return 2
    y, aux, z, info = moe_layer(x, P, cfg, warn=rep.warn, sources=sources)
    L = (y * dy).sum() + cfg["aux_loss_weight"] * aux + cfg["z_loss_weight"] * z
    rep.compare("out", "out.y", rec.get("out.y"), y)
    rep.compare("out", "out.aux_loss", rec.get("out.aux_loss"), aux)
    rep.compare("out", "out.z_loss", rec.get("out.z_loss"), z)
    rep.exact("out.dropped", rec.get("out.dropped"), info["dropped"])
    if "out.capacity" in rec:
        rep.exact("out.capacity", rec["out.capacity"], -1 if info["capacity"] is None else info["capacity"])
    if "out.expert_tokens" in rec:
        rep.exact("out.expert_tokens", rec["out.expert_tokens"], info["expert_kept"])
    check_gradients(rep, rec, L, x, P, pnames)
    return rep.summary("moe_ref.py", path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
