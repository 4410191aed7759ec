"""Label-efficiency curves as numbers: summaries and tables of the active-learning simulation and the
learning curves. Plain rows (dicts) in, plain dicts and Markdown out; the stages write them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def write_csv(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def sample_sd(values) -> float | None:
    """Sample standard deviation (ddof=1) over seeds; None for a single value, which has no spread."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _sd_text(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarise_strategies(rows: list[dict]) -> dict:
    """Active learning. ``rows``: one per strategy, seed and round with ``strategy``, ``labelled`` (the
    budget) and ``test_iou``. Per strategy: mean and sample sd over seeds at each budget; the fewest
    labels with which its mean reaches random sampling's mean at the largest budget, and that as a
    fraction of the largest budget; its margin over random at the largest budget, and the seed spread
    (the larger of the two sds) to weigh that margin against."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    budgets = sorted({r["labelled"] for r in rows})
    table = {}
    for s in strategies:
        for b in budgets:
            v = [r["test_iou"] for r in rows if r["strategy"] == s and r["labelled"] == b]
            if v:
                table[(s, b)] = (float(np.mean(v)), sample_sd(v))
    top = budgets[-1]
    out = {"budgets": budgets, "largest_budget": top, "strategies": {}}
    ref = table.get(("random", top))
    for s in strategies:
        entry = {"mean_iou": {str(b): round(table[(s, b)][0], 4) for b in budgets if (s, b) in table},
                 "sd_iou": {str(b): _r4(table[(s, b)][1]) for b in budgets if (s, b) in table}}
        if ref and (s, top) in table:
            mean_top, sd_top = table[(s, top)]
            reach = [b for b in budgets if (s, b) in table and table[(s, b)][0] >= ref[0]]
            entry["labels_to_reach_random_at_largest"] = reach[0] if reach else None
            entry["label_ratio_vs_random"] = round(reach[0] / top, 3) if reach else None
            entry["margin_over_random_at_largest"] = round(mean_top - ref[0], 4)
            spreads = [x for x in (sd_top, ref[1]) if x is not None]
            entry["seed_spread_at_largest"] = round(max(spreads), 4) if spreads else None
        out["strategies"][s] = entry
    return out


def strategies_markdown(summary: dict) -> str:
    budgets = summary["budgets"]
    lines = ["| strategy | " + " | ".join(f"{b} patches" for b in budgets) +
             " | labels to reach random@max | margin over random@max (spread) |",
             "|---" * (len(budgets) + 3) + "|"]
    for s, e in summary["strategies"].items():
        cells = [f"{e['mean_iou'][str(b)]:.3f} ± {_sd_text(e['sd_iou'][str(b)])}" if str(b) in e["mean_iou"] else "-"
                 for b in budgets]
        reach = e.get("labels_to_reach_random_at_largest")
        reach_s = "not reached" if reach is None else f"{reach} ({e['label_ratio_vs_random']:.2f}x)"
        margin = ("-" if "margin_over_random_at_largest" not in e else
                  f"{e['margin_over_random_at_largest']:+.3f} ({_sd_text(e['seed_spread_at_largest'])})")
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {reach_s} | {margin} |")
    return "\n".join(lines) + "\n"


def by_budget(summary: dict) -> list[dict]:
    """One row per budget, one column per strategy (mean IoU): the DVC plot of the simulation."""
    return [{"labelled": b, **{s: e["mean_iou"].get(str(b)) for s, e in summary["strategies"].items()}}
            for b in summary["budgets"]]


def summarise_learning_curve(points: list[dict]) -> tuple[list[dict], dict]:
    """Learning curves. ``points``: one per run with ``init`` (``init+option`` for an option other than
    plain), ``slices`` and ``test_iou``. Returns the
    table (mean, sample sd, min, max per init and slice count, with the mean epochs trained and how many
    runs the epoch cap rather than early stopping ended, when the points say) and the comparisons the
    field reports make:
    pretrained on 4 slices against scratch on 12, scratch on 12 against the most slices, and for each
    scratch count the fewest slices with which the pretrained mean reaches it."""
    table = []
    for init in dict.fromkeys(p["init"] for p in points):
        for n in sorted({p["slices"] for p in points if p["init"] == init}):
            v = [p["test_iou"] for p in points if p["init"] == init and p["slices"] == n]
            runs = [p for p in points if p["init"] == init and p["slices"] == n]
            row = {"init": init, "slices": n, "mean_iou": round(float(np.mean(v)), 4), "sd_iou": _r4(sample_sd(v)),
                   "min_iou": round(min(v), 4), "max_iou": round(max(v), 4), "seeds": len(v)}
            if all("epochs" in r for r in runs):
                row["mean_epochs"] = round(float(np.mean([r["epochs"] for r in runs])), 1)
                row["stopped_by_cap"] = sum(r.get("stopped_by") == "epoch cap" for r in runs)
            table.append(row)
    get = {(r["init"], r["slices"]): r for r in table}
    counts = sorted({p["slices"] for p in points})
    out: dict = {"counts": counts}
    if ("scratch", 12) in get and ("pretrained", 4) in get:
        s12, p4 = get[("scratch", 12)], get[("pretrained", 4)]
        out["pretrained_4_vs_scratch_12"] = {"pretrained_4": p4["mean_iou"], "scratch_12": s12["mean_iou"],
                                             "met": p4["mean_iou"] >= s12["mean_iou"]}
    if ("scratch", 12) in get and ("scratch", counts[-1]) in get:
        out["scratch_12_vs_all"] = {"12": get[("scratch", 12)]["mean_iou"],
                                    str(counts[-1]): get[("scratch", counts[-1])]["mean_iou"]}
    saved = {}
    for n in counts:
        if ("scratch", n) in get:
            reach = [m for m in counts if ("pretrained", m) in get
                     and get[("pretrained", m)]["mean_iou"] >= get[("scratch", n)]["mean_iou"]]
            saved[str(n)] = reach[0] if reach else None
    out["pretrained_slices_to_match_scratch"] = saved
    out["options_vs_plain"] = paired_against_plain(points)
    if all("test_iou_z_average" in p for p in points):
        out["z_average"] = z_average_effect(points)
    out["table"] = table
    return table, out


def paired_against_plain(points: list[dict]) -> dict:
    """For each curve ``init+option``: its test IoU minus that of the plain ``init`` on the same slice
    count and seed (the same training slices), as mean, sample sd and n of the differences per count."""
    iou = {(p["init"], p["slices"], p["seed"]): p["test_iou"] for p in points}
    out: dict = {}
    for name in dict.fromkeys(p["init"] for p in points):
        if "+" not in name:
            continue
        plain = name.split("+", 1)[0]
        per_count = {}
        for n in sorted({p["slices"] for p in points if p["init"] == name}):
            d = [p["test_iou"] - iou[(plain, n, p["seed"])] for p in points
                 if p["init"] == name and p["slices"] == n and (plain, n, p["seed"]) in iou]
            if d:
                per_count[str(n)] = {"mean_diff": round(float(np.mean(d)), 4), "sd_diff": _r4(sample_sd(d)),
                                     "n": len(d)}
        if per_count:
            out[name] = {"against": plain, "by_slices": per_count}
    return out


def z_average_effect(points: list[dict]) -> dict:
    """Per curve and slice count, over seeds: in how many points the validation slices switched
    z-averaging on, and the test IoU of the chosen readout and of the z-averaged one, each minus the
    plain one of the same model (mean, sample sd and n of the differences)."""
    out: dict = {}
    for name in dict.fromkeys(p["init"] for p in points):
        per_count = {}
        for n in sorted({p["slices"] for p in points if p["init"] == name}):
            mine = [p for p in points if p["init"] == name and p["slices"] == n]
            chosen = [p["test_iou"] - p["test_iou_plain"] for p in mine]
            always = [p["test_iou_z_average"] - p["test_iou_plain"] for p in mine]
            per_count[str(n)] = {"chosen_on": sum(bool(p["z_average"]) for p in mine), "n": len(mine),
                                 "chosen_minus_plain": round(float(np.mean(chosen)), 4),
                                 "chosen_minus_plain_sd": _r4(sample_sd(chosen)),
                                 "averaged_minus_plain": round(float(np.mean(always)), 4),
                                 "averaged_minus_plain_sd": _r4(sample_sd(always))}
        out[name] = per_count
    return out


def z_average_markdown(effect: dict) -> str:
    """:func:`z_average_effect` as a Markdown table."""
    lines = ["| curve | labelled slices | z-averaging chosen on validation | test IoU, chosen - plain (sd) | "
             "test IoU, averaged - plain (sd) | n |", "|---" * 6 + "|"]
    for name, per_count in effect.items():
        for n, e in per_count.items():
            lines.append(f"| {name} | {n} | {e['chosen_on']} of {e['n']} | {e['chosen_minus_plain']:+.4f} "
                         f"({_sd_text(e['chosen_minus_plain_sd'])}) | {e['averaged_minus_plain']:+.4f} "
                         f"({_sd_text(e['averaged_minus_plain_sd'])}) | {e['n']} |")
    return "\n".join(lines) + "\n"


def learning_curve_markdown(table: list[dict]) -> str:
    epochs = all("mean_epochs" in r for r in table)
    head = "| init (+option) | labelled slices | test IoU mean | sd (n-1) | min | max | seeds |"
    lines = [head + (" epochs (mean) | stopped by the epoch cap |" if epochs else ""),
             "|---" * (7 + 2 * epochs) + "|"]
    for r in table:
        line = (f"| {r['init']} | {r['slices']} | {r['mean_iou']:.3f} | {_sd_text(r['sd_iou'])} | {r['min_iou']:.3f} | "
                f"{r['max_iou']:.3f} | {r['seeds']} |")
        lines.append(line + (f" {r['mean_epochs']:g} | {r['stopped_by_cap']} of {r['seeds']} |" if epochs else ""))
    return "\n".join(lines) + "\n"


def paired_markdown(paired: dict) -> str:
    """The options against their plain init (:func:`paired_against_plain`) as a Markdown table."""
    lines = ["| curve | against | labelled slices | paired difference mean | sd (n-1) | n |", "|---" * 6 + "|"]
    for name, e in paired.items():
        for n, d in e["by_slices"].items():
            lines.append(f"| {name} | {e['against']} | {n} | {d['mean_diff']:+.3f} | {_sd_text(d['sd_diff'])} | "
                         f"{d['n']} |")
    return "\n".join(lines) + "\n"


def series(rows: list[dict], line_key: str, x_key: str, y_key: str = "test_iou") -> dict:
    """{line: {x: [y, ...]}}, the input of plots.plot_mean_band."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[line_key], {}).setdefault(r[x_key], []).append(r[y_key])
    return out
