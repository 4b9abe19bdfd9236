"""The benchmark's table and its verdicts on issue 6's targets (computed from the results, never assumed).

A target is met (True), not met (False) or not measured (None: the comparison it needs did not run, e.g.
transformers failed at 16K for a reason other than memory)."""

from __future__ import annotations


def _get(results, engine, context):
    return next((r for r in results if r["engine"] == engine and r["context"] == context
                 and not r.get("scenario")), None)


def _ratio_rows(results) -> list[dict]:
    rows = []
    for r in results:
        if r["engine"] == "ours" or r.get("scenario"):
            continue
        ours = _get(results, "ours", r["context"])
        if not ours or "error" in ours:
            continue
        row = {"vs": r["engine"], "context": r["context"]}
        if "error" in r:
            row["error"] = r["error"]
        if r.get("prefill_tok_s") and ours.get("prefill_tok_s"):
            row["prefill_speedup"] = ours["prefill_tok_s"] / r["prefill_tok_s"]
        if r.get("decode_ms") and ours.get("decode_ms"):
            row["decode_speedup"] = r["decode_ms"] / ours["decode_ms"]
        if r.get("peak_rss_mib") and ours.get("peak_rss_mib") and "error" not in r:   # a failed run's peak says little
            row["peak_rss_ratio"] = ours["peak_rss_mib"] / r["peak_rss_mib"]
        if r.get("decode_aten_ops") and ours.get("decode_aten_ops"):
            row["aten_ops_ratio"] = r["decode_aten_ops"] / ours["decode_aten_ops"]
        rows.append(row)
    return rows


