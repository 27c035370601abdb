"""The GPU bundle's report: reads what run.sh left in OUT_DIR and writes
OUT_DIR/report.json, then prints a short summary.

    python3 report.py OUT_DIR STATUS

- environment: env.txt (driver, GPUs, libraries, PyTorch);
- stages: stages.tsv (each stage's status, seconds, note);
- kernels: the `GPUCHECK {json}` lines of kernels.log (one per op, size and output:
  the largest GPU-CPU difference relative to the output's largest entry) and the test
  harness's verdict per test;
- training: each variant's loss curve on cuda against cpu (metrics.jsonl of both runs);
  the curves agree when the loss at step 10 differs by at most 1e-3 relative (a few
  steps of f32 rounding in different orders) and the mean over the last 50 steps by at
  most 5% (after hundreds of steps the runs are two samples of the same training, not
  the same numbers);
- bench: every JSON row of the bench stages, ours and PyTorch's, with images/s for the
  training steps and our time over PyTorch's.
Only the standard library: it runs wherever run.sh does.
"""
import json
import sys
from pathlib import Path

STEP10_TOL = 1e-3
TAIL_TOL = 0.05
TAIL_STEPS = 50


def read_env(out):
    env = {}
    path = out / "env.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                env[k] = v
    return env


def read_stages(out):
    stages = []
    path = out / "stages.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                stages.append({"stage": parts[0], "status": parts[1], "seconds": int(parts[2] or 0),
                               "note": parts[3]})
    return stages


def read_kernels(out):
    path = out / "kernels.log"
    if not path.exists():
        return None
    checks, tests = [], {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("GPUCHECK "):
            try:
                checks.append(json.loads(line[len("GPUCHECK "):]))
            except json.JSONDecodeError:
                pass
        elif line.startswith("test ") and " ... " in line:
            name, verdict = line[5:].split(" ... ", 1)
            tests[name.strip()] = verdict.strip()
    worst = max((c["rel"] for c in checks), default=None)
    return {"tests": tests, "checks": checks, "worst_rel": worst,
            "all_ok": bool(checks) and all(c["ok"] for c in checks)
            and bool(tests) and all(v == "ok" for v in tests.values())}


def curve(path):
    steps = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in row and "loss" in row:
            steps[row["step"]] = row["loss"]
    return steps


def read_training(out):
    runs = {}
    for device in ("cuda", "cpu"):
        for metrics in sorted((out / f"train-{device}").glob("*/*/metrics.jsonl")):
            runs.setdefault(metrics.parent.name, {})[device] = curve(metrics)
    if not runs:
        return None
    result = {}
    for variant, by_device in runs.items():
        gpu, cpu = by_device.get("cuda", {}), by_device.get("cpu", {})
        common = sorted(set(gpu) & set(cpu))
        entry = {"steps_cuda": max(gpu, default=0), "steps_cpu": max(cpu, default=0)}
        if common:
            first = common[0]
            entry["first_step"] = first
            entry["first_rel_diff"] = abs(gpu[first] - cpu[first]) / max(abs(cpu[first]), 1e-12)
            tail = [s for s in common if s > common[-1] - TAIL_STEPS]
            mean = lambda c: sum(c[s] for s in tail) / len(tail)
            entry["tail_mean_cuda"], entry["tail_mean_cpu"] = mean(gpu), mean(cpu)
            entry["tail_rel_diff"] = abs(mean(gpu) - mean(cpu)) / max(abs(mean(cpu)), 1e-12)
            entry["curve"] = [[s, gpu[s], cpu[s]] for s in common]
            entry["agree"] = (entry["first_rel_diff"] <= STEP10_TOL and entry["tail_rel_diff"] <= TAIL_TOL
                              and entry["steps_cuda"] == entry["steps_cpu"] == 300)
        else:
            entry["agree"] = False
        result[variant] = entry
    return {"tolerance": {"first_step_rel": STEP10_TOL, "tail_mean_rel": TAIL_TOL, "tail_steps": TAIL_STEPS},
            "variants": result}


def read_bench(out, stages):
    rows = []
    for st in stages:
        log = out / f"{st['stage']}.log"
        if not log.exists() or not (st["stage"].startswith("vit_") or st["stage"].startswith("rankclip_")):
            continue
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith('{"op"'):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row["op"] == "vit_b16_train_step":
                    b = int(row["size"].split()[0][1:])
                    row["images_per_s"] = round(b / (row["ms"] / 1e3), 1)
                rows.append(row)
    pairs = {}
    for r in rows:
        pairs.setdefault((r["op"], r["size"]), {})[r["impl"]] = r
    for (op, size), p in pairs.items():
        if "ours" in p and "torch" in p:
            p["ours"]["torch_ms_over_ours"] = round(p["torch"]["ms"] / p["ours"]["ms"], 3)
    return rows


def main():
    out, status = Path(sys.argv[1]), sys.argv[2]
    stages = read_stages(out)
    report = {
        "status": status,
        "environment": read_env(out),
        "stages": stages,
        "kernels": read_kernels(out),
        "training": read_training(out),
        "bench": read_bench(out, stages),
    }
    if status == "ok":
        k, t = report["kernels"], report["training"]
        if not (k and k["all_ok"]) or not (t and all(v["agree"] for v in t["variants"].values())):
            report["status"] = "failed"
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    k = report["kernels"]
    if k:
        print(f"kernels: {len(k['checks'])} comparisons, worst relative difference {k['worst_rel']}, "
              f"all ok: {k['all_ok']}")
    t = report["training"]
    if t:
        for name, v in t["variants"].items():
            print(f"training {name}: agree {v['agree']} (step {v.get('first_step')} rel diff "
                  f"{v.get('first_rel_diff')}, last-{TAIL_STEPS} mean rel diff {v.get('tail_rel_diff')})")
    for r in report["bench"]:
        extra = f", {r['images_per_s']} images/s" if "images_per_s" in r else ""
        ratio = f", PyTorch time / ours {r['torch_ms_over_ours']}" if "torch_ms_over_ours" in r else ""
        print(f"bench {r['op']} {r['size']} {r['impl']}: {r['ms']} ms, peak {r['peak_mb']} MB{extra}{ratio}")
    if report["status"] != status:
        print(f"status: {report['status']} (run.sh said {status}, but a check above did not pass)")
        sys.exit(1)


if __name__ == "__main__":
    main()
