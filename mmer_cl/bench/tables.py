"""The benchmark's tables (CSV + Markdown) and plots, from the stored results, and SUMMARY.md.

A result with an accuracy matrix ("matrix") gives a row in the summary; analyses without one (mmer_controls,
the forgetting scenario) have tables of their own. Every file names the command, date, commit and machine.
"""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from mmer_cl import metrics, stats
from mmer_cl.bench import report

# The method every other one is compared with, on the same test examples: the first of these a stream has
# (a class-incremental stream has no task label to run mmer_exact with).
REFERENCES = ("mmer_exact", "mmer_routed")
ORACLE_NOTE = ("Class-incremental: no task label at test, accuracy is 10-way top-1 against the original label. "
               "`individual` is each expert given its task label, an oracle and not a class-incremental method; "
               "retention = accuracy / that oracle's.")


def _matrix_results(results: dict) -> dict:
    return {name: r for name, r in results.items() if "matrix" in r}


def summary_table(results: dict, expert_accuracy) -> pd.DataFrame:
    rows = []
    for name, result in _matrix_results(results).items():
        R = np.asarray(result["matrix"], dtype=float)
        only_final = len(R) > 1 and bool(np.isnan(R[:-1]).all())  # joint training: no earlier rows
        own = own_interval(result)
        row = {"method": name, "final_avg_acc": float(np.mean(R[-1])), "final_lo": own["lo"], "final_hi": own["hi"],
               "bwt": float("nan") if only_final else metrics.backward_transfer(R),
               "avg_forgetting": float("nan") if only_final else metrics.average_forgetting(R),
               "retention": float(np.mean(metrics.retention(R, expert_accuracy))) if expert_accuracy else float("nan"),
               "storage_total_mb": result["storage"]["total"] / 2**20}
        row.update({f"{c}_mb": result["storage"].get(c, 0) / 2**20 for c in metrics.STORAGE_COMPONENTS})
        row["fold_s"] = sum(result["fold_seconds"].values()) if "fold_seconds" in result else float("nan")
        row["method_s"] = result.get("seconds", float("nan"))
        row["peak_rss_mb"] = result.get("peak_rss_mb", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def own_interval(result: dict) -> dict:
    """The 95% bootstrap interval of a method's final average accuracy over its test examples (NaN without
    per-sample scores)."""
    if "correct" not in result:
        return {"lo": float("nan"), "hi": float("nan")}
    return stats.paired_bootstrap(result["correct"], [[0] * len(c) for c in result["correct"]])


def reference_of(results: dict) -> str | None:
    return next((m for m in REFERENCES if m in results), None)


def paired_table(results: dict, reference: str) -> pd.DataFrame:
    """The reference method against every other with per-sample scores: the paired difference of final average
    accuracy on the same test examples, its 95% bootstrap interval, and what the interval supports."""
    if reference not in results or "correct" not in results[reference]:
        return pd.DataFrame()
    rows = []
    for name, result in results.items():
        if name != reference and "correct" in result:
            interval = stats.paired_bootstrap(results[reference]["correct"], result["correct"])
            rows.append({"method": name, **interval, "verdict": stats.verdict(reference, name, interval)})
    return pd.DataFrame(rows)


PAIRED_NOTE = ("diff = final average accuracy of the reference minus the method's; [lo, hi] its 95% bootstrap "
               "interval (examples resampled within each task, 10,000 resamples); one seed: the interval covers the "
               "test sample, not training randomness.")


SEEDS_NOTE = "mean, sample std and Student-t 95% interval [lo, hi] over seeds"
PAIRED_SEEDS_NOTE = ("diff = the reference's final average accuracy minus the method's, averaged over seeds; [lo, hi]: "
                     "95% bootstrap interval over test examples (resampled within each seed and task, 10,000 "
                     "resamples); [seed_lo, seed_hi]: Student-t 95% interval of the per-seed differences. The "
                     "verdict claims a side only where both intervals exclude zero.")


EXPANSION_REFERENCE = "naive_mc"  # the paper's comparison on mixed inputs


def expansion_table(result: dict) -> pd.DataFrame:
    """Per method: test accuracy on each combination of modalities and their mean with its 95% bootstrap
    interval, the paired difference against NaiveMC on the same mixed examples, validation accuracy, storage."""
    methods, rows = result["methods"], []
    reference = [methods[EXPANSION_REFERENCE]["correct"][c] for c in result["mixed"]]
    for name, entry in methods.items():
        correct = [entry["correct"][c] if c in entry["correct"] else None for c in result["mixed"]]
        row = {"method": name, **{c: float(np.mean(x)) if x is not None else float("nan")
                                  for c, x in zip(result["mixed"], correct)}}
        if all(x is not None for x in correct):
            own = stats.paired_bootstrap(correct, [[0] * len(x) for x in correct])
            row.update(mean=own["diff"], lo=own["lo"], hi=own["hi"])
            if name != EXPANSION_REFERENCE:
                paired = stats.paired_bootstrap(correct, reference)
                row.update(vs_naive_mc=paired["diff"], vs_lo=paired["lo"], vs_hi=paired["hi"],
                           verdict=stats.verdict(name, EXPANSION_REFERENCE, paired))
        row.update(val_acc=entry.get("val_acc"), choice=json.dumps(entry.get("choice")) if entry.get("choice") else "",
                   storage_mb=result["storage"][name] / 2**20)
        rows.append(row)
    return pd.DataFrame(rows)


EXPANSION_NOTE = ("Accuracy on mixed test inputs (each part degraded: {degradation}); mean over the combinations "
                  "with its 95% bootstrap interval; vs_naive_mc = the method minus NaiveMC on the same examples, "
                  "[vs_lo, vs_hi] its 95% interval (examples resampled within each combination, one seed: the "
                  "interval covers the test sample, not training randomness). Choices made on the mixed validation "
                  "sets. single:<m> = the expert of modality m on its own part alone; best_single = per combination "
                  "the single modality best on validation. storage_mb: what a method keeps beside theta0.")


def trained_experts(curves: pd.DataFrame) -> pd.DataFrame:
    """The last point of each expert's learning curve: its validation and test accuracy once trained."""
    final = curves[curves["step"] == curves.groupby(["task", "split"])["step"].transform("max")]
    return final.pivot(index="task", columns="split", values="acc").reset_index()


def retention_table(results: dict, tasks, expert_accuracy) -> pd.DataFrame:
    rows = []
    for name, result in _matrix_results(results).items():
        final = np.asarray(result["matrix"], dtype=float)[-1]
        row = {"method": name}
        for task, value, expert in zip(tasks, final, expert_accuracy):
            row[f"{task}_acc"], row[f"{task}_retention"] = value, value / expert
        rows.append(row)
    return pd.DataFrame(rows)


def grid_table(results: dict) -> pd.DataFrame:
    rows = []
    for name, result in results.items():
        hyper = result.get("hyper") or {}
        for point in hyper.get("grid", []):
            params = {k: v for k, v in point.items() if not k.startswith("val")}
            rows.append({"method": name, "setting": ", ".join(f"{k}={v}" for k, v in params.items()),
                         "val_acc": point["val_acc"], "chosen": _chosen_for(hyper["choice"], params)})
    return pd.DataFrame(rows)


def _chosen_for(choice: dict, params: dict) -> str:
    """"all" when the grid point is the choice; the tasks that chose it when a value is chosen per task (a
    {task: value} choice, as TALL's lam); "" otherwise."""
    per_task = {k: v for k, v in choice.items() if isinstance(v, dict)}
    if any(choice.get(k) != v for k, v in params.items() if k not in per_task):
        return ""
    if not per_task:
        return "all"
    tasks = [t for t in next(iter(per_task.values())) if all(per_task[k][t] == params[k] for k in per_task)]
    return ", ".join(tasks)


def mask_tables(controls: dict, tasks) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    a = controls["analyses"]
    rows, layers = [], []
    for t, task in enumerate(tasks):
        d = a["density"][task]
        state_task = f"exp{t:03d}"
        rows.append({"task": task, "density_raw": d["raw"], "density_effective": d["effective"],
                     **{f"recon_err_{k}": v[state_task] for k, v in a["reconstruction_error"].items()},
                     **{f"test_acc_{k}": v[task] for k, v in controls["accuracy"].items()}})
        layers += [{"task": task, "layer": layer, "density_raw": v["raw"], "density_effective": v["effective"]}
                   for layer, v in d["per_layer"].items()]
    overlap = pd.DataFrame([{"pair": pair, "jaccard_where_tau_star_nonzero": v} for pair, v in a["overlap"].items()])
    return pd.DataFrame(rows), pd.DataFrame(layers), overlap


def modes_table(results: dict, tasks) -> pd.DataFrame:
    rows = []
    for mode in ("exact", "sparse", "compact"):
        result = results.get(f"mmer_{mode}")
        if result is None:
            continue
        R, storage = np.asarray(result["matrix"], dtype=float), result["storage"]
        row = {"mode": mode, "final_avg_acc": float(np.mean(R[-1])), "avg_forgetting": metrics.average_forgetting(R),
               "storage_total_mb": storage["total"] / 2**20, "tau_star_and_kept_vectors_mb": storage["shared_vectors"] / 2**20,
               "masks_mb": storage["masks"] / 2**20, "fold_s_total": sum(result["fold_seconds"].values()),
               **{k: v for k, v in result["hyper"]["choice"].items()}}
        row.update({f"recon_err_{task}": result["reconstruction_error"][f"exp{t:03d}"] for t, task in enumerate(tasks)})
        rows.append(row)
    return pd.DataFrame(rows)


def routing_table(result: dict, tasks) -> pd.DataFrame:
    """Rows: the true task; columns: the task whose weights a sample was routed to (counts)."""
    return pd.DataFrame([{"task": task, **{f"to_{other}": n for other, n in zip(tasks, row)},
                          "routing_accuracy": row[t] / max(sum(row), 1)}
                         for t, (task, row) in enumerate(zip(tasks, result["routing_confusion"]))])


def seeds_table(by_seed: dict, stream: str) -> pd.DataFrame:
    """Per method, final average accuracy and average forgetting over seeds: mean, std and 95% t-interval."""
    rows = []
    first = next(iter(by_seed.values()))[stream]
    for method in [m for m, result in first.items() if "matrix" in result]:
        finals, forgettings = [], []
        for results in by_seed.values():
            if method in results.get(stream, {}):
                R = np.asarray(results[stream][method]["matrix"], dtype=float)
                finals.append(float(np.mean(R[-1])))
                forgettings.append(metrics.average_forgetting(R) if not np.isnan(R[:-1]).all() else float("nan"))
        acc, forget = stats.seed_interval(finals), stats.seed_interval(forgettings)
        rows.append({"method": method, "seeds": acc["n"], "final_avg_acc": acc["mean"], "std": acc["std"],
                     "lo": acc["lo"], "hi": acc["hi"], "avg_forgetting": forget["mean"], "forgetting_std": forget["std"]})
    return pd.DataFrame(rows)


def experts_seeds_table(by_seed: dict, stream: str, tasks) -> pd.DataFrame:
    """Each expert's test accuracy on its own task over seeds: mean, std and Student-t 95% interval."""
    accs = [results[stream]["individual"]["expert_accuracy"] for results in by_seed.values()
            if "individual" in results.get(stream, {})]
    if len(accs) < 2:
        return pd.DataFrame()
    return pd.DataFrame([{"task": task, **stats.seed_interval([a[t] for a in accs])} for t, task in enumerate(tasks)])


def paired_seeds_table(by_seed: dict, stream: str) -> pd.DataFrame:
    """The reference against every method run on the same seeds: the paired difference of final average
    accuracy averaged over seeds, with two 95% intervals, one per source of noise: [lo, hi] the bootstrap over
    test examples (resampled within each seed and task), [seed_lo, seed_hi] the Student-t interval of the
    per-seed differences (training randomness). A side is claimed only where both exclude zero."""
    reference = reference_of(next(iter(by_seed.values())).get(stream, {}))
    runs = [results[stream] for results in by_seed.values() if reference in results.get(stream, {})]
    rows = []
    for name in [m for m, r in runs[0].items() if m != reference and "correct" in r] if runs else []:
        pairs = [(r[reference]["correct"], r[name]["correct"]) for r in runs if name in r]
        if len(pairs) < 2:
            continue
        pooled = stats.paired_bootstrap([t for a, _ in pairs for t in a], [t for _, b in pairs for t in b])
        seeds = stats.seed_interval([stats.mean_difference(a, b) for a, b in pairs])
        rows.append({"method": name, "seeds": len(pairs), **pooled, "seed_lo": seeds["lo"], "seed_hi": seeds["hi"],
                     "verdict": stats.verdict(reference, name, pooled, seeds)})
    return pd.DataFrame(rows)


def timings_table(profile, by_seed: dict) -> pd.DataFrame:
    """Each method's own time (`seconds`: when it was computed, also if this run reused it), per seed and stream."""
    return pd.DataFrame([{"profile": profile.name, "seed": seed, "stream": stream, "method": method,
                          "seconds": result.get("seconds", float("nan"))}
                         for seed, streams in by_seed.items() for stream, results in streams.items()
                         for method, result in results.items()])


def read_estimates(out: Path, profile) -> dict:
    """{(stream, method): seconds} from an earlier run's `timings.csv` in `out` of the same profile, averaged
    over its seeds: what the next run of that profile can expect on a like machine ({} when there is none)."""
    path = Path(out) / "timings.csv"
    if not path.exists():
        return {}
    df = pd.read_csv(path, comment="#")
    df = df[df["profile"] == profile.name]
    return {key: float(v) for key, v in df.groupby(["stream", "method"])["seconds"].mean().items()}


def time_table(estimates: dict, by_seed: dict) -> pd.DataFrame:
    """Per stream and method: the estimate the run started from, and the measured seconds, summed over seeds."""
    rows = {}
    for streams in by_seed.values():
        for stream, results in streams.items():
            for method, result in results.items():
                row = rows.setdefault((stream, method), {"stream": stream, "method": method, "seeds": 0,
                                                         "estimated_s": 0.0, "actual_s": 0.0})
                row["seeds"] += 1
                row["estimated_s"] += estimates.get((stream, method), float("nan"))
                row["actual_s"] += result.get("seconds", float("nan"))
    return pd.DataFrame(list(rows.values()))


def write_outputs(out: Path, prov: dict, profile, by_seed: dict, streams: dict, elapsed: float, run) -> None:
    """The first seed's tables and plots; with several seeds, the spread over them too."""
    out.mkdir(parents=True, exist_ok=True)
    seeds, results = list(by_seed), next(iter(by_seed.values()))
    sections = [f"# mmer_cl benchmark, profile `{profile.name}`", "", *[f"- {line}" for line in report.provenance_lines(prov)],
                f"- wall time of this invocation: {elapsed / 60:.1f} min (results reused from the run folder are not "
                f"re-timed; each method's own time is `method_s`)", f"- profile: `{json.dumps(asdict(profile))}`",
                f"- seeds: {seeds}; the tables are seed {seeds[0]}'s" + (", and `*_seeds` the spread over all of them"
                                                                         if len(seeds) > 1 else ""), ""]
    for name, stream_results in results.items():
        if len(seeds) > 1:
            over = f"over seeds {seeds}"
            for df, stem, title, note in (
                    (seeds_table(by_seed, name), "seeds", f"final accuracy and forgetting {over}", SEEDS_NOTE),
                    (experts_seeds_table(by_seed, name, streams[name].tasks), "experts_seeds",
                     f"the experts' test accuracy {over}", "each expert on its own task; " + SEEDS_NOTE),
                    (paired_seeds_table(by_seed, name), "paired_seeds",
                     f"{reference_of(stream_results)} against each method, paired, {over}", PAIRED_SEEDS_NOTE)):
                if len(df):
                    report.write_table(df, out, f"{name}_{stem}", prov, f"{name}: {title}", note=note)
                    sections.append(report.markdown_section(df, f"{name}: {title}", note=note))
        sections += _stream_outputs(out, prov, name, stream_results, streams[name].tasks,
                                    ORACLE_NOTE if streams[name].protocol == "class" else "")
    report.write_table(timings_table(profile, by_seed), out, "timings", prov, "each method's own time",
                       note="seconds: the method's time when it was computed (a reused result keeps its first time); "
                            "the next run of this profile reads this file for its estimates")
    (out / "SUMMARY.md").write_text("\n".join(sections) + "\n")
    report.write_provenance(out, prov, extra=f"Run folder (cached experts and method results): {run.dir}")


def _stream_outputs(out: Path, prov: dict, name: str, results: dict, tasks, protocol_note: str = "") -> list[str]:
    sections = []

    def table(df, stem, title, note="", section=True):
        report.write_table(df, out, f"{name}_{stem}", prov, title, note=note)
        if section:
            sections.append(report.markdown_section(df, title))

    if "expansion" in results:
        df = expansion_table(results["expansion"])
        table(df, "expansion", f"{name}: mixed inputs of several modalities, one decoupled model",
              note=EXPANSION_NOTE.format(degradation=json.dumps(results["expansion"]["degradation"])))
        means = df.dropna(subset=["mean"])
        report.plot_bars(dict(zip(means["method"], means["mean"])), out / f"{name}_expansion.png", prov,
                         f"{name}: mean accuracy on mixed inputs", "accuracy")
    if "forgetting" in results:
        scenario = results["forgetting"]
        table(pd.DataFrame(scenario["rows"]), "scenario", f"{name}: {scenario['tasks'][0]} then {scenario['tasks'][1]}",
              note=f"MMER's settings chosen on validation: {scenario['choice']}")
    expert = results["individual"]["expert_accuracy"] if "individual" in results else None
    if "learning_curves" in results.get("individual", {}):
        curves = pd.DataFrame(results["individual"]["learning_curves"])
        table(curves, "learning_curves", f"{name}: each expert's accuracy on its own task during its training",
              section=False)
        report.plot_learning_curves(curves, out / f"{name}_learning_curves.png", prov,
                                    f"{name}: experts' validation and test accuracy against training steps")
        table(trained_experts(curves), "experts", f"{name}: the experts once trained, on their own task's "
              "validation and test sets")
    matrices = {m: np.asarray(r["matrix"], dtype=float) for m, r in _matrix_results(results).items()}
    if not matrices:
        return sections
    summary = summary_table(results, expert)
    table(summary, "summary", f"{name}: final accuracy, BWT, forgetting, retention, storage, time", note=protocol_note)
    if protocol_note:
        sections.append(protocol_note + "\n")
    reference = reference_of(results)
    paired = paired_table(results, reference)
    if len(paired):
        table(paired, "paired", f"{name}: {reference} against each method, paired on the same test examples",
              note=PAIRED_NOTE)
    if expert:
        table(retention_table(results, tasks, expert), "retention", f"{name}: final accuracy and retention per task")
    long = pd.DataFrame([{"method": m, "after": tasks[t], "task": tasks[j], "acc": R[t, j]}
                         for m, R in matrices.items() for t in range(len(tasks)) for j in range(len(tasks))])
    table(long, "matrices", f"{name}: accuracy matrices R[after, task]", section=False)
    grids = grid_table(results)
    if len(grids):
        table(grids, "grids", f"{name}: validation grids", note="Mean validation accuracy with every task merged; "
              "the test split is never used.", section=False)
        sections.append(report.markdown_section(grids[grids["chosen"] != ""], f"{name}: settings chosen on validation "
                                                f"(full grids in {name}_grids.csv)"))
    if "mmer_controls" in results:
        masks, layers, overlap = mask_tables(results["mmer_controls"], tasks)
        table(masks, "masks", f"{name}: masks (density, reconstruction error, test accuracy of MMER's mask vs controls)")
        table(layers, "mask_layers", f"{name}: mask density per layer", section=False)
        table(overlap, "mask_overlap", f"{name}: pairwise mask overlap")
    _mmer_outputs(table, name, results, tasks)
    _stream_plots(out, prov, name, matrices, summary, tasks)
    return sections


def _stream_plots(out: Path, prov: dict, name: str, matrices: dict, summary: pd.DataFrame, tasks) -> None:
    """The accuracy matrices, each method's average forgetting, and accuracy against storage."""
    report.plot_accuracy_matrices(matrices, tasks, out / f"{name}_accuracy_matrices.png", prov, f"{name}: R[after, task]")
    forgetting = summary.dropna(subset=["avg_forgetting"])
    report.plot_bars(dict(zip(forgetting["method"], forgetting["avg_forgetting"])), out / f"{name}_forgetting.png", prov,
                     f"{name}: average forgetting", "average forgetting")
    report.plot_accuracy_vs_storage(summary, out / f"{name}_accuracy_vs_storage.png", prov, f"{name}: accuracy vs storage")


def _mmer_outputs(table, name: str, results: dict, tasks) -> None:
    """MMER's state modes side by side, and where each router sent each task's samples."""
    modes = modes_table(results, tasks)
    if len(modes):
        table(modes, "modes", f"{name}: MMER exact / sparse / compact")
    for method, router, suffix in (("mmer_routed", "Gaussians in theta0's features", ""),
                                   ("mmer_routed_entropy", "lowest predictive entropy", "_entropy")):
        if method in results:
            table(routing_table(results[method], tasks), f"routing{suffix}",
                  f"{name}: MMER without task labels, where routing by {router} sent each task's samples")


def console_summary(results: dict) -> str:
    """The summary tables as a run ends, one per stream."""
    lines = []
    for name, stream_results in results.items():
        expert = stream_results.get("individual", {}).get("expert_accuracy")
        summary = summary_table(stream_results, expert)
        if len(summary):
            lines += [f"{name}:", summary[["method", "final_avg_acc", "avg_forgetting", "retention", "storage_total_mb"]]
                      .to_string(index=False, float_format=lambda v: f"{v:.3f}"), ""]
        if "forgetting" in stream_results:
            lines += [f"{name}:", pd.DataFrame(stream_results["forgetting"]["rows"]).to_string(index=False), ""]
    return "\n".join(lines)
