"""Render the Grafana dashboard's panels from a real Prometheus, without Grafana.

Grafana cannot run on the CPU dev machines, so the picture of the dashboard in the README
(``docs/dashboard.png``) is drawn with matplotlib from the very PromQL expressions of
``deploy/grafana/tokenprune-dashboard.json``, laid out on the dashboard's own 24-column grid
(``gridPos``): ``stat`` panels show the instant value at the end of the window, ``timeseries``
panels the ``query_range`` result over the window, one line per series, named by the target's
``legendFormat``.

``tests/test_prometheus.py`` calls :func:`render` on the Prometheus it scrapes a CPU vLLM server
with; ``TOKENPRUNE_UPDATE_DOCS=1`` makes it write ``docs/dashboard.png``. By hand, against any
Prometheus that scrapes a vllm-tokenprune server::

    python scripts/plot_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --start -15m --var model_name=my-model --out /tmp/dashboard.png

Template variables are substituted as Grafana does for a single selection (``$model_name`` ->
the value, which the expressions use as a regex) or for "All" (``.*``). Grafana's built-ins
``$__rate_interval``, ``$__interval`` and ``$__range`` are filled in from the step and window.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "tokenprune-dashboard.json"

_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


# --------------------------------------------------------------------------- dashboard model


def load_dashboard(path: str | Path = DASHBOARD) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every non-row panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def iter_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every PromQL target of the dashboard."""
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def template_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard.get("templating", {}).get("list", []))


def duration(seconds: float) -> str:
    """A Prometheus duration string (whole seconds, at least 1s)."""
    return f"{max(1, math.ceil(seconds))}s"


def expand(expr: str, variables: dict[str, str]) -> str:
    """Substitute ``$name`` / ``${name}``; an undefined variable is an error (not left as is)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"undefined dashboard variable ${name} in {expr!r}")
        return variables[name]

    return _VAR.sub(sub, expr)


def builtin_variables(step: float, window: float, scrape_interval: float) -> dict[str, str]:
    """Grafana's built-ins: ``$__rate_interval`` = max(step + scrape, 4 * scrape)."""
    return {
        "__interval": duration(step),
        "__rate_interval": duration(max(step + scrape_interval, 4 * scrape_interval)),
        "__range": duration(window),
    }


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


# --------------------------------------------------------------------------- Prometheus API


