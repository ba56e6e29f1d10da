"""The two plots of ``hf-layercache bench``: hit rate per layer, and speed against fidelity (PNG, matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import CLIError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CLIError(
            "bench draws its plots with matplotlib: pip install matplotlib (or the extra, hf-layercache[plots])"
        ) from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _run_label(run: dict, strategy: str) -> str:
    setting = strategy if run["threshold"] is None else f"{strategy}, τ={run['threshold']:.2f}"
    return f"{setting}, pass {run['pass']}"


def write_plots(results: dict, out: Path) -> list[str]:
    """``hit_rate_per_layer.png`` and ``speed_vs_fidelity.png`` in ``out``; returns their file names."""
    plt = _pyplot()
    names = ["hit_rate_per_layer.png", "speed_vs_fidelity.png"]
    for name, draw in zip(names, (_plot_hit_rates, _plot_tradeoff), strict=True):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
        draw(ax, results)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
        fig.savefig(out / name, bbox_inches="tight")
        plt.close(fig)
    return names


def _run_style(results: dict, run: dict) -> dict[str, Any]:
    """Colour by threshold (a sweep reads as a gradient), line style by pass."""
    import matplotlib

    thresholds = sorted({r["threshold"] for r in results["runs"] if r["threshold"] is not None})
    styles = ("-", "--", ":", "-.")
    style: dict[str, Any] = {"linestyle": styles[(run["pass"] - 1) % len(styles)]}
    if len(thresholds) > 1:
        position = thresholds.index(run["threshold"]) / (len(thresholds) - 1)
        style["color"] = matplotlib.colormaps["viridis"](0.9 * position)
    else:
        style["color"] = f"C{run['pass'] - 1}"
    return style


def _plot_hit_rates(ax, results: dict) -> None:
    layers = results["layers"]
    strategy = results["config"]["strategy"]
    for run in results["runs"]:
        rates = [100 * run["layer_hit_rates"][name] for name in layers]
        ax.plot(range(len(layers)), rates, marker="o", label=_run_label(run, strategy), **_run_style(results, run))
    if len(layers) <= 16:  # names fit; beyond that, integer positions chosen by matplotlib
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("cached layer (forward order)")
    ax.set_ylabel("hit rate (% of lookups)")
    ax.set_title(f"Hit rate per layer: {strategy}, {results['texts']} texts, batch size {results['batch_size']}")


def _plot_tradeoff(ax, results: dict) -> None:
    strategy = results["config"]["strategy"]
    passes = sorted({run["pass"] for run in results["runs"]})
    for number in passes:
        runs = [run for run in results["runs"] if run["pass"] == number]
        x = [run["fidelity"]["mean"] for run in runs]
        y = [run["speed_ratio"] for run in runs]
        ax.plot(x, y, marker="o", label=f"{strategy}, pass {number}", color=f"C{number - 1}")
        for run, xi, yi in zip(runs, x, y, strict=True):
            if run["threshold"] is not None:
                ax.annotate(
                    f"τ={run['threshold']:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    lowest = min(run["fidelity"]["mean"] for run in results["runs"])
    margin = max(1e-3, (1.0 - lowest) * 0.1)
    ax.set_xlim(lowest - margin, 1.0 + margin * 0.15)  # a cosine never exceeds 1: no room beyond the marker
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1.1 * max(1.0, *(run["speed_ratio"] for run in results["runs"])))  # the 1x line always shows
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="no speed-up (1\N{MULTIPLICATION SIGN})")
    ax.set_xlabel("fidelity: mean cosine similarity to the uncached output (1 = identical)")
    ax.set_ylabel("speed-up (uncached time / cached time, \N{MULTIPLICATION SIGN})")
    swept = len(results["runs"]) > len(passes)
    ax.set_title("Speed against fidelity" + (" across thresholds τ" if swept else ""))
