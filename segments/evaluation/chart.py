"""The admin's two charts of the last verdict, as inline SVG (no script, no library):

- `slices`: recall@10 before -> after, for each judged set and each slice: the old side's dot, a line
  to the new side's, red where the new side falls by more than the tolerance;
- `curve`: latency against accuracy: each side's search p95 (ms) against its index's recall@10, one
  point per ef_search.

Both take record.last_verdict's summary; every label is escaped (format_html).
"""
from django.utils.html import format_html, mark_safe

WIDTH, LABEL, ROW = 680, 300, 22
OLD_COLOUR, NEW_COLOUR, FALL_COLOUR = "#8a8a8a", "#2f7d32", "#c62828"


def _n(value):
    return f"{value:.1f}"


def _x(value, left, width):
    return _n(left + width * max(0.0, min(1.0, value)))


def _svg(height, label, parts):
    head = format_html('<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" role="img" aria-label="{}" '
                       'font-size="11">', WIDTH, _n(height), label)
    return mark_safe(head + "".join(parts) + "</svg>")


def slices(summary, tolerance):
    """SVG of recall@10 old -> new for each judged set and each slice (None without figures)."""
    rows = [(f"{entry['set']} (n={entry['n']})", entry["old"], entry["new"]) for entry in summary["judged"]]
    rows += [(f"{entry['label']} (n={entry['n']})", entry["old"], entry["new"]) for entry in summary["slices"]]
    rows = [row for row in rows if row[1] is not None and row[2] is not None]
    if not rows:
        return None
    plot, height = WIDTH - LABEL - 20, ROW * len(rows) + 30
    parts = [format_html('<line x1="{0}" y1="4" x2="{0}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" '
                         'text-anchor="middle" fill="#666">{3}</text>', _x(tick, LABEL, plot), height - 18, height - 6,
                         f"{tick:g}") for tick in (0, 0.25, 0.5, 0.75, 1.0)]
    for number, (label, old, new) in enumerate(rows):
        y = 14 + ROW * number
        colour = FALL_COLOUR if new < old - tolerance else NEW_COLOUR
        parts.append(format_html(
            '<text x="{0}" y="{1}" text-anchor="end">{2}</text>'
            '<line x1="{3}" y1="{4}" x2="{5}" y2="{4}" stroke="{6}" stroke-width="2"/>'
            '<circle cx="{3}" cy="{4}" r="4" fill="{7}"><title>before: {8}</title></circle>'
            '<circle cx="{5}" cy="{4}" r="5" fill="{6}"><title>after: {9}</title></circle>',
            LABEL - 8, y + 4, label[:52], _x(old, LABEL, plot), y, _x(new, LABEL, plot), colour, OLD_COLOUR,
            f"{old:.3f}", f"{new:.3f}"))
    return _svg(height, "recall@10 before and after, per slice", parts)


def curve(summary):
    """SVG of search p95 (ms) against the index's recall@10 for each side (None without points)."""
    sides = {label: sorted((p for p in points if p["p95_ms"] is not None and p["recall_at_10"] is not None),
                           key=lambda p: p["ef_search"]) for label, points in summary["curves"].items()}
    points = [p for found in sides.values() for p in found]
    if not points:
        return None
    most = max(p["p95_ms"] for p in points) * 1.1 or 1.0
    low = min(0.9, min(p["recall_at_10"] for p in points) - 0.02)
    left, width, top, height = 50, WIDTH - 80, 10, 180

    def xy(p):
        return _n(left + width * p["p95_ms"] / most), _n(top + height * (1 - (p["recall_at_10"] - low) / (1 - low)))

    parts = [format_html('<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#999"/>'
                         '<text x="{0}" y="{3}" fill="#666">0</text>'
                         '<text x="{2}" y="{3}" text-anchor="end" fill="#666">{4} ms (search p95)</text>'
                         '<text x="{5}" y="{1}" text-anchor="end" fill="#666">{6}</text>'
                         '<text x="{5}" y="{7}" text-anchor="end" fill="#666">1.00</text>',
                         left, top + height, left + width, top + height + 14, _n(most), left - 4, f"{low:.2f}",
                         top + 8)]
    for label, colour in (("old", OLD_COLOUR), ("new", NEW_COLOUR)):
        found = sides.get(label, [])
        if len(found) > 1:
            parts.append(format_html('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>', colour,
                                     " ".join(",".join(xy(p)) for p in found)))
        for p in found:
            x, y = xy(p)
            parts.append(format_html('<circle cx="{}" cy="{}" r="4" fill="{}"><title>{} model, ef_search {}: '
                                     'p95 {} ms, index recall@10 {}</title></circle>'
                                     '<text x="{}" y="{}" fill="{}">{}</text>',
                                     x, y, colour, label, p["ef_search"], p["p95_ms"], f"{p['recall_at_10']:.3f}",
                                     _n(float(x) + 5), _n(float(y) - 5), colour, p["ef_search"]))
    return _svg(height + 30, "search latency against the index's recall, per ef_search", parts)


LEGEND = mark_safe(f'<span style="color:{OLD_COLOUR}">●</span> old model &nbsp; '
                   f'<span style="color:{NEW_COLOUR}">●</span> new model &nbsp; '
                   f'<span style="color:{FALL_COLOUR}">●</span> a fall beyond the tolerance')


def panel(summary, tolerance):
    """What the admin's "Embedding switch" page shows of the last verdict (None when there is none)."""
    if summary is None:
        return None
    from segments.switch.status import human_duration

    tone = {"GO": "ok", "NO-GO": "bad"}.get(summary["verdict"], "warn")
    return {"verdict": summary["verdict"], "tone": tone, "mode": summary["mode"], "reasons": summary["reasons"],
            "age": human_duration(summary["age_seconds"]), "by": summary.get("by"),
            "slices": slices(summary, tolerance), "curve": curve(summary), "legend": LEGEND}
