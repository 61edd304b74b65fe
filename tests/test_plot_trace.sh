#!/usr/bin/env bash
# test_plot_trace.sh: tools/plot_trace on a small synthetic trace written here (the format of
# schedule.c: "ph":"X" events, pid = rank, tid 0 compute / 1 token exchange / 2 gradient all-reduce,
# args.step and args.pass, the all-reduce event without args), checked with python3's xml.etree:
# well-formed SVG, one lane group per rank with its three lanes, boxes for the chosen step only,
# a time axis, a legend; two panels with `--`; an unclosed trace; bad input.
# Needs python3 only. Ends with "N passed, N failed"; exits non-zero on a failure.
set -u
cd "$(dirname "$0")/.." || exit 2
PLOT=tools/plot_trace

pass=0 fail=0
ok() { echo "ok - $1"; pass=$((pass + 1)); }
not_ok() { # not_ok NAME [DETAIL]
    echo "not ok - $1"
    fail=$((fail + 1))
    [ -n "${2:-}" ] && printf '%s\n' "$2" | head -n 20 | sed 's/^/#   /'
    return 0
}
check() { # check NAME CMD...: ok when CMD succeeds; its output is shown on failure
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$name"; else not_ok "$name" "$out"; fi
}

if ! command -v python3 >/dev/null 2>&1; then
    echo "not ok - python3 is needed"
    echo "0 passed, 1 failed"
    exit 1
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/scmoe_plot.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# ---- a synthetic trace: 2 ranks, training steps 1 and 2, an inference step 3 ----
python3 - "$TMP" <<'EOF'
import json, sys
out = sys.argv[1]
fwd = ["ln_a0", "attn0", "ln_m0", "gate_encode", "mlp0", "experts", "ln_a1", "attn1", "ln_m1", "shared_expert", "decode"]
bwd = ["decode_bwd", "shared_expert_bwd", "experts_bwd", "ln_m1_bwd", "attn1_bwd", "ln_a1_bwd", "mlp0_bwd", "gate_bwd",
       "ln_m0_bwd", "attn0_bwd", "ln_a0_bwd"]
def write(path, rank, prefix_ts, close=True):
    lines = ['{"name":"process_name","ph":"M","pid":%d,"args":{"name":"rank %d"}}' % (rank, rank)]
    for tid, n in ((0, "compute"), (1, "communication"), (2, "gradient all-reduce")):
        lines.append('{"name":"thread_name","ph":"M","pid":%d,"tid":%d,"args":{"name":"%s"}}' % (rank, tid, n))
    t = prefix_ts
    def ev(name, ts, dur, tid, step, pas):
        d = {"name": name, "cat": "comm" if tid else "compute", "ph": "X", "ts": ts, "dur": dur, "pid": rank, "tid": tid}
        if step is not None:
            d["args"] = {"step": step, "pass": pas}
        lines.append(json.dumps(d, separators=(",", ":")))
    for step, training in ((1, True), (2, True), (3, False)):
        s0 = t
        for name in fwd:
            ev(name, t, 1000.0, 0, step, "forward"); t += 1000.0
        ev("dispatch", s0 + 3500.0, 2000.0, 1, step, "forward")
        ev("combine", s0 + 6000.0, 3000.0, 1, step, "forward")
        if training:
            b0 = t
            for name in bwd:
                ev(name, t, 800.0, 0, step, "backward"); t += 800.0
                if name == "experts_bwd":
                    t += 1000.0  # compute idle while grad_combine flies: an exposed wait
            ev("grad_dispatch", b0 + 500.0, 1500.0, 1, step, "backward")
            ev("grad_combine", b0 + 2500.0, 1500.0, 1, step, "backward")
            ev("grad_allreduce", b0 + 4000.0, 6000.0, 2, None, None)  # written with no args, as schedule.c does
        t += 2000.0
    text = "[\n" + ",\n".join(lines) + ("\n]\n" if close else "")
    open(path, "w").write(text)
write(out + "/syn.rank0.json", 0, 1.0e9)
write(out + "/syn.rank1.json", 1, 1.0e9 + 50.0)
write(out + "/open.json", 0, 5.0e8, close=False)  # a trace whose pair was never destroyed
EOF

# ---- an SVG checker: python3 CHECK SVG [expectations...] ----
cat >"$TMP/check.py" <<'EOF'
import sys, xml.etree.ElementTree as ET
NS = "{http://www.w3.org/2000/svg}"
svg = sys.argv[1]
try:
    root = ET.parse(svg).getroot()
except ET.ParseError as e:
    print("not well-formed XML: %s" % e); sys.exit(1)
if root.tag != NS + "svg":
    print("root element is %s, not svg" % root.tag); sys.exit(1)
