#!/usr/bin/env python3
"""Summary tables for scripts/bench.sh (stdlib only).

  report.py wrk  RUNS.tsv MEM.tsv LB_LABEL CLK_TCK MODE [SWITCH_US]
        (MODE: http, tls, cold or limit; SWITCH_US, for limit: what one sleep and wake-up
        costs on one CPU here with so many threads taking turns, from switch_cost.rs, as
        "2=14.1,32=21.0,256=33.2"; empty when not measured)
  report.py idle IDLE.tsv LB_LABEL
  report.py first FIRST.tsv LB_LABEL

RUNS.tsv, one line per wrk run:
  cell server round rps p50_ms p99_ms errors requests cpu_ticks context_switches
  machine_busy_ticks machine_total_ticks error_detail
MEM.tsv, one line per server: server peak_rss_kb(VmHWM)
IDLE.tsv: the lines printed by idle.py (its label is the server).
FIRST.tsv, one line per first_answer.py run: version server round json

Server "lb" is the balancer under test; "nginx" and "haproxy" are the references.
"""

import json
import math
import sys
from statistics import median

SERVERS = ["lb", "nginx", "haproxy"]
CELLS = [  # (cell id, description)
    ("c1", "1 conn keep-alive"),
    ("c32", "32 conns keep-alive"),
    ("c256", "256 conns keep-alive"),
    ("close32", "32 conns Connection: close"),
    ("c32_12", "TLS 1.2: 32 keep-alive"),
    ("close32_12", "TLS 1.2: 32 close"),
    ("cold256", "256 conns, cold start"),
]
CELL_CONNS = {"c1": 1, "c32": 32, "c256": 256, "close32": 32, "cold256": 256, "c32_12": 32,
              "close32_12": 32}
# Targets for the balancer under test, by mode and cell: the least req/s ratio to nginx, to
# HAProxy (None: no target), and whether its p99 must be at or below nginx's.
TARGETS = {
    "http": {
        "c1": (1.1, None, False),
        "c32": (0.75, None, False),
        "c256": (0.9, None, True),
        "close32": (1.0, 1.0, False),
    },
    "tls": {
        "c32": (0.8, None, False),
        "close32": (1.0, None, False),
        "c32_12": (0.8, None, False),
        "close32_12": (1.0, None, False),
    },
    "cold": {
        "cold256": (None, None, True),
    },
    "limit": {},
}
# Idle targets, defined for 1000 idle clients.
IDLE_RSS_MIB = 24
IDLE_WALL_S = 0.5


def fmt_ms(v):
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def parse_switch_us(text):
    """{threads: microseconds} from "2=14.1,32=21.0,256=33.2" (empty text: nothing measured)."""
    pairs = (item.split("=") for item in text.split(",") if "=" in item)
    return {int(threads): float(us) for threads, us in pairs}


def paired_ratio(rs, others):
    """Median over rounds of each round's req/s against the other server's in that round."""
    by_round = {r["round"]: r for r in others}
    paired = [r["rps"] / by_round[r["round"]]["rps"] for r in rs
              if r["round"] in by_round and by_round[r["round"]]["rps"] > 0]
    return median(paired) if paired else math.nan


def target_verdict(target, ratio, ratio_haproxy, p99, nginx_p99, errors):
    """The target column of the balancer's row, and whether the target is met."""
    least_nginx, least_haproxy, p99_below = target
    ok, want = errors == 0, []
    if least_nginx is not None:
        ok = ok and ratio >= least_nginx
        want.append(f">={least_nginx:.2f}x")
    if least_haproxy is not None:
        ok = ok and ratio_haproxy >= least_haproxy
        want.append(f">={least_haproxy:.1f}x haproxy")
    if p99_below:
        ok = ok and p99 <= nginx_p99
        want.append("p99<=nginx")
    return f"{' & '.join(want)} {'MET' if ok else 'NOT MET'}" + (" (errors)" if errors else ""), ok


