#!/usr/bin/env python3
"""gpu_summary.py: the summary block of a tools/gpu_check.sh run, from its log directory.

    tools/gpu_summary.py DIR

DIR holds commands.tsv (one line per command: name, kind, exit status, seconds, the command; tab
separated), NAME.log for each, and device.log (nvidia-smi's line). Kinds and what passing means:

    test   exit 0, a last "N passed, 0 failed" line and no "# SKIP" line (a GPU machine skipping its
           device checks did not test the device)
    san    compute-sanitizer's "ERROR SUMMARY: 0 errors" (racecheck: "RACECHECK SUMMARY: .. (0 errors")
           and exit 0 (the program under it passed; 86 is the sanitizer's --error-exitcode)
    bench  exit 0, no SKIP, and the figures it exists for (see below)

Exit status 124 or 137 is reported as a timeout. The figures, from the bench logs (bench_cuda's own
lines, also where bench/cuda/torch_peer_gpu.py ran it and printed its output):

    RATIO fp32 / RATIO bf16     bench_cuda's "RATIO library / cuBLAS TFLOP/s" after its "layer experts
                                ... (fp32|bf16 math)" header, single-rank runs (issue 19's target at
                                8k tokens: >= 0.85 fp32, >= 0.6 bf16)
    SPEEDUP scmoe2/top2         bench_cuda's "SPEEDUP scmoe2 over top2" after its "pair ... N rank(s)"
                                header, per math, tokens and ranks (target: >= 1 everywhere)
    VS TORCH fp32 / bf16        torch_peer_gpu.py's "VS TORCH" lines: PyTorch ms / library ms
                                (target: >= 1)

Prints the block and exits 0 when every command passed, 1 otherwise (2: no commands.tsv)."""
import os
import re
import sys

TARGET_RATIO = {"fp32": 0.85, "bf16": 0.6}
SAN_EXIT = 86  # compute-sanitizer --error-exitcode in gpu_check.sh

RE_SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$")
RE_SAN = re.compile(r"ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?")
RE_LAYER = re.compile(r"^layer experts\s+E=\d+ d=\d+ h=\d+ rows=(\d+)/rank\s+\((\w+) math\)")
RE_RATIO = re.compile(r"RATIO library / cuBLAS TFLOP/s: ([0-9.]+|nan|inf)")
RE_PAIR = re.compile(r"^pair\s+d=\d+ h=\d+ E=\d+ heads=\d+ batch=(\d+) seq=(\d+), (\d+) rank")
RE_SPEEDUP = re.compile(r"SPEEDUP scmoe2 over top2: train ([0-9.]+|nan|inf)x\s+infer ([0-9.]+|nan|inf)x")
RE_CMD_MATH = re.compile(r"^# \S*bench_cuda\S*(.*)$")
RE_VS = re.compile(r"^VS TORCH (\w+) \((\d+) tokens\): (.*)$")
RE_VS_PART = re.compile(r"(\w+) train ([0-9.]+|nan|inf)x infer ([0-9.]+|nan|inf)x")


def verdict(name, kind, rc, log):
    """(passed, detail) of one command"""
    if rc in (124, 137):
        return False, "TIMEOUT (exit %d)" % rc
    lines = log.splitlines()
    skipped = [line for line in lines if "# SKIP" in line]
    if kind == "test":
        sums = [RE_SUMMARY.match(line.strip()) for line in lines]
        sums = [m for m in sums if m]
        if not sums:
            return False, "exit %d without a summary line" % rc
        p, f = int(sums[-1].group(1)), int(sums[-1].group(2))
        detail = "%d passed, %d failed" % (p, f)
        if skipped:
            return False, detail + ", %d SKIP line(s): %s" % (len(skipped), skipped[0].strip()[:100])
        if f or rc:
            bad = [line.strip() for line in lines if line.startswith("not ok")]
            return False, detail + (", exit %d" % rc if rc else "") + ("; first: " + bad[0][:120] if bad else "")
        return True, detail
    if kind == "san":
        errs = [int(m.group(1) or m.group(2)) for m in map(RE_SAN.search, lines) if m]
        if not errs:
            return False, "exit %d without compute-sanitizer's ERROR SUMMARY" % rc
        n = max(errs)
        if rc == SAN_EXIT and not n:
            n = 1  # gpu_check.sh runs it with --error-exitcode SAN_EXIT: errors, whatever the text says
        sums = [m for m in (RE_SUMMARY.match(line.strip()) for line in lines) if m]
        app = "%s passed, %s failed" % (sums[-1].group(1), sums[-1].group(2)) if sums else "no test summary"
        if n:
            first = [line.strip() for line in lines if line.startswith("=========") and
                     ("Error" in line or "error" in line or "hazard" in line or "Uninitialized" in line)]
            return False, "%d errors (%s)%s" % (n, app, "; first: " + first[0][:120] if first else "")
        if rc or (sums and int(sums[-1].group(2))):
            return False, "0 errors but the program failed: %s, exit %d" % (app, rc)
        return True, "0 errors (%s)" % app
    # bench
    if rc:
        return False, "exit %d" % rc
    if skipped:
        return False, "SKIP: " + skipped[0].strip()[:100]
    if not any(RE_SPEEDUP.search(line) or RE_VS.match(line) for line in lines):
        return False, "no SPEEDUP or VS TORCH line in its output"
    return True, "ok"


