"""The human-readable parity reports: Markdown (summary tables) and one self-contained HTML page (tables plus
inline SVG plots of error per tap, error histograms and top-k overlap per layer; no scripts, no server)."""

from __future__ import annotations

from html import escape

from .svg import bars, log_lines

CSS = """body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}table{border-collapse:collapse;
margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.pass{color:#1a7f37;font-weight:bold}.fail{color:#c00;font-weight:bold}
figure{margin:8px 0 20px}figcaption{font-weight:bold;margin-bottom:4px}code{background:#f4f4f4;padding:1px 4px}"""


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _summary_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        e = r["e2e"]["metrics"]
        logits = next((t["metrics"] for t in r["taps"] if t["tap"] == "final.logits"), {})
        rep = r["repeatability"]
        rows.append([r["candidate"], r["verdict"], _f(logits.get("rel_rms")), _f(e["kl_mean"]),
                     _f(e["top1_agreement"]), _f(e["top1_in_ref_top5"]),
                     ", ".join("never" if d is None else str(d) for d in e["greedy_first_divergence"]),
                     r["blame"]["tap"] or "none", _f(rep["max_abs_step_logits"]) if rep else "not run",
                     str(len(r["failed"]))])
    return rows


SUMMARY_HEAD = ["candidate", "verdict", "logits rel_rms", "mean KL", "top-1", "top-1 in ref top-5",
                "greedy divergence step", "op to blame", "run-to-run max |Δlogit|", "failed rows"]