def report_wrk(runs_path, mem_path, lb_label, clk_tck, mode, switch_us):
    runs = {}  # (cell, server) -> list of dicts, in round order
    for line in open(runs_path):
        f = line.rstrip("\n").split("\t")
        if len(f) < 12:
            continue
        run = dict(round=int(f[2]), rps=float(f[3]), p50=float(f[4]), p99=float(f[5]),
                   errors=int(f[6]), requests=int(f[7]), ticks=int(f[8]), switches=int(f[9]),
                   busy=int(f[10]), total=int(f[11]), detail=f[12] if len(f) > 12 else "")
        runs.setdefault((f[0], f[1]), []).append(run)
    peak = {}
    for line in open(mem_path):
        server, kb = line.split()[:2]
        peak[server] = int(kb)

    name = {"lb": lb_label, "nginx": "nginx", "haproxy": "haproxy"}
    width = max(10, len(lb_label))
    header = (f"{'cell':<27} {'server':<{width}} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'CPU us/req':>10} {'cs/req':>6} {'x nginx':>8}  {'ERRORS':<8} target")
    print(header)
    print("-" * len(header))
    verdicts, error_notes = [], []
    for cell, desc in CELLS:
        nginx_runs = runs.get((cell, "nginx"), [])
        nginx_p99 = median(r["p99"] for r in nginx_runs) if nginx_runs else math.nan
        shown = 0
        for server in SERVERS:
            rs = runs.get((cell, server), [])
            if not rs:
                continue
            rps = median(r["rps"] for r in rs)
            p50 = median(r["p50"] for r in rs)
            p99 = median(r["p99"] for r in rs)
            reqs = sum(r["requests"] for r in rs)
            cpu_us = sum(r["ticks"] for r in rs) * 1e6 / clk_tck / reqs if reqs else math.nan
            switches = sum(r["switches"] for r in rs) / reqs if reqs else math.nan
            errors = sum(r["errors"] for r in rs)
            ratio = paired_ratio(rs, nginx_runs)
            ratio_s = "" if server == "nginx" else f"{ratio:.2f}x"
            err_s = f"ERR {errors}" if errors else "-"
            if errors:
                details = "; ".join(f"round {r['round']}: {r['detail']}" for r in rs if r["errors"])
                error_notes.append(f"  {desc}, {name[server]}: {details}")
            target_s = ""
            target = TARGETS[mode].get(cell)
            if server == "lb" and target:
                ratio_haproxy = paired_ratio(rs, runs.get((cell, "haproxy"), []))
                target_s, ok = target_verdict(target, ratio, ratio_haproxy, p99, nginx_p99, errors)
                verdicts.append(ok)
            print(f"{desc if shown == 0 else '':<27} {name[server]:<{width}} {rps:>9.0f} "
                  f"{fmt_ms(p50):>8} {fmt_ms(p99):>8} {cpu_us:>10.1f} {switches:>6.2f} "
                  f"{ratio_s:>8}  {err_s:<8} {target_s}")
            shown += 1
    print()
    if error_notes:
        print("ERRORS (wrk socket errors connect/read/write/timeout and non-2xx/3xx responses):")
        print("\n".join(error_notes))
        print()

    print(f"{'server':<{width}} {'peak RSS (VmHWM)':>17} {'CPU us/req, all cells':>22}")
    for server in SERVERS:
        rs = [r for (c, s), lst in runs.items() if s == server for r in lst]
        reqs = sum(r["requests"] for r in rs)
        cpu_us = sum(r["ticks"] for r in rs) * 1e6 / clk_tck / reqs if reqs else math.nan
        kb = peak.get(server)
        rss = f"{kb / 1024:.1f} MiB" if kb is not None else "?"
        print(f"{name[server]:<{width}} {rss:>17} {cpu_us:>22.1f}")
    print()
    if mode == "limit":
        for cell, desc in CELLS:
            explain_limit(runs, cell, desc, name, clk_tck, switch_us)
        return
    met = sum(verdicts)
    print(f"Targets met by {lb_label}: {met}/{len(verdicts)}")
    print("(ratios: median over rounds of the per-round req/s ratio to nginx; req/s, p50, p99:"
          " medians over rounds;\n RSS, CPU and context switches (cs/req, voluntary and"
          " involuntary, of threads alive at the end\n of each run) are summed over the process"
          " and its children (nginx workers); wrk shares the same cores.)")


