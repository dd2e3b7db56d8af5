/* fedpilot dashboard: small hand-written SVG line charts (no library).
 *
 * fedpilot.lineChart(svg, {
 *   xMax: 8,                       // last round of the job (the x axis spans 1..xMax)
 *   yMin: 0, yMax: 1,              // optional; otherwise from the data, padded
 *   yFormat: (v) => string,        // values in tooltips
 *   tickFormat: (v) => string,     // optional; y tick labels (default: decimals of the step)
 *   empty: "No evaluated round yet",
 *   series: [{key, label, color, dash, points: [{x, y}]}],
 * }) -> number of points drawn (also in svg.dataset.points)
 */
(function () {
  "use strict";

  const FP = (window.fedpilot = window.fedpilot || {});
  const NS = "http://www.w3.org/2000/svg";
  const MARGIN = { left: 52, right: 14, top: 14, bottom: 36 };

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** A tick step near (hi - lo) / count: 1, 2, 2.5 or 5 times a power of ten. */
  function niceStep(lo, hi, count) {
    const raw = (hi - lo) / Math.max(1, count);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    return [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  }

  /** The y domain: fixed when given, else the data widened to whole tick steps. */
  function domainY(series, opts) {
    const ys = [];
    for (const s of series) for (const p of s.points) ys.push(p.y);
    let lo = opts.yMin;
    let hi = opts.yMax;
    const fixed = lo !== undefined && hi !== undefined;
    if (!fixed) {
      const min = ys.length ? Math.min(...ys) : 0;
      const max = ys.length ? Math.max(...ys) : 1;
      const pad = (max - min) * 0.08 || Math.abs(max) * 0.05 || 1;
      if (lo === undefined) lo = min >= 0 ? Math.max(0, min - pad) : min - pad;
      if (hi === undefined) hi = max + pad;
    }
    const step = niceStep(lo, hi, 4);
    if (!fixed) {
      lo = Math.floor(lo / step + 1e-9) * step;
      hi = Math.ceil(hi / step - 1e-9) * step;
    }
    const ticks = [];
    for (let i = 0, v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-6 && i < 50; i += 1, v += step) {
      ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    let decimals = 0;
    while (decimals < 8 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6) decimals += 1;
    return { lo, hi, ticks, decimals };
  }

  FP.lineChart = function (svg, opts) {
    const box = svg.viewBox.baseVal;
    const width = box && box.width ? box.width : 560;
    const height = box && box.height ? box.height : 240;
    const plotW = width - MARGIN.left - MARGIN.right;
    const plotH = height - MARGIN.top - MARGIN.bottom;
    const series = opts.series.map((s) => ({
      ...s,
      points: s.points.filter((p) => p.y !== null && p.y !== undefined && isFinite(p.y)),
    }));
    const fmt = opts.yFormat || ((v) => String(v));
    const total = series.reduce((n, s) => n + s.points.length, 0);

    const key = JSON.stringify([opts.xMax, series.map((s) => s.points)]);
    if (svg.dataset.renderKey === key) return total;
    svg.dataset.renderKey = key;

    const xLo = 1;
    const xHi = Math.max(2, opts.xMax || 1);
    const y = domainY(series, opts);
    const tickFmt = opts.tickFormat || ((v) => v.toFixed(y.decimals));
    const sx = (x) => MARGIN.left + ((x - xLo) / (xHi - xLo)) * plotW;
    const sy = (v) => MARGIN.top + plotH - ((v - y.lo) / (y.hi - y.lo || 1)) * plotH;

    const nodes = [];
    const grid = svgEl("g", { class: "grid" });
    for (const t of y.ticks) {
      grid.append(svgEl("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: sy(t), y2: sy(t) }));
      grid.append(svgEl("text", { x: MARGIN.left - 8, y: sy(t), class: "tick y", "dominant-baseline": "middle", "text-anchor": "end" }, tickFmt(t)));
    }
    const xStep = Math.max(1, Math.ceil((xHi - xLo + 1) / 12));
    for (let r = xLo; r <= xHi; r += xStep) {
      grid.append(svgEl("line", { x1: sx(r), x2: sx(r), y1: MARGIN.top + plotH, y2: MARGIN.top + plotH + 4, class: "tickmark" }));
      grid.append(svgEl("text", { x: sx(r), y: MARGIN.top + plotH + 16, class: "tick x", "text-anchor": "middle" }, String(r)));
    }
    grid.append(svgEl("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH, class: "axis" }));
    grid.append(svgEl("text", { x: MARGIN.left + plotW / 2, y: height - 4, class: "axis-label", "text-anchor": "middle" }, "round"));
    nodes.push(grid);

    for (const s of series) {
      const g = svgEl("g", { class: "series", "data-series": s.key, "data-points": s.points.length });
      const sorted = [...s.points].sort((a, b) => a.x - b.x);
      if (sorted.length > 1) {
        const d = sorted.map((p, i) => (i ? "L" : "M") + sx(p.x).toFixed(1) + " " + sy(p.y).toFixed(1)).join(" ");
        g.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2.25, "stroke-dasharray": s.dash || null, "stroke-linejoin": "round", "stroke-linecap": "round" }));
      }
      for (const p of sorted) {
        const dot = svgEl("circle", { cx: sx(p.x), cy: sy(p.y), r: 4, fill: s.color, class: "pt", "data-round": p.x, "data-value": p.y });
        dot.append(svgEl("title", {}, "Round " + p.x + ": " + s.label + " " + fmt(p.y)));
        g.append(dot);
      }
      nodes.push(g);
    }

    if (!total) {
      nodes.push(svgEl("text", { x: MARGIN.left + plotW / 2, y: MARGIN.top + plotH / 2, class: "empty-text", "text-anchor": "middle" }, opts.empty || "No data yet"));
    }
    svg.replaceChildren(...nodes);
    svg.dataset.points = String(total);
    return total;
  };

  /** A legend with each series' newest value, into `node` (a <p>). */
  FP.legend = function (node, series, fmt) {
    const items = series.map((s) => {
      const pts = s.points.filter((p) => p.y !== null && p.y !== undefined);
      const last = pts.length ? pts[pts.length - 1] : null;
      const swatch = FP.el("span", { class: "line-swatch" + (s.dash ? " dashed" : ""), "aria-hidden": "true" });
      swatch.style.borderColor = s.color;
      return FP.el(
        "span",
        { class: "legend-item", dataset: { series: s.key } },
        swatch,
        s.label + ": ",
        FP.el("strong", { text: last ? fmt(last.y) : "–" }),
        last ? FP.el("span", { class: "muted", text: " (round " + last.x + ")" }) : null,
      );
    });
    const key = JSON.stringify(items.map((i) => i.textContent));
    FP.replace(node, key, () => items);
  };
})();