def figures(log, ratios, speedups, vs):
    math, rows, pair = "fp32", None, None
    for line in log.splitlines():
        line = line.rstrip()
        m = RE_CMD_MATH.match(line)  # torch_peer_gpu.py prints bench_cuda's command line before its output
        if m:
            math = "bf16" if "--bf16" in m.group(1).split() else "fp32"
        m = RE_LAYER.match(line.strip())
        if m:
            rows, math = int(m.group(1)), m.group(2)
        m = RE_RATIO.search(line)
        if m and rows is not None:
            ratios.append((math, rows, float(m.group(1))))
        m = RE_PAIR.match(line.strip())
        if m:
            pair = (int(m.group(1)) * int(m.group(2)), int(m.group(3)))
        m = RE_SPEEDUP.search(line)
        if m and pair:
            speedups.append((math, pair[0], pair[1], float(m.group(1)), float(m.group(2))))
        m = RE_VS.match(line)
        if m:
            parts = [(a, float(t), float(i)) for a, t, i in RE_VS_PART.findall(m.group(3))]
            vs.append((m.group(1), int(m.group(2)), parts))


def mark(v, target):
    return "met" if v >= target else "MISSED"


def main(argv):
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    d = argv[1]
    try:
        with open(os.path.join(d, "commands.tsv")) as f:
            cmds = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError as e:
        print("gpu_summary: %s" % e, file=sys.stderr)
        return 2
    try:
        with open(os.path.join(d, "device.log")) as f:
            device = (f.read().strip().splitlines() or ["(empty device.log)"])[0]
    except OSError:
        device = "(no device.log)"
    rows, ratios, speedups, vs = [], [], [], []
    for c in cmds:
        name, kind, rc, secs, cmd = (c + [""] * 5)[:5]
        try:
            with open(os.path.join(d, name + ".log"), errors="replace") as f:
                log = f.read()
        except OSError:
            log = ""
        rc = int(rc) if rc.lstrip("-").isdigit() else 255
        ok, detail = verdict(name, kind, rc, log)
        rows.append((ok, name, secs, detail))
        if kind == "bench":  # RATIO from single-rank runs only: ranks sharing a GPU divide it
            figures(log, ratios if " -np " not in cmd else [], speedups, vs)
    n_ok = sum(1 for r in rows if r[0])
    out = ["==== check-gpu summary: %s ====" % device]
    out.append("%s: %d passed, %d failed (of %d commands)" % ("PASSED" if n_ok == len(rows) else "FAILED", n_ok,
                                                              len(rows) - n_ok, len(rows)))
    for ok, name, secs, detail in rows:
        out.append("  %-6s %-28s %5ss  %s" % ("ok" if ok else "FAILED", name, secs, detail))
    for math in ("fp32", "bf16"):
        rs = [(n, r) for m, n, r in ratios if m == math]
        if rs:
            first = rs[0]
            more = ", ".join("%.3f" % r for _, r in rs[1:])
            out.append("RATIO %s %.3f  (library experts fwd+bwd / plain cuBLAS, %d rows, 1 rank; target >= %.2f at "
                       "8192: %s%s)" % (math, first[1], first[0], TARGET_RATIO[math],
                                        mark(first[1], TARGET_RATIO[math]), "; reruns " + more if more else ""))
        else:
            out.append("RATIO %s n/a" % math)
    if speedups:
        for math, tok, ranks, t, i in speedups:
            out.append("SPEEDUP scmoe2/top2 train %.3fx infer %.3fx  (%s, %d tokens/rank, %d rank%s; target >= 1: %s)"
                       % (t, i, math, tok, ranks, "" if ranks == 1 else "s", mark(min(t, i), 1.0)))
    else:
        out.append("SPEEDUP scmoe2/top2 n/a")
    for math in ("fp32", "bf16"):
        lines = [(tok, parts) for m, tok, parts in vs if m == math]
        for tok, parts in lines:
            s = "  ".join("%s train %.3fx infer %.3fx" % p for p in parts)
            low = min([min(t, i) for _, t, i in parts] or [0.0])
            out.append("VS TORCH %s %s  (%d tokens; PyTorch ms / library ms, target >= 1: %s)" % (math, s, tok,
                                                                                                  mark(low, 1.0)))
        if not lines:
            out.append("VS TORCH %s n/a" % math)
    out.append("check-gpu: %d passed, %d failed" % (n_ok, len(rows) - n_ok))
    print("\n".join(out))
    return 0 if n_ok == len(rows) and rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