def explain_limit(runs, cell, desc, name, clk_tck, switch_us):
    """Why the balancer's req/s differ from nginx's in one cell.

    With the same run length, req/s = busy share x CPUs / busy CPU time per request, so the
    ratio of two servers' req/s is exactly (busy share ratio) x (inverse ratio of busy CPU time
    per request). In log terms the two add up to the whole ratio: that is the split printed.
    Busy CPU time per request is the whole machine's (balancer, wrk, the kernel's network
    work); the balancer's own part is told apart from the rest.
    """
    if not runs.get((cell, "lb")) or not runs.get((cell, "nginx")):
        return
    figures = {}
    print(f"Why {desc}: {name['lb']} against nginx")
    print(f"  {'server':<14} {'req/s':>9} {'CPUs busy':>10} {'busy us/req':>12} "
          f"{'own us/req':>11} {'rest us/req':>12} {'cs/req':>7}")
    for server in SERVERS:
        rs = runs.get((cell, server), [])
        if not rs:
            continue
        reqs = sum(r["requests"] for r in rs)
        busy = sum(r["busy"] for r in rs)
        total = sum(r["total"] for r in rs)
        f = dict(rps=median(r["rps"] for r in rs),
                 share=busy / total if total else math.nan,
                 busy_us=busy * 1e6 / clk_tck / reqs,
                 own_us=sum(r["ticks"] for r in rs) * 1e6 / clk_tck / reqs,
                 switches=sum(r["switches"] for r in rs) / reqs)
        f["rest_us"] = f["busy_us"] - f["own_us"]
        figures[server] = f
        print(f"  {name[server]:<14} {f['rps']:>9.0f} {f['share'] * 100:>9.0f}% "
              f"{f['busy_us']:>12.1f} {f['own_us']:>11.1f} {f['rest_us']:>12.1f} "
              f"{f['switches']:>7.2f}")
    lb, ng = figures["lb"], figures["nginx"]
    ratio = (lb["share"] / ng["share"]) * (ng["busy_us"] / lb["busy_us"])
    log_ratio = math.log(ratio) if ratio > 0 else math.nan
    if abs(log_ratio) < 1e-3:
        print(f"  req/s ratio {ratio:.2f}x: no gap to explain\n")
        return
    idle = math.log(lb["share"] / ng["share"]) / log_ratio
    cpu = math.log(ng["busy_us"] / lb["busy_us"]) / log_ratio
    extra = lb["busy_us"] - ng["busy_us"]
    own = cpu * (lb["own_us"] - ng["own_us"]) / extra if extra else 0.0
    print(f"  req/s ratio {ratio:.2f}x (from the CPU figures; measured "
          f"{lb['rps'] / ng['rps']:.2f}x). Of the gap, in log terms:")
    print(f"    {idle * 100:5.0f}%  CPUs idle more (threads asleep, waiting to be woken)")
    print(f"    {own * 100:5.0f}%  the balancer's own CPU time per request")
    print(f"    {(cpu - own) * 100:5.0f}%  the rest's CPU time per request (wrk, kernel)")
    print(f"  context switches per request: {name['lb']} {lb['switches']:.2f}, "
          f"nginx {ng['switches']:.2f}")
    explain_switches(lb, ng, name["lb"], CELL_CONNS[cell], switch_us)
    print()


def explain_switches(lb, ng, lb_name, conns, switch_us):
    """The balancer's and nginx's own CPU per request, split into switches and everything else.

    Each switch is priced at what one sleep and wake-up costs on this machine (switch_cost.rs)
    with as many threads taking turns as the balancer has client threads in this cell (each
    then finds its stack and sockets gone from the caches), nginx's with two. What is left is
    everything else each one does per request: parsing, copying, the system calls themselves.
    """
    ours, theirs = switch_us.get(conns), switch_us.get(2)
    if ours is None or theirs is None:
        return
    lb_sw, ng_sw = lb["switches"] * ours, ng["switches"] * theirs
    lb_else, ng_else = lb["own_us"] - lb_sw, ng["own_us"] - ng_sw
    print(f"  one sleep and wake-up, measured here on one CPU: {theirs:.1f} us between 2 threads, "
          f"{ours:.1f} us among {conns}")
    print("  own CPU per request, in switches and everything else:")
    for label, f, sw, other in ((lb_name, lb, lb_sw, lb_else), ("nginx", ng, ng_sw, ng_else)):
        print(f"    {label:<14} {f['own_us']:6.1f} us = {sw:5.1f} in {f['switches']:.2f} switches "
              f"+ {other:5.1f} everything else")
    word = "cheaper" if lb_else <= ng_else else "dearer"
    print(f"  the switches cost {lb_name} {lb_sw - ng_sw:.1f} us more per request than nginx's; "
          f"everything else is {abs(ng_else - lb_else):.1f} us {word}.")