def render_markdown(report: dict) -> str:
    ref = report["reference"]
    lines = [f"# Parity report: {ref['label']} vs {', '.join(c['label'] for c in report['candidates'])}", "",
             f"Verdict: **{report.get('verdict', '?').upper()}**. Checkpoint `{report['checkpoint']['path']}`, "
             f"{report['inputs']['prompts']} prompts ({report['inputs']['prompt_tokens']} tokens), "
             f"{report['inputs']['decode_steps']} teacher-forced decode steps.", "",
             "| " + " | ".join(SUMMARY_HEAD) + " |", "|" + "---|" * len(SUMMARY_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _summary_rows(report)]
    if report.get("three_way"):
        tw = report["three_way"]
        lines += ["", f"Three-way, errors relative to {tw['baseline']}:"]
        lines += [f"- {o['candidate']}: median tap rel_rms ratio {_f(o['median_rel_rms_ratio'])}, final logits "
                  f"{_f(o['final_logits_ratio'])}, KL {_f(o['kl_ratio'])}" for o in tw["others"]]
    for r in report["results"]:
        lines += ["", f"## {r['candidate']}", "", "| tap | kind | metric | value | bound | verdict |",
                  "|---|---|---|---|---|---|"]
        for t in r["taps"]:
            m = t.get("metrics", {})
            metric, bound = ("jaccard", "jaccard_min") if t["type"] == "index" else ("rel_rms", "rel_rms_max")
            lines.append(f"| {t['tap']} | {t['kind']} | {metric} | {_f(m.get(metric))} | "
                         f"{_f(t.get('bound', {}).get(bound))} | {t['verdict']} |")
        if r["failed"]:
            lines.append(f"\nFailed: {', '.join(r['failed'])}; repro bundles under `repro/`.")
    return "\n".join(lines) + "\n"


def _table(head: list[str], rows: list[list[str]], verdict_col: int | None = None) -> str:
    h = "".join(f'<th class="{"l" if i == 0 else ""}">{escape(c)}</th>' for i, c in enumerate(head))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = "l" if i == 0 else ""
            if i == verdict_col:
                cls = c
            cells.append(f'<td class="{cls}">{escape(c)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def render_html(report: dict) -> str:
    ref, results = report["reference"], report["results"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Parity report</title><style>{CSS}</style>"
             f"</head><body><h1>Parity: {escape(ref['label'])} vs "
             f"{escape(', '.join(c['label'] for c in report['candidates']))}</h1>",
             f"<p>Verdict: <span class='{report.get('verdict', '')}'>{escape(report.get('verdict', '?').upper())}"
             f"</span> · checkpoint <code>{escape(report['checkpoint']['path'])}</code> · "
             f"{report['inputs']['prompts']} prompts, {report['inputs']['prompt_tokens']} tokens · "
             f"{report['inputs']['decode_steps']} decode steps · created {escape(str(report.get('created')))}</p>",
             _table(SUMMARY_HEAD, _summary_rows(report), verdict_col=1)]
    taps = [t["tap"] for t in results[0]["taps"] if t["type"] == "float"]
    series = {r["candidate"]: [next((t["metrics"].get("rel_rms") for t in r["taps"] if t["tap"] == n
                                     and "metrics" in t), None) for n in taps] for r in results}
    marks = {r["candidate"]: [next(t["verdict"] == "fail" for t in r["taps"] if t["tap"] == n) for n in taps]
             for r in results}
    parts.append(log_lines("Error per tap, in model order (rel_rms = sqrt(NMSE); rings = failing rows)",
                           "rel_rms", taps, series, marks))
    hist = {r["candidate"]: next((t["metrics"]["histogram"]["counts"] for t in r["taps"]
                                  if t["tap"] == "final.logits" and "histogram" in t.get("metrics", {})), [])
            for r in results}
    edges = report["results"][0]["taps"][-1].get("metrics", {}).get("histogram", {}).get("log10_edges", [])
    if edges:
        parts.append(bars("Histogram of |Δ| in the final logits (per decade)", "elements",
                          [f"1e{e}" for e in edges[:-1]], hist))
    for kind, title in (("indexer.topk", "Indexer top-k overlap per layer (mean Jaccard)"),
                        ("moe.route", "Expert choice overlap per layer (mean Jaccard)")):
        names = [t["tap"] for t in results[0]["taps"] if t["kind"] == kind]
        if names:
            parts.append(bars(title, "Jaccard", names, {r["candidate"]: [next(t.get("metrics", {}).get("jaccard", 0.0)
                                                                              for t in r["taps"] if t["tap"] == n)
                                                                         for n in names]
                                                        for r in results}, y_max=1.0))
    if report.get("three_way"):
        tw = report["three_way"]
        parts.append(f"<h2>Three-way (errors relative to {escape(tw['baseline'])})</h2>")
        parts.append(_table(["candidate", "median tap ratio", "final logits ratio", "KL ratio"],
                            [[o["candidate"], _f(o["median_rel_rms_ratio"]), _f(o["final_logits_ratio"]),
                              _f(o["kl_ratio"])] for o in tw["others"]]))
    for r in results:
        parts.append(f"<h2>{escape(r['candidate'])}</h2><p>Op to blame: <b>{escape(r['blame']['tap'] or 'none')}"
                     f"</b> (largest growth: {escape(str(r['blame']['largest_growth_tap']))}, "
                     f"{_f(r['blame']['largest_growth'])}x).</p>")
        rows = []
        for t in r["taps"]:
            m = t.get("metrics", {})
            if t["type"] == "index":
                rows.append([t["tap"], "index", _f(m.get("jaccard")), _f(m.get("equal_sets")), "", "", "",
                             _f(t["bound"]["jaccard_min"]), t["verdict"]])
            else:
                rows.append([t["tap"], t["type"], _f(m.get("rel_rms")), _f(m.get("cosine"), 6), _f(m.get("max_abs")),
                             _f(m.get("ratio_1e-3")), _f(t.get("growth")), _f(t.get("bound", {}).get("rel_rms_max")),
                             t["verdict"]])
        parts.append(_table(["tap", "type", "rel_rms | jaccard", "cosine | equal sets", "max |Δ|", "≤1e-3 ratio",
                             "growth", "bound", "verdict"], rows, verdict_col=8))
    parts.append("</body></html>")
    return "\n".join(parts)
