#!/usr/bin/python3
"""torch_peer_gpu.py: the PyTorch peer of bench/cuda/bench_cuda.c's block pair on one GPU, printed beside
the library's numbers from the same run.

The model is pair.c's (bench/torch_peer.py's, on one device, no exchange):

    dense block l:  a0 = LN(x)   A  = x + Attn(a0)    m0 = LN(A)    H = A + MLP(m0)
    block l+1:      a1 = LN(H)   A2 = H + Attn(a1)    m1 = LN(A2)
    top2:           y = A2 + MoE_2(m1)
    scmoe2:         y = A2 + sigmoid(w_cg . m1) SE(m1) + MoE_1(m0)       (shortcut position 2, CG-1)

written plainly, the way a PyTorch user would: causal scaled_dot_product_attention (q, k, v from one
[d, 3d] projection), GELU (tanh form) FFNs d -> h -> d with biases, gate x Wg (no bias), softmax in fp32,
top-k renormalised for k > 1, GShard aux loss (weight 0.01), capacity C = k floor(cf ceil(S / E)) with
slots claimed in token order (the library's TOKEN priority; overflow dropped), then a loop over the
experts gathering their rows and adding the weighted outputs back with index_add_.

Precisions: fp32 (plain fp32 matmuls: TF32 off, as cuBLAS's default math the library's fp32 uses) and
torch.autocast(bfloat16) around the forward (fp32 weights, bf16 matmuls), the peer of bench_cuda --bf16.
Times: the training step is forward + backward (no optimizer step, as bench_cuda times it), the
inference step a forward under torch.inference_mode; medians over --reps after --warmup, with the device
synchronised around each.

--bench PATH runs that bench_cuda binary with the same shapes (once, and once more with --bf16 when
bf16 is asked) after the PyTorch runs, prints its output and then the two side by side, ending with
    VS TORCH fp32 (N tokens): top2 train Rx infer Rx  scmoe2 train Rx infer Rx
    VS TORCH bf16 (N tokens): ...
where R = PyTorch ms / library ms (>= 1: the library is at least as fast). tools/gpu_check.sh reads these.

Run:  /usr/bin/python3 bench/cuda/torch_peer_gpu.py [--device cuda] [--d 1024] [--hidden 4096]
          [--experts 8] [--heads 16] [--seq 512] [--batch 8] [--reps 10] [--warmup 2]
          [--precisions fp32,bf16] [--archs top2,scmoe2] [--bench build/bench/bench_cuda]
      --device cpu on tiny shapes is the smoke test (no GPU needed; bench_cuda_emu can stand in for
      bench_cuda there)."""
import argparse
import math
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def gelu(x):
    return F.gelu(x, approximate="tanh")