# A new connection's first answer may take at most nginx's median plus this (milliseconds).
FIRST_SLACK_MS = 1.0


def report_first(first_path, lb_label):
    """The median time to the first answer of a new connection held open, by version and server."""
    medians = {}  # (version, server) -> [median of each round]
    agreed = {}
    for line in open(first_path):
        version, server, _round, text = line.rstrip("\n").split("\t", 3)
        run = json.loads(text)
        medians.setdefault((version, server), []).append(run["median_ms"])
        agreed[(version, server)] = run["version"]
    name = {"lb": lb_label, "nginx": "nginx", "haproxy": "haproxy"}
    width = max(10, len(lb_label))
    print("New connection from a client with Nagle's algorithm on, held open: time to the first")
    print("answer (ms, median over rounds of each round's median)")
    header = f"{'TLS':<5} {'server':<{width}} {'agreed':<8} {'ms':>8}  target"
    print(header)
    print("-" * len(header))
    met = total = 0
    for version in ("1.3", "1.2"):
        nginx = median(medians.get((version, "nginx"), [math.nan]))
        for server in SERVERS:
            ms = median(medians.get((version, server), [math.nan]))
            target = ""
            if server == "lb":
                ok = ms <= nginx + FIRST_SLACK_MS
                met, total = met + ok, total + 1
                target = f"<= nginx + {FIRST_SLACK_MS:g} ms: {'PASS' if ok else 'FAIL'}"
            print(f"{version:<5} {name[server]:<{width}} {agreed.get((version, server), '?'):<8} "
                  f"{ms:>8.2f}  {target}")
    print(f"First-answer targets met by {lb_label}: {met}/{total}")


def report_idle(idle_path, lb_label):
    name = {"lb": lb_label, "nginx": "nginx", "haproxy": "haproxy"}
    width = max(10, len(lb_label))
    header = (f"{'server':<{width}} {'answered':>11} {'still open':>10} {'wall s':>8} "
              f"{'RSS before':>11} {'RSS with N':>11}  target")
    print(header)
    print("-" * len(header))
    for line in open(idle_path):
        f = line.rstrip("\n").split("\t")
        server, n, answered, failed, still_open = f[0], int(f[1]), int(f[2]), int(f[3]), int(f[4])
        wall, before, with_n = float(f[5]), int(f[6]), int(f[7])
        target_s = ""
        if server == "lb":
            ok_rss = with_n / 1024 <= IDLE_RSS_MIB
            ok_wall = answered == n and wall <= IDLE_WALL_S
            target_s = (f"RSS<={IDLE_RSS_MIB} MiB {'MET' if ok_rss else 'NOT MET'}, "
                        f"all in <={IDLE_WALL_S}s {'MET' if ok_wall else 'NOT MET'}")
            if n != 1000:
                target_s += " (targets are defined for 1000)"
        wall_s = f"{wall:.3f}" if not math.isnan(wall) else "timeout"
        answered_s = f"{answered}/{n}" + (f" ({failed} failed)" if failed else "")
        print(f"{name.get(server, server):<{width}} {answered_s:>11} {still_open:>10} {wall_s:>8} "
              f"{before / 1024:>7.1f} MiB {with_n / 1024:>7.1f} MiB  {target_s}")
    print("\n(wall s: first connect until the last of the N responses arrived;"
          " RSS: VmRSS summed over the process and its children)")


if __name__ == "__main__":
    if sys.argv[1] == "wrk":
        switch_us = parse_switch_us(sys.argv[7] if len(sys.argv) > 7 else "")
        report_wrk(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], switch_us)
    elif sys.argv[1] == "idle":
        report_idle(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "first":
        report_first(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