def evaluate_targets(report: dict) -> list[dict]:
    res, out = report["results"], []

    def add(name, value, ok, detail):
        out.append({"target": name, "value": value, "met": ok, "detail": detail})

    hf = lambda n: _get(res, "transformers", n)  # noqa: E731
    ours = lambda n: _get(res, "ours", n)  # noqa: E731
    if hf(4096) and ours(4096) and hf(4096).get("prefill_tok_s") and ours(4096).get("prefill_tok_s"):
        v = ours(4096)["prefill_tok_s"] / hf(4096)["prefill_tok_s"]
        add("prefill 4K vs transformers >= 5x", v, v >= 5, f"{v:.1f}x")
    if hf(8192) and ours(8192) and hf(8192).get("decode_ms") and ours(8192).get("decode_ms"):
        v = hf(8192)["decode_ms"] / ours(8192)["decode_ms"]
        ops = (f" (torch ops per step: transformers {hf(8192)['decode_aten_ops']:,.0f}, ours "
               f"{ours(8192)['decode_aten_ops']:,.0f})" if hf(8192).get("decode_aten_ops") and
               ours(8192).get("decode_aten_ops") else "")
        add("decode at 8K vs transformers >= 5x", v, v >= 5, f"{v:.1f}x{ops}")
    if hf(16384) and ours(16384) and ours(16384).get("peak_rss_mib"):
        h, name = hf(16384), "peak memory of a 16K prefill <= 1/4 of transformers'"
        if "error" in h and h.get("oom") is True:       # only its own allocation failure says it needs more
            lim = 1024 * report["args"]["hf_mem_limit"]
            v = ours(16384)["peak_rss_mib"] / lim
            add(name, v, v <= 0.25,
                f"transformers ran out of memory ({h['error'][:60]}); ours {ours(16384)['peak_rss_mib']:.0f} MiB "
                f"vs its {lim:.0f} MiB limit: ratio <= {v:.3f}")
        elif "error" in h:
            add(name, None, None, f"not measured: transformers failed, not for lack of memory ({h['error'][:80]})")
        elif h.get("peak_rss_mib"):
            v = ours(16384)["peak_rss_mib"] / h["peak_rss_mib"]
            add(name, v, v <= 0.25, f"ratio {v:.3f}")
    ok = sorted((r for r in res if r["engine"] == "ours" and r.get("decode_ms") and not r.get("scenario")),
                key=lambda r: r["context"])
    if len(ok) >= 2 and ok[-1]["context"] >= 16 * ok[0]["context"]:
        v = ok[-1]["decode_ms"] / ok[0]["decode_ms"]
        add(f"decode at {ok[-1]['context']:,} <= 2x decode at {ok[0]['context']:,}", v, v <= 2, f"{v:.2f}x")
    st = [r for r in ok if r.get("state_bytes") and r.get("planned_state_bytes")]
    if len(st) >= 2:
        a, b = st[0], st[-1]
        grow = (b["state_bytes"] - a["state_bytes"]) / (b["context"] - a["context"])
        plan = (b["planned_state_bytes"] - a["planned_state_bytes"]) / (b["context"] - a["context"])
        v = abs(grow / plan - 1)
        add("measured state bytes per token = planner within 1%", v, v <= 0.01,
            f"measured {grow:.2f} B/token, planned {plan:.2f} B/token")
    for r in res:
        if r["engine"] == "onnx" and "error" not in r and ours(r["context"]):
            o = ours(r["context"])
            if r.get("prefill_tok_s") and o.get("prefill_tok_s") and r.get("decode_ms") and o.get("decode_ms"):
                v = min(r["prefill_tok_s"] / o["prefill_tok_s"], o["decode_ms"] / r["decode_ms"])
                add(f"ONNX Runtime no slower than torch at {r['context']:,}", v, v >= 1,
                    f"prefill {r['prefill_tok_s'] / o['prefill_tok_s']:.2f}x, decode {o['decode_ms'] / r['decode_ms']:.2f}x "
                    "of torch's speed")
    bw = report.get("bandwidth", {})
    if "fraction_of_read" in bw:
        v = bw["fraction_of_read"]
        add(">= 200 MB active decode reaches >= 50% of memory bandwidth", v, v >= 0.5,
            f"{bw['active_weight_bytes'] / 1e6:.0f} MB/token in {bw['decode_ms']:.1f} ms = {bw['decode_gbps']:.1f} GB/s "
            f"of {bw['read_gbps']:.1f} GB/s measured")
    return out


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, {m['date']}",
             f"{'engine':<13}{'context':>8}  {'prefill tok/s':>13} {'[min-max s]':>15}  {'decode ms':>9} "
             f"{'[p10-p90]':>13}  {'state MiB':>9} {'plan MiB':>8} {'peak RSS MiB':>12}  note"]
    for r in report["results"]:
        name = r["engine"] + ("/bw" if r.get("scenario") else "")
        if "error" in r:
            lines.append(f"{name:<13}{r['context']:>8}  error: {r['error']}")
            continue
        pf = f"{r['prefill_tok_s']:>13,.0f} [{r['prefill_min_s']:6.2f}-{r['prefill_max_s']:6.2f}]" \
            if r.get("prefill_tok_s") else f"{'-':>13} {'':>15}"
        dc = f"{r['decode_ms']:>9.2f} [{r['decode_p10_ms']:5.2f}-{r['decode_p90_ms']:5.2f}]"
        plan = f"{r['planned_state_bytes'] / 2 ** 20:>8.2f}" if r.get("planned_state_bytes") else f"{'-':>8}"
        note = (f"threads {r.get('threads')}" + (f", {r['decode_aten_ops']:,.0f} ops/step" if r.get("decode_aten_ops")
                                                   else "") + (", state filled at random" if r.get("filled") else ""))
        lines.append(f"{name:<13}{r['context']:>8}  {pf}  {dc}  {r['state_bytes'] / 2 ** 20:>9.2f} {plan} "
                     f"{r['peak_rss_mib']:>12.0f}  {note}")
    ratios = _ratio_rows(report["results"])
    if ratios:
        lines.append("ours vs other engines (speedup = how many times faster ours is; memory = ours / theirs; "
                     "aten_ops_ratio = their torch ops per decode step / ours):")
        for q in ratios:
            parts = [f"{k} {q[k]:.2f}" for k in ("prefill_speedup", "decode_speedup", "peak_rss_ratio",
                                                 "aten_ops_ratio") if k in q]
            lines.append(f"  vs {q['vs']:<13}@ {q['context']:>7,}: " + (", ".join(parts) or q.get("error", "")[:80]))
    if "bandwidth" in report:
        b = report["bandwidth"]
        lines.append(f"memory bandwidth ({b.get('device', 'cpu')}): read {b['read_gbps']:.1f} GB/s, copy "
                     f"{b['copy_gbps']:.1f} GB/s ({b['threads']} threads)")
    for t in report.get("targets", []):
        verdict = "not measured" if t["met"] is None else "met" if t["met"] else "NOT met"
        lines.append(f"  [{verdict}] {t['target']}: {t['detail']}")
    return "\n".join(lines)
