#!/usr/bin/python3
"""torch_peer.py: the performance peer of bench/bench_overlap.c -- the same block pair in PyTorch on CPU,
expert parallelism through torch.distributed (gloo) all-to-all.

The model is the one at the top of pair.c / README.md:

    dense block l:  a0 = LN(x)   A  = x + Attn(a0)    m0 = LN(A)    H = A + MLP(m0)
    block l+1:      a1 = LN(H)   A2 = H + Attn(a1)    m1 = LN(A2)
    top2 / top1:    y = A2 + MoE_k(m1)
    shared:         y = A2 + C(m1) + MoE_1(m1)
    scmoe:          y = A2 + C(m1) + MoE_1(X_sc),   X_sc = a1 (pos 1) | m0 (pos 2) | a0 (pos 3)
    C(m1) = sigmoid(w_cg . m1) * SE(m1)   (CG-1)

Attention: causal, n_heads heads, q/k/v from one [d, 3d] projection, output projection [d, d], biases.
MLP, shared expert and experts: GELU (tanh form) FFN d -> h -> d with biases. Gate: logits = x Wg
(no bias), softmax over E, top-k, renormalised for k > 1, GShard aux loss (weight 0.01). Capacity
C = k * floor(CF * ceil(S / E)), S = this rank's tokens (local capacity; the C library's is global,
which at equal token counts gives the same C), slots claimed in token order, overflow dropped.
E experts over P ranks, E/P per rank, expert e on rank e // (E/P).

Expert parallelism: the rows go with torch.distributed.all_to_all_single with uneven splits
(gloo supports it in torch 1.13, async too), exactly the kept rows like the C library's
Alltoallv, after a tiny blocking all-to-all of the per-expert counts. The exchange is a custom
autograd.Function, so backward goes through autograd and its exchanges are blocking (exposed).

Schedule (forward, training and inference):
  top2, top1, shared, serial2: gate on m1 (serial2: on m0, scmoe pos 2), every exchange waited on
      at once (the standard PyTorch MoE).
  scmoe pos 1/2/3: gate right after X_sc exists, dispatch started with async_op=True, then the main
      path's remaining dense operations (attention / MLP / LNs / shared expert), then wait,
      experts, combine (blocking), decode. --slot K instead runs the experts after K dense
      operations following the gate and leaves the combine in flight over the rest (the C
      library's slot schedule).
Backward: autograd (one CPU thread), exchanges blocking. Then the dense (replicated) gradients,
gate included, are all-reduced as one flat buffer (timed separately), then an SGD step.

Run:   /usr/bin/python3 bench/torch_peer.py [--nproc 2] [--steps 5] [--archs top2,...] [--bf16]
       (--bf16: forwards under torch.autocast("cpu", torch.bfloat16), the one line a PyTorch user adds)
       (spawns the ranks itself with torch.multiprocessing, rendezvous on 127.0.0.1). It also runs under
       a launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; but Debian's torch 1.13 launcher
       (python3 -m torch.distributed.run) fails on Python 3.11 before starting workers
       (AttributeError in elastic/multiprocessing/api.py to_map), hence the spawn default.
bench/run_peer.sh RATE runs it inside a network namespace whose loopback is rate-limited.
gloo is bound to lo (GLOO_SOCKET_IFNAME=lo unless set). Note gloo always goes through TCP, also
over plain loopback (no shared-memory transport), unlike OpenMPI's vader.
"""
import argparse
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

ARCHS = {
    # name: (kind, shortcut pos, overlapped)
    "top2": ("top2", 0, False),
    "shared": ("shared", 0, False),
    "top1": ("top1", 0, False),
    "scmoe1": ("scmoe", 1, True),
    "scmoe2": ("scmoe", 2, True),
    "scmoe3": ("scmoe", 3, True),
    "serial2": ("scmoe", 2, False),
}
OPS = ["ln_a0", "attn0", "ln_m0", "mlp0", "ln_a1", "attn1", "ln_m1", "se"]
# the forward operation before which the gate runs (X_sc exists): pos 3 -> a0, 2 -> m0, 1 -> a1, else m1
GATE_AFTER = {3: 1, 2: 3, 1: 5, 0: 7}

