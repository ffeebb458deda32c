"""The status page (`GET /status`): what cld serves and knows, and how each version scored.

Owns the page: one HTML document rendered on the server from the status object
(`daemon.observe.status.collect`), with the plots of forgetting and learning per adapter version drawn by
matplotlib as inline SVG and the thresholds drawn as dashed lines. The page fetches nothing (cld
often runs on machines without internet) and reloads itself. Every string from the status (file
names, reasons, errors) goes through Jinja2's autoescape. Knows nothing of HTTP or of where the
status comes from.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from typing import Any

import jinja2
from markupsafe import Markup

from daemon.learning.decide import RULE_OF, RULES, passes
from daemon.observe.status import cycle_line, failed_reasons, fallback_line, item_count, recall_line, replay_line, span

REFRESH_S = 30
RECENT_CYCLES = 12
PLOTTED_VERSIONS = 40  # the latest versions with probe values; more would crowd the axis


@dataclass(frozen=True)
class Series:
    probe: str      # key in an adapter's probe results
    label: str
    colour: str     # also the colour of its threshold line


# (title, y-axis label, series) of each plot; values are relative changes or shares, shown in %.
PLOTS = (
    ("Forgetting per version", "change vs base (%)", (
        Series("forgetting_vs_base", "held-out NLL", "#d62728"),
        Series("behaviour_increase", "behaviour NLL", "#ff7f0e"),
    )),
    ("Learning per version", "% (higher is better)", (
        Series("nll_drop", "new-document NLL drop", "#1f77b4"),
        Series("cloze_pass", "cloze probes passed", "#2ca02c"),
    )),
)
PROBE_TITLES = {"forgetting_vs_base": "forgetting vs base", "forgetting_vs_incumbent": "vs incumbent",
                "behaviour_increase": "behaviour", "drift_agreement": "drift agreement", "nll_drop": "NLL drop",
                "cloze_pass": "cloze", "retention": "retention", "qa_drop": "QA drop", "answered": "answered",
                "closed_book": "answered closed book", "open_book": "base open book",
                "nll_drop_vs_incumbent": "NLL drop vs incumbent", "knowledge_kept": "earlier NLL gain kept"}

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{{ refresh_s }}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cld status: {{ model.served_name }} = {{ model.current_adapter or "base" }}</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em 2em; color: #222; background: #fff; }
 h1 { font-size: 1.5em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
 .facts { display: flex; flex-wrap: wrap; gap: .8em; }
 .card { border: 1px solid #ddd; border-radius: 6px; padding: .5em .9em; min-width: 11em; }
 .card b { display: block; font-size: 1.3em; }
 .plots { display: flex; flex-wrap: wrap; gap: 1em; } .plot { margin: 0; } .plot svg { width: 560px; height: auto; }
 td.when { white-space: nowrap; }
 table { border-collapse: collapse; } th, td { padding: .25em .7em; border-bottom: 1px solid #eee;
 text-align: left; vertical-align: top; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .fail { color: #c00; font-weight: bold; } .promoted { color: #080; font-weight: bold; }
 .rejected, .failed { color: #c00; } .skipped, .retired, .muted { color: #888; } .running { color: #b60; }
 ul.reasons { margin: 0; padding-left: 1.1em; }
</style></head>
<body>
<h1>cld: <span id="serving">{{ model.served_name }} = {{ model.current_adapter or "base" }}</span></h1>
<div class="muted" id="daemon">{{ daemon_line }} · base model {{ model.base }} · updated {{ now }}
 (reloads every {{ refresh_s }} s)</div>

<h2>Now</h2>
<div class="facts">
 <div class="card" id="documents-pending">pending documents<b>{{ documents.pending }}</b>{{ documents.ready }} ready
  {%- if documents.set_aside %} · <span class="fail">{{ documents.set_aside }} set aside</span>{% endif %}</div>
 <div class="card" id="documents-learned">learned<b>{{ documents.learned }}</b>of {{ documents.ingested }} ingested</div>
 <div class="card" id="documents-quarantined">quarantined<b>{{ documents.quarantined }}</b>
  {{ documents.duplicates }} duplicates</div>
 <div class="card" id="replay">replay buffer<b>{{ replay.passages }} passages</b>{{ replay_line }}</div>
 {%- if recall %}
 <div class="card" id="recall">recall<b>{{ recall.requests.recalled }} recalled</b>{{ recall_line }}</div>
 {%- endif %}
 <div class="card" id="cycle-now">cycle<b>{% if running %}{{ running.id }} {{ running.stage }}{% else %}idle{% endif %}</b>
  {% if running %}{{ running_line }}{% else %}{{ cycles|length }} recent{% endif %}</div>
</div>

<h2>Forgetting and learning per version</h2>
<div class="plots">{% for plot in plots %}<figure class="plot" id="plot-{{ loop.index }}">{{ plot }}</figure>{% endfor %}</div>
{% if not plotted %}<p class="muted">No version has probe results yet.</p>{% endif %}

<h2>Adapter versions</h2>
<table id="adapters"><tr><th>version</th><th>state</th><th>parent</th><th>docs</th>
{% for probe in probe_names %}<th>{{ probe_titles[probe] }}</th>{% endfor %}</tr>
{% for a in adapters|reverse %}<tr><td>{{ a.version }}</td><td class="{{ a.state }}">{{ a.state }}</td>
<td>{{ a.parent or "base" }}</td><td class="num">{{ a.documents }}</td>
{% for probe in probe_names %}{% set cell = probe_cell(probe, a.probes) %}
<td class="num {{ cell.css }}">{{ cell.text }}</td>{% endfor %}</tr>
{% else %}<tr><td colspan="{{ 4 + probe_names|length }}" class="muted">none yet</td></tr>{% endfor %}
</table>

<h2>Recent cycles</h2>
<table id="cycles"><tr><th>cycle</th><th>started</th><th>trigger</th><th>outcome</th><th>version</th>
<th>took</th><th>reasons</th></tr>
{% for c in cycles|reverse %}<tr class="cycle"><td class="num">{{ c.id }}</td><td class="when">{{ ago(c.started_at) }}</td>
<td>{{ c.trigger }}</td><td class="{{ c.state }}">{{ c.state }}</td>
<td>{{ c.version or "-" }}</td><td class="num when">{{ took(c) }}</td>
<td>{% if c.error %}<span class="fail">{{ c.error }}</span>{% elif c.state == "running" %}{{ line(c) }}{% endif %}
<ul class="reasons">{% for r in c.reasons %}<li{% if r in failed(c) %} class="fail"{% endif %}>{{ r }}</li>{% endfor %}</ul></td></tr>
{% else %}<tr><td colspan="7" class="muted">no cycle yet</td></tr>{% endfor %}
</table>
</body></html>
"""