class Pair(torch.nn.Module):
    def __init__(self, arch, d, h, E, heads, cf=2.0, aux_w=0.01, seed=1234):
        super().__init__()
        assert arch in ("top2", "scmoe2"), arch
        assert d % heads == 0, "d must be a multiple of heads"
        self.arch, self.k = arch, 2 if arch == "top2" else 1
        self.d, self.h, self.E, self.heads, self.cf, self.aux_w = d, h, E, heads, cf, aux_w
        g = torch.Generator().manual_seed(seed)
        std, res_std = 0.02, 0.02 / math.sqrt(4.0)

        def normal(*shape, s=std):
            return torch.nn.Parameter(torch.empty(shape).normal_(0.0, s, generator=g))

        def const(v, *shape):
            return torch.nn.Parameter(torch.full(shape, float(v)))

        P = torch.nn.ParameterDict()
        for ln in ("ln_a0", "ln_m0", "ln_a1", "ln_m1"):
            P[ln + "_w"], P[ln + "_b"] = const(1, d), const(0, d)
        for a in ("attn0", "attn1"):
            P[a + "_wqkv"], P[a + "_bqkv"] = normal(3 * d, d), const(0, 3 * d)
            P[a + "_wo"], P[a + "_bo"] = normal(d, d, s=res_std), const(0, d)
        for f in ["mlp0"] + (["se"] if arch == "scmoe2" else []):
            P[f + "_w1"], P[f + "_b1"] = normal(h, d), const(0, h)
            P[f + "_w2"], P[f + "_b2"] = normal(d, h, s=res_std), const(0, d)
        if arch == "scmoe2":
            P["cg_w"] = const(0, d)
        P["gate_w"] = normal(d, E)
        P["ew1"], P["eb1"] = normal(E, d, h), const(0, E, h)
        P["ew2"], P["eb2"] = normal(E, h, d, s=res_std), const(0, E, d)
        self.p = P

    def ln(self, name, x):
        return F.layer_norm(x, (self.d,), self.p[name + "_w"], self.p[name + "_b"], 1e-5)

    def attn(self, name, x, B, T):
        H, hd = self.heads, self.d // self.heads
        qkv = F.linear(x, self.p[name + "_wqkv"], self.p[name + "_bqkv"]).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if hasattr(F, "scaled_dot_product_attention"):  # torch >= 2.0 (the GPU machine's 2.11)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # torch 1.13 (this project's CPU machines): the same math spelled out
            s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            o = torch.softmax(s, dim=-1) @ v
        return F.linear(o.transpose(1, 2).reshape(B * T, self.d), self.p[name + "_wo"], self.p[name + "_bo"])

    def ffn(self, name, x):
        return F.linear(gelu(F.linear(x, self.p[name + "_w1"], self.p[name + "_b1"])), self.p[name + "_w2"],
                        self.p[name + "_b2"])

    def moe(self, x):
        """top-k gate, capacity in token order, a loop over the experts; returns (sum_j w_j E_j(x), aux)"""
        n, E, k = x.shape[0], self.E, self.k
        p = torch.softmax((x @ self.p["gate_w"]).float(), dim=1)
        w, e = p.topk(k, dim=1)
        if k > 1:
            w = w / w.sum(dim=1, keepdim=True).clamp_min(1.1920929e-07)
        aux = E * (p.mean(0) * F.one_hot(e[:, 0], E).float().mean(0)).sum()
        cap = k * int(self.cf * ((n + E - 1) // E))
        flat_e, flat_w = e.reshape(-1), w.reshape(-1)  # assignment a = t k + j
        with torch.no_grad():
            onehot = F.one_hot(flat_e, E)
            slot = (onehot.cumsum(0) - 1).gather(1, flat_e[:, None]).squeeze(1)
            keep = slot < cap
        y = None
        for j in range(E):
            a = ((flat_e == j) & keep).nonzero().squeeze(1)
            if a.numel() == 0:
                continue
            tok = torch.div(a, k, rounding_mode="floor")
            z = gelu(torch.addmm(self.p["eb1"][j], x.index_select(0, tok), self.p["ew1"][j]))
            out = torch.addmm(self.p["eb2"][j], z, self.p["ew2"][j]) * flat_w.index_select(0, a)[:, None].to(z.dtype)
            if y is None:
                y = out.new_zeros((n, self.d))
            y = y.index_add(0, tok, out)
        return (x.new_zeros((n, self.d)) if y is None else y), aux

    def forward(self, x, B, T):
        a0 = self.ln("ln_a0", x)
        A = x + self.attn("attn0", a0, B, T)
        m0 = self.ln("ln_m0", A)
        H = A + self.ffn("mlp0", m0)
        a1 = self.ln("ln_a1", H)
        A2 = H + self.attn("attn1", a1, B, T)
        m1 = self.ln("ln_m1", A2)
        if self.arch == "top2":
            r, aux = self.moe(m1)
            return A2 + r, aux
        r, aux = self.moe(m0)
        c = torch.sigmoid(m1 @ self.p["cg_w"])
        return A2 + c[:, None] * self.ffn("se", m1) + r, aux


def timed(fn, reps, warmup, dev):
    ts = []
    for i in range(warmup + reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def bench_torch(arch, prec, a, dev):
    torch.manual_seed(4321)
    model = Pair(arch, a.d, a.hidden, a.experts, a.heads, cf=a.cf).to(dev)
    n = a.batch * a.seq
    x = (torch.rand(n, a.d, device=dev) * 2 - 1)
    dy = 1e-3 * torch.randn(n, a.d, device=dev)
    params = list(model.parameters())
    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")

    def train():
        for q in params:
            q.grad = None
        with ac:
            y, aux = model(x, a.batch, a.seq)
            loss = (y.float() * dy).sum() + model.aux_w * aux
        loss.backward()

    def infer():
        with torch.inference_mode(), ac:
            model(x, a.batch, a.seq)

    t = timed(train, a.reps, a.warmup, dev)
    i = timed(infer, a.reps, a.warmup, dev)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return t, i


PAIR_LINE = re.compile(r"^\s*(top2|scmoe2)\s+train\s+([0-9.]+) ms\s+infer\s+([0-9.]+) ms")


def bench_library(path, prec, a):
    """bench_cuda's pair times {arch: (train ms, infer ms)}, and its output"""
    cmd = [path, "--d", str(a.d), "--hidden", str(a.hidden), "--experts", str(a.experts), "--heads", str(a.heads),
           "--seq", str(a.seq), "--batch", str(a.batch), "--reps", str(a.reps)]
    if a.tokens:
        cmd += ["--tokens", str(a.tokens)]
    if prec == "bf16":
        cmd.append("--bf16")
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=a.bench_timeout)
    times = {}
    for line in r.stdout.splitlines():
        m = PAIR_LINE.match(line)
        if m:
            times[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return times, r.stdout, r.returncode, " ".join(cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cf", type=float, default=2.0, help="capacity factor (the library's default)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--archs", default="top2,scmoe2")
    ap.add_argument("--bench", default="", help="a bench_cuda binary to run with the same shapes")
    ap.add_argument("--tokens", type=int, default=0, help="passed to bench_cuda for its layer part (0: its default)")
    ap.add_argument("--bench-timeout", type=float, default=240.0)
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("ok - torch_peer_gpu # SKIP no CUDA device visible to PyTorch")
            return 0
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as the library's CUDA_MATH_FP32
        torch.backends.cudnn.allow_tf32 = False
        where = torch.cuda.get_device_name(dev)
    else:
        where = "cpu, %d threads" % torch.get_num_threads()
    precs = [q for q in a.precisions.split(",") if q]
    archs = [q for q in a.archs.split(",") if q]
    for q in precs:
        if q not in ("fp32", "bf16"):
            ap.error("unknown precision " + q)
    n = a.batch * a.seq
    print(f"# torch_peer_gpu: torch {torch.__version__} on {where}; d={a.d} h={a.hidden} E={a.experts} "
          f"heads={a.heads} {a.batch} x {a.seq} = {n} tokens, cf {a.cf}; median ms of {a.reps} after {a.warmup} "
          f"warm-up (train = forward + backward, infer = forward)", flush=True)
    torch_ms = {}
    for q in precs:
        for arch in archs:
            torch_ms[q, arch] = bench_torch(arch, q, a, dev)
            t, i = torch_ms[q, arch]
            print(f"torch {q:4s} {arch:6s} train {t:9.3f} ms  infer {i:9.3f} ms", flush=True)
    lib = {}
    failed = 0
    if a.bench:
        for q in precs:
            times, out, rc, cmd = bench_library(a.bench, q, a)
            print(f"# {cmd}\n{out.rstrip()}", flush=True)
            if rc != 0 or any(arch not in times for arch in archs):
                print(f"torch_peer_gpu: {cmd} exited {rc} without the pair's times", flush=True)
                failed = 1
            lib[q] = times
    if not a.bench:
        return 0
    print(f"{'precision':9s} {'arch':6s} {'torch train':>11s} {'torch infer':>11s} {'lib train':>10s} {'lib infer':>10s} "
          f"{'VS TORCH train':>14s} {'infer':>7s}")
    for q in precs:
        for arch in archs:
            t, i = torch_ms[q, arch]
            lt, li = lib.get(q, {}).get(arch, (float("nan"), float("nan")))
            print(f"{q:9s} {arch:6s} {t:11.3f} {i:11.3f} {lt:10.3f} {li:10.3f} {t / lt:13.3f}x {i / li:6.3f}x")
    for q in precs:
        if q in lib and all(arch in lib[q] for arch in archs):
            parts = "  ".join(f"{arch} train {torch_ms[q, arch][0] / lib[q][arch][0]:.3f}x "
                              f"infer {torch_ms[q, arch][1] / lib[q][arch][1]:.3f}x" for arch in archs)
            print(f"VS TORCH {q} ({n} tokens): {parts}")
    print("# VS TORCH = PyTorch ms / library ms: >= 1 means the library is at least as fast as PyTorch eager")
    return failed


if __name__ == "__main__":
    sys.exit(main())