T = {}  # per-step timers (seconds), reset by the caller


def tadd(key, v):
    T[key] = T.get(key, 0.0) + v


def gelu(x):
    return F.gelu(x, approximate="tanh")


class AllToAll(torch.autograd.Function):
    """rows x (split by in_splits over ranks) -> rows out (out_splits from each rank). If box is given the
    exchange is left in flight (box.work, box.t0) and the caller waits before reading the result.
    Backward: the mirrored exchange, blocking."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, box, key):
        ctx.out_splits, ctx.in_splits = out_splits, in_splits
        out = x.new_empty((sum(out_splits), x.shape[1]))
        t0 = time.perf_counter()
        work = dist.all_to_all_single(wire(out), wire(x.contiguous()), out_splits, in_splits, async_op=True)
        if box is not None:
            box.work, box.t0, box.key = work, t0, key
        else:
            work.wait()
            tadd("fwd_exposed", time.perf_counter() - t0)
            tadd(key, time.perf_counter() - t0)
        return out

    @staticmethod
    def backward(ctx, g):
        gin = g.new_empty((sum(ctx.in_splits), g.shape[1]))
        t0 = time.perf_counter()
        dist.all_to_all_single(wire(gin), wire(g.contiguous()), ctx.in_splits, ctx.out_splits)
        tadd("bwd_exposed", time.perf_counter() - t0)
        return gin, None, None, None, None


def wire(t):
    """gloo has no bfloat16 (nor int16): autocast's bf16 rows travel as their bytes, [rows, 2d] uint8"""
    return t.view(torch.uint8) if t.dtype == torch.bfloat16 else t


class Box:
    work = None
    t0 = 0.0
    key = ""


def normal(gen, shape, std):
    return torch.empty(shape).normal_(0.0, std, generator=gen)