_drawing = threading.Lock()  # pages render in worker threads; matplotlib is not thread-safe
_environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_page = _environment.from_string(TEMPLATE)


def render(status: dict[str, Any], now_s: float | None = None) -> str:
    """The page for one status object (`daemon.observe.status.collect`)."""
    now_s = now_s or time.time()
    limits = status.get("thresholds") or {}
    plotted = [a for a in status["adapters"] if any(a.get("probes", {}).get(s.probe) is not None
                                                    for _, _, series in PLOTS for s in series)][-PLOTTED_VERSIONS:]
    cycles = status["cycles"][-RECENT_CYCLES:]
    running = next((c for c in reversed(cycles) if c["state"] == "running"), None)
    return _page.render(
        refresh_s=REFRESH_S, model=status["model"], documents=status["documents"], replay=status["replay"],
        replay_line=replay_line(status["replay"]),
        recall=status["daemon"].get("recall"), recall_line=recall_line(status["daemon"].get("recall") or {}),
        adapters=status["adapters"], cycles=cycles, running=running,
        running_line=cycle_line(running) if running else "", daemon_line=_daemon_line(status["daemon"]),
        now=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now_s)),
        plots=[plot_svg(title, axis, series, plotted, limits) for title, axis, series in PLOTS] if plotted else [],
        plotted=plotted, probe_names=[rule.probe for rule in RULES], probe_titles=PROBE_TITLES,
        probe_cell=lambda probe, measured: _cell(probe, measured, limits),
        ago=lambda at: f"{span(now_s - at)} ago" if at else "-", took=_took, line=cycle_line, failed=failed_reasons,
    )


