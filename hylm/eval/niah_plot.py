"""The NIAH heatmap: mean score per depth (rows) x context length (columns), as a PNG.

matplotlib is optional (it is not a dependency of hylm): without it `plot_heatmap` returns False and the caller
prints a notice instead.
"""

from __future__ import annotations

import os


def plot_heatmap(summary: dict, path: str, title: str = "Needle in a haystack") -> bool:
    """Write the heatmap of `summary` (from `hylm.eval.niah.summarize`) to `path`; False if matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        return False
    from .niah import length_label

    lengths, depths = summary["lengths"], summary["depths"]
    nan = float("nan")
    grid = [[nan if summary["scores"][i][j] is None else 100.0 * summary["scores"][i][j]
             for i in range(len(lengths))] for j in range(len(depths))]
    cmap = LinearSegmentedColormap.from_list("niah", ["#d7301f", "#fdae61", "#fee08b", "#a6d96a", "#1a9850"])
    cmap = cmap.with_extremes(bad="#dddddd") if hasattr(cmap, "with_extremes") else cmap
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(lengths) + 2.5), max(3.0, 0.45 * len(depths) + 1.8)))
    try:
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        overall = summary.get("overall")
        ax.set_title(title if overall is None else f"{title}\nmean score {100 * overall:.1f}", fontsize=10)
        for j in range(len(depths)):
            for i in range(len(lengths)):
                v = grid[j][i]
                if v == v:  # not NaN
                    ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=8, color="black")
        fig.colorbar(im, ax=ax, label="score (%)")
        fig.tight_layout()
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return True