class Pair(torch.nn.Module):
    def __init__(self, arch, d, h, E, heads, rank, world, seq, cf=2.0, aux_w=0.01, slot=None):
        super().__init__()
        kind, pos, overlap = ARCHS[arch]
        self.kind, self.pos, self.overlap = kind, pos, overlap
        self.k = 2 if kind == "top2" else 1
        self.has_se = kind in ("shared", "scmoe")
        self.d, self.h, self.E, self.heads = d, h, E, heads
        self.rank, self.world = rank, world
        assert E % world == 0, "E must be a multiple of the number of ranks"
        self.El = E // world
        self.cf, self.aux_w, self.slot = cf, aux_w, slot
        std, res_std = 0.02, 0.02 / math.sqrt(4.0)
        g = torch.Generator().manual_seed(1234)  # dense parameters: the same on every rank
        P = torch.nn.Parameter
        self.dense = torch.nn.ParameterDict()
        for ln in ("ln_a0", "ln_m0", "ln_a1", "ln_m1"):
            self.dense[ln + "_w"] = P(torch.ones(d))
            self.dense[ln + "_b"] = P(torch.zeros(d))
        for a in ("attn0", "attn1"):
            self.dense[a + "_wqkv"] = P(normal(g, (3 * d, d), std))
            self.dense[a + "_bqkv"] = P(torch.zeros(3 * d))
            self.dense[a + "_wo"] = P(normal(g, (d, d), res_std))
            self.dense[a + "_bo"] = P(torch.zeros(d))
        ffns = ["mlp0"] + (["se"] if self.has_se else [])
        for f in ffns:
            self.dense[f + "_w1"] = P(normal(g, (h, d), std))
            self.dense[f + "_b1"] = P(torch.zeros(h))
            self.dense[f + "_w2"] = P(normal(g, (d, h), res_std))
            self.dense[f + "_b2"] = P(torch.zeros(d))
        if self.has_se:
            self.dense["cg_w"] = P(torch.zeros(d))  # CG-1
        self.dense["gate_w"] = P(normal(g, (d, E), std))
        # local experts, seeded by global index: [El, d, h], [El, h], [El, h, d], [El, d]
        w1, w2 = [], []
        for j in range(self.El):
            ge = torch.Generator().manual_seed(10007 + rank * self.El + j)
            w1.append(normal(ge, (d, h), std))
            w2.append(normal(ge, (h, d), res_std))
        self.ew1 = P(torch.stack(w1))
        self.eb1 = P(torch.zeros(self.El, h))
        self.ew2 = P(torch.stack(w2))
        self.eb2 = P(torch.zeros(self.El, d))
        mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    # ---- dense pieces ----
    def ln(self, name, x):
        return F.layer_norm(x, (self.d,), self.dense[name + "_w"], self.dense[name + "_b"], 1e-5)

    def attn(self, name, x, B, Tn):
        d, H = self.d, self.heads
        hd = d // H
        qkv = F.linear(x, self.dense[name + "_wqkv"], self.dense[name + "_bqkv"])
        qkv = qkv.view(B, Tn, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        s = s.masked_fill(self.mask[:Tn, :Tn], float("-inf"))
        o = torch.matmul(torch.softmax(s, dim=-1), v)
        o = o.transpose(1, 2).reshape(B * Tn, d)
        return F.linear(o, self.dense[name + "_wo"], self.dense[name + "_bo"])

    def ffn(self, name, x):
        z = gelu(F.linear(x, self.dense[name + "_w1"], self.dense[name + "_b1"]))
        return F.linear(z, self.dense[name + "_w2"], self.dense[name + "_b2"])

    # ---- the MoE as phases ----
    def gate_dispatch(self, xs, asynchronous):
        """gate, route, counts exchange (blocking, small), dispatch (async or blocking)."""
        n, E, k, El, Pw = xs.shape[0], self.E, self.k, self.El, self.world
        t0 = time.perf_counter()
        logits = xs @ self.dense["gate_w"]
        p = torch.softmax(logits, dim=1)
        topw, topi = p.topk(k, dim=1)
        if k > 1:
            topw = topw / topw.sum(dim=1, keepdim=True).clamp_min(1e-9)
        with torch.no_grad():
            flat_e = topi.reshape(-1)  # assignment a = t * k + j: token order claims the slots
            cap = k * int(self.cf * ((n + E - 1) // E))
            onehot = F.one_hot(flat_e, E)
            pos = (onehot.cumsum(0) - 1).gather(1, flat_e[:, None]).squeeze(1)
            kept = (pos < cap).nonzero().squeeze(1)
            e_kept = flat_e[kept]
            order = torch.sort(e_kept, stable=True).indices  # by expert, then token
            a_sorted = kept[order]
            tok = torch.div(a_sorted, k, rounding_mode="floor")
            counts = torch.bincount(e_kept, minlength=E)
            top1 = F.one_hot(topi[:, 0], E).float().mean(0)
        aux = E * (p.mean(0) * top1).sum() if torch.is_grad_enabled() else None
        send_x = xs.index_select(0, tok)
        w_sorted = topw.reshape(-1).index_select(0, a_sorted)
        send_splits = counts.view(Pw, El).sum(1).tolist()
        tadd("gate", time.perf_counter() - t0)
        t0 = time.perf_counter()
        rc = torch.empty(E, dtype=counts.dtype)
        dist.all_to_all_single(rc, counts)  # rc[q*El + j]: rows rank q sends to my expert j
        tadd("fwd_exposed", time.perf_counter() - t0)
        tadd("counts", time.perf_counter() - t0)
        rc = rc.view(Pw, El)
        recv_splits = rc.sum(1).tolist()
        box = Box() if asynchronous else None
        recv = AllToAll.apply(send_x, recv_splits, send_splits, box, "disp")
        return dict(recv=recv, box=box, rc=rc, recv_splits=recv_splits, send_splits=send_splits, tok=tok,
                    w=w_sorted, aux=aux, n=n)

    def wait(self, st):
        box = st["box"]
        if box is not None and box.work is not None:
            t0 = time.perf_counter()
            box.work.wait()
            t1 = time.perf_counter()
            tadd("fwd_exposed", t1 - t0)
            tadd(box.key, t1 - t0)
            box.work = None

    def experts_combine(self, st, asynchronous):
        recv, rc, El, Pw = st["recv"], st["rc"], self.El, self.world
        t0 = time.perf_counter()
        # recv rows: by source rank, then by my local expert; regroup by expert
        offs = torch.zeros(Pw * El + 1, dtype=torch.long)
        offs[1:] = rc.reshape(-1).cumsum(0)
        perm, sizes = [], []
        for j in range(El):
            sz = 0
            for q in range(Pw):
                a, b = int(offs[q * El + j]), int(offs[q * El + j + 1])
                if b > a:
                    perm.append(torch.arange(a, b))
                sz += b - a
            sizes.append(sz)
        perm = torch.cat(perm) if perm else torch.zeros(0, dtype=torch.long)
        xe = recv.index_select(0, perm)
        outs, r0 = [], 0
        for j in range(El):
            r1 = r0 + sizes[j]
            if r1 > r0:
                z = gelu(torch.addmm(self.eb1[j], xe[r0:r1], self.ew1[j]))
                outs.append(torch.addmm(self.eb2[j], z, self.ew2[j]))
            r0 = r1
        ye = torch.cat(outs) if outs else recv.new_zeros((0, self.d))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        out_recv = ye.index_select(0, inv)
        tadd("experts", time.perf_counter() - t0)
        box = Box() if asynchronous else None
        st["back"] = AllToAll.apply(out_recv, st["send_splits"], st["recv_splits"], box, "comb")
        st["box"] = box

    def decode(self, st):
        y = st["back"].new_zeros((st["n"], self.d))
        return y.index_add(0, st["tok"], st["back"] * st["w"][:, None])

    # ---- the pair ----
    def forward(self, x, B, Tn):
        sc = self.kind == "scmoe"
        gate_after = GATE_AFTER[self.pos if sc else 0]
        overlap = self.overlap and sc
        nops = len(OPS)
        slot = nops - gate_after if self.slot is None else min(self.slot, nops - gate_after)
        combine_async = overlap and self.slot is not None
        v = {"x": x}
        st = None
        experts_done = False
        for i in range(nops + 1):
            if i == gate_after:
                xs = v["a1"] if (sc and self.pos == 1) else v["m0"] if (sc and self.pos == 2) else \
                    v["a0"] if (sc and self.pos == 3) else v["m1"]
                st = self.gate_dispatch(xs, asynchronous=overlap)
            if st is not None and not experts_done and (i == gate_after + slot or not overlap):
                self.wait(st)
                self.experts_combine(st, asynchronous=combine_async)
                experts_done = True
            if i == nops:
                break
            op = OPS[i]
            if op == "ln_a0":
                v["a0"] = self.ln("ln_a0", x)
            elif op == "attn0":
                v["A"] = x + self.attn("attn0", v["a0"], B, Tn)
            elif op == "ln_m0":
                v["m0"] = self.ln("ln_m0", v["A"])
            elif op == "mlp0":
                v["H"] = v["A"] + self.ffn("mlp0", v["m0"])
            elif op == "ln_a1":
                v["a1"] = self.ln("ln_a1", v["H"])
            elif op == "attn1":
                v["A2"] = v["H"] + self.attn("attn1", v["a1"], B, Tn)
            elif op == "ln_m1":
                v["m1"] = self.ln("ln_m1", v["A2"])
            elif op == "se":
                if self.has_se:
                    c = torch.sigmoid(v["m1"] @ self.dense["cg_w"])
                    v["y"] = v["A2"] + c[:, None] * self.ffn("se", v["m1"])
                else:
                    v["y"] = v["A2"]
        self.wait(st)
        y = v["y"] + self.decode(st)
        return y, st["aux"]

    def dense_params(self):
        return list(self.dense.values())

    def expert_params(self):
        return [self.ew1, self.eb1, self.ew2, self.eb2]


def barrier():
    dist.barrier()


def bench_arch(name, args, rank, world):
    B, Tn = args.batch, args.seq
    torch.manual_seed(4321 + rank)
    model = Pair(name, args.d, args.hidden, args.experts, args.heads, rank, world, Tn, cf=args.cf, slot=args.slot)
    x = torch.rand(B * Tn, args.d) * 2 - 1
    dy = 1e-3 * torch.randn(B * Tn, args.d)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    dense = model.dense_params()
    res = {}
    step_keys = ("fwd_exposed", "bwd_exposed", "counts", "disp", "comb", "experts")
    keys = ("train", "pair", "ar") + step_keys
    acc = {k: 0.0 for k in keys}
    for i in range(args.warmup + args.steps):
        T.clear()
        barrier()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            y, aux = model(x, B, Tn)
        loss = (y.float() * dy).sum() + model.aux_w * aux.float()
        loss.backward()
        t1 = time.perf_counter()
        flat = torch.cat([p.grad.reshape(-1) for p in dense])
        dist.all_reduce(flat)
        o = 0
        for p in dense:
            p.grad.copy_(flat[o:o + p.numel()].view_as(p))
            o += p.numel()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=False)
        barrier()
        t3 = time.perf_counter()
        if i < args.warmup:
            continue
        acc["train"] += t3 - t0
        acc["pair"] += t1 - t0
        acc["ar"] += t2 - t1
        for k in step_keys:
            acc[k] += T.get(k, 0.0)
    iacc = {"infer": 0.0, "inf_exposed": 0.0, "inf_disp": 0.0}
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            T.clear()
            barrier()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                model(x, B, Tn)
            barrier()
            t1 = time.perf_counter()
            if i < args.warmup:
                continue
            iacc["infer"] += t1 - t0
            iacc["inf_exposed"] += T.get("fwd_exposed", 0.0)
            iacc["inf_disp"] += T.get("disp", 0.0)
        # the same exchanges alone, blocking, nothing else running: counts, dispatch, combine
        xs = model.ln("ln_m1", x)
        st = model.gate_dispatch(xs, asynchronous=False)
        rows_out = sum(st["send_splits"])
        rows_in = sum(st["recv_splits"])
        alone = {"counts_alone": 0.0, "disp_alone": 0.0, "comb_alone": 0.0}
        for i in range(args.warmup + args.steps):
            barrier()
            T.clear()
            model.gate_dispatch(xs, asynchronous=False)
            back = torch.empty(rows_out, args.d)
            t0 = time.perf_counter()
            dist.all_to_all_single(back, torch.empty(rows_in, args.d), st["send_splits"], st["recv_splits"])
            t1 = time.perf_counter()
            if i >= args.warmup:
                alone["counts_alone"] += T.get("counts", 0.0)
                alone["disp_alone"] += T.get("disp", 0.0)
                alone["comb_alone"] += t1 - t0
    allv = {**acc, **iacc, **alone}
    names = list(allv)
    t = torch.tensor([allv[k] for k in names], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # slowest rank
    for k, val in zip(names, t.tolist()):
        res[k] = val / args.steps * 1e3
    cnt = torch.tensor([rows_out], dtype=torch.float64)
    dist.all_reduce(cnt)
    res["rows_sent"] = cnt.item() / world
    return res


def worker(rank, world, args):
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if "RANK" in os.environ and args.launched:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world)
    rank, world = dist.get_rank(), dist.get_world_size()
    archs = [a for a in args.archs.split(",") if a]
    if rank == 0:
        print(f"# torch_peer: torch {torch.__version__}, gloo ({os.environ.get('GLOO_SOCKET_IFNAME')}), {world} ranks, "
              f"{torch.get_num_threads()} thread(s)/rank, d={args.d} hidden={args.hidden} experts={args.experts} "
              f"heads={args.heads}, {args.batch} x {args.seq} tokens/rank, cf={args.cf}, "
              f"schedule={'slot %d' % args.slot if args.slot is not None else 'dispatch waited after the dense ops'}, "
              f"{args.steps} timed steps after {args.warmup} warm-up (mean, ms, slowest rank)"
              + (f", link {args.link}" if args.link else "")
              + (", autocast bf16" if args.bf16 else ", fp32"), flush=True)
        print(f"{'arch':8s} {'train':>8s} {'pair f+b':>9s} {'speedup':>7s} {'infer':>8s} {'speedup':>7s} "
              f"{'allred':>7s} {'a2a alone':>9s} {'fwd exp':>8s} {'bwd exp':>8s} {'disp alone':>10s} {'disp wait':>9s} "
              f"{'hid disp':>8s} {'inf wait':>8s} {'hid inf':>7s} {'experts':>7s} {'rows':>5s}", flush=True)
    base = None
    for a in archs:
        if a not in ARCHS:
            if rank == 0:
                print(f"torch_peer: unknown arch {a}", file=sys.stderr)
            continue
        r = bench_arch(a, args, rank, world)
        if base is None and a == "top2":
            base = r
        if rank == 0:
            # a2a alone = counts + dispatch + combine run alone; hidden = 1 - dispatch wait / dispatch alone
            alone = r["counts_alone"] + r["disp_alone"] + r["comb_alone"]
            da = r["disp_alone"]
            hf = max(0.0, min(1.0, 1 - r["disp"] / da)) if da > 0 else 0
            hi = max(0.0, min(1.0, 1 - r["inf_disp"] / da)) if da > 0 else 0
            sp = base["train"] / r["train"] if base else 0
            si = base["infer"] / r["infer"] if base else 0
            print(f"{a:8s} {r['train']:8.1f} {r['pair']:9.1f} {sp:7.2f} {r['infer']:8.1f} {si:7.2f} {r['ar']:7.1f} "
                  f"{alone:9.1f} {r['fwd_exposed']:8.1f} {r['bwd_exposed']:8.1f} {da:10.1f} {r['disp']:9.1f} "
                  f"{hf:8.2f} {r['inf_disp']:8.1f} {hi:7.2f} {r['experts']:7.1f} {r['rows_sent']:5.0f}", flush=True)
    if rank == 0:
        print("# train = fwd + bwd + dense-grad all-reduce + SGD; pair f+b = fwd + bwd; allred = the all-reduce of the\n"
              "# dense gradients (gate included) as one buffer. a2a alone = the forward's exchanges (counts, dispatch,\n"
              "# combine) run alone, blocking, nothing else running (backward moves the same bytes). fwd exp / bwd exp =\n"
              "# time blocked in exchanges per training step (forward: counts + dispatch wait + combine; backward: the two\n"
              "# autograd exchanges), waits for the slower rank included. disp alone / disp wait = the dispatch alone and\n"
              "# the time waited on it in the training forward (inf wait: inference); hid = 1 - wait / alone (scmoe only\n"
              "# overlaps the dispatch; the combine stays exposed unless --slot). experts = local expert FFN forward;\n"
              "# rows = rows sent per rank per exchange (all ranks' mean).",
              flush=True)
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn (ignored under torch.distributed.run)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cf", type=float, default=2.0)
    ap.add_argument("--slot", type=int, default=None,
                    help="scmoe: run the experts after this many dense ops following the gate, combine async")
    ap.add_argument("--archs", default="top2,shared,top1,scmoe1,scmoe2,scmoe3,serial2")
    ap.add_argument("--link", default=os.environ.get("PEER_LINK", ""), help="label printed in the header")
    ap.add_argument("--bf16", action="store_true",
                    help="forward under torch.autocast('cpu', torch.bfloat16) (the peer of bench_overlap --precision bf16)")
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # the BLAS under torch, too
        os.environ.setdefault(v, str(args.threads))
    args.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.launched:
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    else:
        import torch.multiprocessing as mp
        args.port = free_port()
        mp.spawn(worker, args=(args.nproc, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