class Prometheus:
    """The few calls of Prometheus's HTTP API (``/api/v1``) that the dashboard needs."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        r = requests.get(self.url + path, params=params, timeout=self.timeout)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: HTTP {r.status_code}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                                  "end": f"{end:.3f}", "step": f"{step:g}"})
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", {"match[]": match})


# --------------------------------------------------------------------------- drawing


def _fmt(value: float, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit.startswith("suffix:"):
        return f"{value:.2f}{unit.removeprefix('suffix:')}"
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.2f} req/s"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _axis_formatter(unit: str) -> Any:
    from matplotlib.ticker import FuncFormatter

    if unit == "s":
        return FuncFormatter(lambda v, _: f"{v * 1e3:.0f} ms" if abs(v) < 1 else f"{v:.1f} s")
    if unit == "percentunit":
        return FuncFormatter(lambda v, _: f"{100 * v:.3g}%")
    if unit.startswith("suffix:"):
        suffix = unit.removeprefix("suffix:")
        return FuncFormatter(lambda v, _: f"{v:.1f}{suffix}")
    return FuncFormatter(lambda v, _: f"{v:g}")


def render(dashboard: dict[str, Any], prometheus_url: str, start: float, end: float,
           out: str | Path, variables: dict[str, str], *, step: float = 1.0,
           scrape_interval: float = 1.0, subtitle: str = "",
           xlabel: str = "seconds") -> dict[str, int]:
    """Draw every panel of ``dashboard`` for [start, end] into ``out`` (PNG).

    ``variables``: values of the dashboard's template variables (``model_name``, ``method``,
    ``datasource``...). Returns {panel title: number of series drawn}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prom = Prometheus(prometheus_url)
    values = {**builtin_variables(step, end - start, scrape_interval), **variables}
    panels = dashboard.get("panels", [])
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.36  # inches per grid row
    top = 0.75  # inches for the title
    width, height = 18.0, rows * unit_h + top
    bg, panel_bg, fg, grid = "#111217", "#181b1f", "#ccccdc", "#2c3235"
    palette = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff",
               "#fade2a", "#96d98d", "#ffb357", "#ca95e5", "#ff7383"]
    fig = plt.figure(figsize=(width, height), facecolor=bg)
    fig.text(0.01, 1 - 0.3 / height, dashboard.get("title", ""), color=fg, fontsize=16,
             fontweight="bold", va="center")
    if subtitle:
        fig.text(0.99, 1 - 0.3 / height, subtitle, color="#8e8e8e", fontsize=9, va="center",
                 ha="right")
    drawn: dict[str, int] = {}

    def box(gp: dict[str, int], pad: tuple[float, float, float, float] = (0, 0, 0, 0)
            ) -> list[float]:
        """Figure coordinates of a grid cell, less ``pad`` inches (left, top, right, bottom)."""
        left, ptop, right, bottom = pad
        x0 = gp["x"] / 24 + 0.004 + left / width
        w = gp["w"] / 24 - 0.008 - (left + right) / width
        y_top = (top + gp["y"] * unit_h + ptop) / height
        h = (gp["h"] * unit_h - ptop - bottom) / height - 0.008
        return [x0, 1 - y_top - h, w, h]

    for panel in panels:
        gp = panel["gridPos"]
        title = panel.get("title", "")
        if panel["type"] == "row":
            fig.text(gp["x"] / 24 + 0.005, 1 - (top + (gp["y"] + 0.55) * unit_h) / height,
                     title, color=fg, fontsize=12, fontweight="bold", va="center")
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        frame = fig.add_axes(box(gp))
        frame.set_facecolor(panel_bg)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(grid)
        frame.text(0.012, 0.97, title, transform=frame.transAxes, color=fg, fontsize=10,
                   fontweight="bold", va="top")
        if panel["type"] == "stat":
            target = panel["targets"][0]
            result = prom.query(expand(target["expr"], values), end)
            value = float(result[0]["value"][1]) if result else float("nan")
            decimals = panel.get("fieldConfig", {}).get("defaults", {}).get("decimals")
            if decimals is not None and math.isfinite(value) and unit not in (
                    "percentunit", "s"):
                value = round(value, decimals)
            frame.text(0.5, 0.42, _fmt(value, unit), transform=frame.transAxes,
                       color=palette[0], fontsize=26, fontweight="bold", ha="center",
                       va="center")
            drawn[title] = len(result)
            continue
        ax = fig.add_axes(box(gp, pad=(0.62, 0.42, 0.15, 0.38)))
        ax.set_facecolor(panel_bg)
        n = 0
        for target in panel["targets"]:
            series = prom.query_range(expand(target["expr"], values), start, end, step)
            for s in series:
                ts = [float(t) - start for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                ax.plot(ts, ys, color=palette[n % len(palette)], linewidth=1.6,
                        label=legend(target.get("legendFormat", ""), s["metric"]))
                n += 1
        drawn[title] = n
        ax.set_xlim(0, end - start)
        if n:  # headroom for the legend, as Grafana keeps it off the lines
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.3 * (hi - lo))
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        ax.yaxis.set_major_formatter(_axis_formatter(unit))
        ax.grid(color=grid, linewidth=0.6)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_xlabel(xlabel, color="#8e8e8e", fontsize=7, labelpad=1)
        if n:
            ax.legend(loc="upper left", fontsize=7, ncol=min(n, 4), frameon=False,
                      labelcolor=fg, bbox_to_anchor=(0.0, 1.0))
        else:
            ax.text(0.5, 0.5, "No data", transform=ax.transAxes, color="#8e8e8e",
                    ha="center", va="center")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=bg)
    plt.close(fig)
    return drawn


# --------------------------------------------------------------------------- command line


def _time_arg(value: str, now: float) -> float:
    if value == "now":
        return now
    m = re.fullmatch(r"-(\d+)([smh])", value)
    if m:
        return now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return float(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--dashboard", default=str(DASHBOARD))
    p.add_argument("--start", default="-15m", help="unix time, 'now' or -15m/-1h")
    p.add_argument("--end", default="now")
    p.add_argument("--step", type=float, default=5.0)
    p.add_argument("--scrape-interval", type=float, default=5.0)
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="template variable value (default: .* for model_name and method)")
    p.add_argument("--out", default="dashboard.png")
    args = p.parse_args(argv)
    now = time.time()
    variables = {"model_name": ".*", "method": ".*", "datasource": "prometheus"}
    variables.update(dict(v.split("=", 1) for v in args.var))
    drawn = render(load_dashboard(args.dashboard), args.prometheus,
                   _time_arg(args.start, now), _time_arg(args.end, now), args.out, variables,
                   step=args.step, scrape_interval=args.scrape_interval)
    for title, n in drawn.items():
        print(f"{n:3d} series  {title}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