def plot_svg(title: str, axis: str, series: tuple[Series, ...], adapters: list[dict[str, Any]],
             limits: dict[str, float]) -> Markup:
    """One plot, as an inline <svg>: a line per series over the versions (one point per version;
    a version without that value leaves a gap), each threshold as a dashed line of its colour.
    Each series' line has the id `series-<probe>` and each threshold `limit-<probe>`."""
    with _drawing:
        return _plot_svg(title, axis, series, adapters, limits)


def _plot_svg(title: str, axis: str, series: tuple[Series, ...], adapters: list[dict[str, Any]],
              limits: dict[str, float]) -> Markup:
    from matplotlib.figure import Figure  # deliberately lazy: ~0.5 s and 40 MB, for the first page only

    figure = Figure(figsize=(7.0, 3.4))
    axes = figure.subplots()
    positions = list(range(len(adapters)))
    for item in series:
        values = [_percent(a.get("probes", {}).get(item.probe)) for a in adapters]
        axes.plot(positions, values, marker="o", markersize=6, linewidth=2, color=item.colour,
                  label=item.label, gid=f"series-{item.probe}")
        limit_key = RULE_OF[item.probe].limit
        if limit_key in limits:
            axes.axhline(limits[limit_key] * 100, color=item.colour, linestyle="--", linewidth=1.2,
                         gid=f"limit-{item.probe}", label=f"limit: {item.label}")
    axes.axhline(0, color="#999", linewidth=0.8)
    axes.set_xticks(positions, [f"{a['version']}\n{a['state']}" for a in adapters], fontsize=8)
    axes.set_xlim(-0.5, len(adapters) - 0.5)
    axes.set_ylabel(axis)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="best", framealpha=0.8)
    figure.tight_layout()
    out = io.StringIO()
    figure.savefig(out, format="svg")
    svg = out.getvalue()
    return Markup(svg[svg.index("<svg"):])  # drop the XML prolog and doctype: inline SVG


def _percent(value: float | None) -> float:
    return float("nan") if value is None else value * 100


def _cell(probe: str, measured: dict[str, Any], limits: dict[str, float]) -> dict[str, str]:
    value, items = measured.get(probe), item_count(probe, measured)
    if value is None:
        return {"text": "-", "css": "muted"}
    text = f"{value:.2f}" if probe == "drift_agreement" else f"{value:+.1%}" if probe in (
        "forgetting_vs_base", "forgetting_vs_incumbent", "behaviour_increase", "qa_drop") else f"{value:.1%}"
    if items:
        text = f"{round(value * items)}/{items}"
    return {"text": text, "css": "fail" if passes(probe, measured, limits) is False else ""}


def _daemon_line(daemon: dict[str, Any]) -> str:
    if not daemon.get("running"):
        return "daemon not running"
    failing = f"; intake failing: {daemon['ingest_error']}" if daemon.get("ingest_error") else ""
    failing += f"; {daemon['degraded']}" if daemon.get("degraded") else ""
    failing += f"; {fallback_line(daemon['fallback'])}" if daemon.get("fallback") else ""
    return (f"daemon {daemon.get('phase', '?')} (pid {daemon.get('pid')}), model server {daemon.get('vllm', '?')}, "
            f"{daemon.get('vllm_restarts', 0)} restarts{failing}")


def _took(cycle: dict[str, Any]) -> str:
    if not cycle.get("finished_at") or not cycle.get("started_at"):
        return "-"
    return f"{cycle['finished_at'] - cycle['started_at']:.0f} s"
