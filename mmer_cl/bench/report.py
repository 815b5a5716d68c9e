"""Result files under results/: CSV and Markdown tables and PNG plots, each headed by (CSV, Markdown) or
carrying in its metadata (PNG, plus PROVENANCE.md beside it) the command, date, git commit and machine."""

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def provenance(command: str | None = None) -> dict:
    """Who made a result: command line, UTC date, git commit ('uncommitted' outside a commit; '+dirty' when
    tracked files differ from it), machine (uname, cores, RAM)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = "uncommitted"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    uname = platform.uname()
    return {
        "command": command or shlex.join(["mmer-cl", *sys.argv[1:]] if sys.argv[0].endswith("mmer-cl") else sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit,
        "machine": f"{uname.system} {uname.release} {uname.machine}, {os.cpu_count()} cores "
                   f"(torch threads {_torch_threads()}), {ram:.1f} GiB RAM",
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def provenance_lines(prov: dict) -> list[str]:
    return [f"{key}: {value}" for key, value in prov.items()]


def write_table(df: pd.DataFrame, out_dir: Path, stem: str, prov: dict, title: str, note: str = "") -> None:
    """`stem`.csv headed by '# ' provenance lines (pandas: read_csv(..., comment='#')) and `stem`.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in provenance_lines(prov))
    (out_dir / f"{stem}.csv").write_text(header + df.to_csv(index=False))
    (out_dir / f"{stem}.md").write_text(markdown_section(df, title, prov, note))


def markdown_section(df: pd.DataFrame, title: str, prov: dict | None = None, note: str = "") -> str:
    lines = [f"## {title}", ""]
    if prov:
        lines += ["<!-- " + " | ".join(provenance_lines(prov)) + " -->", ""]
    if note:
        lines += [note, ""]
    lines += [markdown_table(df), ""]
    return "\n".join(lines)


def markdown_table(df: pd.DataFrame) -> str:
    def fmt(value):
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def write_provenance(out_dir: Path, prov: dict, extra: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "# Provenance of the files in this folder\n\n" + "\n".join(f"- {line}" for line in provenance_lines(prov))
    (out_dir / "PROVENANCE.md").write_text(text + ("\n\n" + extra if extra else "") + "\n")


# ---- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, prov: dict) -> None:
    fig.text(0.01, 0.005, f"{prov['commit'][:12]}  {prov['date']}", fontsize=6, color="gray")
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Description": "; ".join(provenance_lines(prov))})


def plot_accuracy_matrices(matrices: dict[str, np.ndarray], tasks: list[str], path: Path, prov: dict, title: str) -> None:
    """One heatmap of R[t, j] per method."""
    plt = _pyplot()
    n = len(matrices)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (method, R) in zip(axes.flat, matrices.items()):
        R = np.asarray(R, dtype=float)
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for (t, j), value in np.ndenumerate(R):
            if not np.isnan(value):
                ax.text(j, t, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, fontsize=7, rotation=45)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, prov)
    plt.close(fig)


def plot_learning_curves(curves: pd.DataFrame, path: Path, prov: dict, title: str) -> None:
    """One panel per task: its expert's validation and test accuracy against its training steps."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(curves["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for split, style in (("val", "--"), ("test", "-")):
            rows = curves[(curves["task"] == task) & (curves["split"] == split)]
            ax.plot(rows["step"], rows["acc"], style, marker="o", markersize=3, label=split)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, prov)
    plt.close(fig)


def plot_bars(values: dict[str, float], path: Path, prov: dict, title: str, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(values)), 3.2))
    ax.bar(list(values), list(values.values()), color="tab:red")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    _save(fig, path, prov)
    plt.close(fig)


def plot_accuracy_vs_storage(df: pd.DataFrame, path: Path, prov: dict, title: str) -> None:
    """Final average accuracy against total storage bytes (log scale), one point per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for row in df.itertuples(index=False):
        ax.scatter(row.storage_total_mb, row.final_avg_acc)
        ax.annotate(row.method, (row.storage_total_mb, row.final_avg_acc), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("storage (MB, log scale)")
    ax.set_ylabel("final average accuracy")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path, prov)
    plt.close(fig)