texts = ["".join(t.itertext()) for t in root.iter(NS + "text")]
titles = ["".join(t.itertext()) for t in root.iter(NS + "title")]
rects = list(root.iter(NS + "rect"))
def count(lst, s): return sum(1 for x in lst if x == s)
def has_title(prefix): return [t for t in titles if t.startswith(prefix)]
bad = []
for exp in sys.argv[2:]:
    kind, _, arg = exp.partition(":")
    if kind == "text":          # a text element equal to arg
        if arg not in texts: bad.append("no text %r" % arg)
    elif kind == "ntext":       # text=N: exactly N text elements equal to text
        s, _, n = arg.rpartition("=")
        if count(texts, s) != int(n): bad.append("%d texts %r, expected %s" % (count(texts, s), s, n))
    elif kind == "textin":      # a text element containing arg
        if not any(arg in t for t in texts): bad.append("no text containing %r" % arg)
    elif kind == "box":         # a box whose tooltip starts with arg
        if not has_title(arg): bad.append("no box titled %r..." % arg)
    elif kind == "nobox":       # no box whose tooltip contains arg
        if any(arg in t for t in titles): bad.append("a box titled ...%r... should not be there" % arg)
    elif kind == "nboxes":      # prefix=N: exactly N boxes whose tooltip starts with prefix
        s, _, n = arg.rpartition("=")
        if len(has_title(s)) != int(n): bad.append("%d boxes %r..., expected %s" % (len(has_title(s)), s, n))
    elif kind == "minrects":
        if len(rects) < int(arg): bad.append("%d rects, expected at least %s" % (len(rects), arg))
    else:
        bad.append("unknown expectation " + exp)
if bad:
    print("\n".join(bad)); sys.exit(1)
EOF
svgcheck() { python3 "$TMP/check.py" "$@"; }

# ---- one panel, the default step: the last training step (2), not the inference step 3 ----
S1=$TMP/one.svg
check "plot_trace writes an SVG for 2 ranks" "$PLOT" --out "$S1" "$TMP"/syn.rank0.json "$TMP"/syn.rank1.json
check "the SVG is well-formed XML with an <svg> root" svgcheck "$S1"
check "one lane group per rank" svgcheck "$S1" "ntext:rank 0=1" "ntext:rank 1=1"
check "each rank has compute, token exchange and all-reduce lanes" svgcheck "$S1" \
    "ntext:compute=2" "ntext:token exchange=2" "ntext:grad all-reduce=2"
check "default step = the last training step (2)" svgcheck "$S1" "textin:step 2" \
    "box:attn0 (rank 0, step 2, forward)" "box:attn0_bwd (rank 1, step 2, backward)" \
    "nobox:step 1," "nobox:step 3,"
check "every event of step 2 is a box, on each rank" svgcheck "$S1" \
    "nboxes:experts (=2" "nboxes:experts_bwd (=2" "nboxes:dispatch (=2" "nboxes:grad_combine (=2"
check "the all-reduce (no args in the file) is given its step" svgcheck "$S1" \
    "box:grad_allreduce (rank 0, step 2, grad sync)" "box:grad_allreduce (rank 1, step 2, grad sync)"
check "boxes are labelled with op names" svgcheck "$S1" "text:experts" "text:mlp0" "text:dispatch"
check "a time axis in ms" svgcheck "$S1" "textin:time (ms)" "text:0" "text:10"
check "forward and backward bands" svgcheck "$S1" "text:forward" "text:backward"
check "a legend" svgcheck "$S1" "text:legend" "text:attention" "text:routed experts" \
    "text:token exchange (all-to-all)" "text:dense-gradient all-reduce"
check "exposed waits are marked" svgcheck "$S1" "box:compute idle while an exchange is in flight"

# ---- options ----
S2=$TMP/step1.svg
check "--step 1 --title" "$PLOT" --out "$S2" --step 1 --title "my title" "$TMP"/syn.rank*.json
check "--step 1 draws step 1 only, with the title" svgcheck "$S2" "text:my title" \
    "box:attn0 (rank 0, step 1, forward)" "nobox:step 2,"
S3=$TMP/range.svg
check "--step 1-3 --pass forward" "$PLOT" --out "$S3" --step 1-3 --pass forward "$TMP/syn"
check "a range draws every step's forward (prefix expanded to its rank files)" svgcheck "$S3" \
    "nboxes:attn0 (=6" "nobox:backward)" "text:forward 1" "text:forward 3"
check "--list prints the steps" sh -c "'$PLOT' --list '$TMP/syn' | grep -q 'step 3: forward'"
check "SVG on standard output without --out" sh -c "'$PLOT' '$TMP/syn' | python3 -c 'import sys, xml.etree.ElementTree as E; E.parse(sys.stdin)'"

# ---- two panels, stacked, each with its title ----
S4=$TMP/cmp.svg
check "two traces side by side with --" "$PLOT" --out "$S4" --label "top2" --label "scmoe" \
    "$TMP"/syn.rank*.json -- "$TMP/open.json"
check "both panels drawn with their titles and lanes" svgcheck "$S4" "text:top2" "text:scmoe" \
    "ntext:compute=3" "textin:top2 vs scmoe" "box:attn0 (rank 0, step 2, forward)"
check "an unclosed trace (no final ]) is read" svgcheck "$S4" "nboxes:experts_bwd (=3"

# ---- bad input ----
check "a missing file fails with a message" sh -c "! '$PLOT' --out '$TMP/x.svg' '$TMP/nope.json' 2>'$TMP/err' && grep -q 'no such trace' '$TMP/err'"
check "an unknown option fails" sh -c "! '$PLOT' --bogus '$TMP/syn' 2>/dev/null"
check "a step not in the trace fails" sh -c "! '$PLOT' --out '$TMP/x.svg' --step 99 '$TMP/syn' 2>/dev/null"
printf 'not json' >"$TMP/bad.json"
check "a file that is not JSON fails" sh -c "! '$PLOT' --out '$TMP/x.svg' '$TMP/bad.json' 2>/dev/null"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
