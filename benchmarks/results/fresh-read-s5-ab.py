"""Fresh-process open + 2,000-step read, A/B: code tree x store, alternating rounds (run from any dir)."""
import json
import os
import statistics as st
import subprocess
import sys

trees = {"before": sys.argv[1], "after": sys.argv[2]}
stores = {"old": sys.argv[3], "new": sys.argv[4]}
rounds, per = int(sys.argv[5]), int(sys.argv[6])
out = {}
for r in range(rounds):
    for code, store in (("before", "old"), ("after", "new"), ("after", "old"), ("before", "new")):
        tree = trees[code]
        prog = ("import json, random, sys; from pathlib import Path; from benchmarks.bench_query import _fresh_process; "
                f"print(json.dumps(_fresh_process(Path({stores[store]!r}), 1_000_000, 108, random.Random({r}), n={per})))")
        load = os.getloadavg()[0]
        res = json.loads(subprocess.run([sys.executable, "-c", prog], cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                                        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        k = f"{code} code / {store} store"
        o = out.setdefault(k, {"open_read_s": [], "open_read_cpu_s": [], "import_s": [], "interpreter_s": [], "ok": True, "load1": []})
        for f in ("open_read_s", "open_read_cpu_s", "import_s", "interpreter_s"):
            o[f] += res[f]
        o["ok"] = o["ok"] and res["ok"]
        o["load1"].append(load)
        print(k, "round", r, "load", load, "cpu ms", [round(1e3 * x, 1) for x in res["open_read_cpu_s"]], "ok", res["ok"], flush=True)
for k, o in out.items():
    print(f"{k}: n={len(o['open_read_s'])} wall median {1e3*st.median(o['open_read_s']):.1f} ms p90 {1e3*sorted(o['open_read_s'])[int(0.9*len(o['open_read_s']))]:.1f}"
          f" | CPU median {1e3*st.median(o['open_read_cpu_s']):.1f} ms min {1e3*min(o['open_read_cpu_s']):.1f}"
          f" | imports median {1e3*st.median(o['import_s']):.0f} ms | interpreter {1e3*st.median(o['interpreter_s']):.0f} ms | ok {o['ok']} | load {min(o['load1']):.1f}-{max(o['load1']):.1f}")
json.dump(out, open(sys.argv[7], "w"), indent=1)
