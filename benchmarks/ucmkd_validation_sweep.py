"""Validation sweep used to choose ucmkd's defaults (prints VALIDATION accuracy only).

    python benchmarks/ucmkd_validation_sweep.py OUT 'setting1,setting2' 'seeds' 'label=method:k=v,...;...'

Settings are those of the built-in `full` suite; each variant is a method with `method.params`
overrides. The table reports, per setting and variant, the mean best-validation accuracy over
seeds and its delta vs the first variant (for ucmkd: the distilled candidate, before the
fallback gate). Test accuracy is stored in OUT/sweep.jsonl but never printed or used. The
defaults were chosen with seeds 100,101 (outside the reported seeds 0-4), e.g.

    python benchmarks/ucmkd_validation_sweep.py /tmp/sweep digits-img2sig-k5,synthetic-mild 100,101 \
        "ce=ce;item=ucmkd:fallback=false,w_fa=0,w_la=0,unlabelled=false;mean=ucmkd:fallback=false,w_fa=0,w_la=0,unlabelled=false,kd_target=\"mean\""
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ucmkd.bench import suite_path
from ucmkd.config import RunConfig, deep_merge, from_dict, load_yaml, nest

SUITE = load_yaml(suite_path("full"))


def cell(setting: str, method: str, params: dict, seed: int) -> RunConfig:
    data = deep_merge(asdict(from_dict(RunConfig, SUITE["base"])), nest(SUITE["settings"][setting]["overrides"]))
    data.update(method={"name": method, "params": params}, seed=seed, threads=1)
    return from_dict(RunConfig, data)


def one(job):
    out, setting, label, method, params, seed = job
    from ucmkd import run

    r = run(cell(setting, method, params, seed), run_dir=Path(out) / setting / label / f"s{seed}")
    c = (r.get("candidates") or {}).get("student", {"val_acc": r["val_acc"], "test_acc": r["test_acc"]})
    return {"setting": setting, "label": label, "seed": seed, "val": c["val_acc"], "test": c["test_acc"],
            "seconds": r["seconds"]}


def parse_variants(spec: str) -> list:
    out = []
    for part in spec.split(";"):
        label, rest = part.split("=", 1)
        method, _, kv = rest.partition(":")
        params = {k: json.loads(v) for k, v in (item.split("=", 1) for item in kv.split(",") if item)}
        out.append((label, method, params))
    return out


def main(argv: list[str]) -> None:
    out, settings, seeds, variants = argv[0], argv[1].split(","), [int(s) for s in argv[2].split(",")], parse_variants(argv[3])
    jobs = [(out, st, lab, m, p, sd) for st in settings for (lab, m, p) in variants for sd in seeds]
    with ProcessPoolExecutor(2) as ex:
        res = list(ex.map(one, jobs))
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "sweep.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in res)
    base = variants[0][0]
    print(f"| setting | " + " | ".join(f"{lab} val % (delta vs {base})" for lab, _, _ in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for st in settings:
        ref = {r["seed"]: r["val"] for r in res if r["setting"] == st and r["label"] == base}
        cells = []
        for lab, _, _ in variants:
            v = {r["seed"]: r["val"] for r in res if r["setting"] == st and r["label"] == lab}
            d = np.mean([v[s] - ref[s] for s in v]) * 100
            cells.append(f"{np.mean(list(v.values())) * 100:.1f} ({d:+.1f})")
        print(f"| {st} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
