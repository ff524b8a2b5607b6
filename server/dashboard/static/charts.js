// Small SVG charts, bundled so the dashboard works with no internet access: a line chart with optional
// threshold lines, and a heatmap. Values are plain arrays; no library.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#2d5bd7", "#c0392b", "#1f8a4c", "#b7791f", "#7b3fb5", "#16828f", "#d35400", "#555"];

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function fmtNum(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.001 || a >= 100000)) return v.toExponential(2);
  return Number(v.toPrecision(3)).toString();
}

// series: [{name, points: [[x, y], ...]}]; thresholds: [{name, value}]; xLabel(x) formats the axis ends.
function lineChart(title, series, opts) {
  opts = opts || {};
  const w = opts.width || 420, h = opts.height || 180, pad = {l: 46, r: 10, t: 8, b: 22};
  const box = document.createElement("div");
  box.className = "chart";
  box.dataset.chart = title;
  box.appendChild(Object.assign(document.createElement("div"), {className: "title", textContent: title}));
  const svg = svgEl("svg", {width: w, height: h, role: "img", "aria-label": title});
  const pts = series.flatMap(s => s.points.filter(p => p[1] !== null && p[1] !== undefined));
  const thresholds = opts.thresholds || [];
  if (!pts.length) {
    svg.appendChild(svgEl("text", {x: w / 2, y: h / 2, "text-anchor": "middle", fill: "#6b7383"}, "no data yet"));
    box.appendChild(svg);
    return box;
  }
  const xs = pts.map(p => p[0]);
  const ys = pts.map(p => p[1]).concat(thresholds.map(t => t.value));
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y1 = y0 + 1; }
  y1 += (y1 - y0) * 0.05;
  const sx = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const sy = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  svg.appendChild(svgEl("line", {x1: pad.l, y1: h - pad.b, x2: w - pad.r, y2: h - pad.b, stroke: "#bbb"}));
  svg.appendChild(svgEl("line", {x1: pad.l, y1: pad.t, x2: pad.l, y2: h - pad.b, stroke: "#bbb"}));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.appendChild(svgEl("text", {x: pad.l - 4, y: sy(y) + 4, "text-anchor": "end", "font-size": 10, fill: "#6b7383"}, fmtNum(y)));
  }
  const xl = opts.xLabel || fmtNum;
  svg.appendChild(svgEl("text", {x: pad.l, y: h - 6, "font-size": 10, fill: "#6b7383"}, xl(x0)));
  svg.appendChild(svgEl("text", {x: w - pad.r, y: h - 6, "text-anchor": "end", "font-size": 10, fill: "#6b7383"}, xl(x1)));
  thresholds.forEach(t => {
    svg.appendChild(svgEl("line", {x1: pad.l, x2: w - pad.r, y1: sy(t.value), y2: sy(t.value), stroke: "#c0392b",
      "stroke-dasharray": "5 4", class: "threshold"}));
    svg.appendChild(svgEl("text", {x: w - pad.r - 2, y: sy(t.value) - 3, "text-anchor": "end", "font-size": 10,
      fill: "#c0392b"}, `${t.name} ${fmtNum(t.value)}`));
  });
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const good = s.points.filter(p => p[1] !== null && p[1] !== undefined);
    if (good.length > 1) {
      const d = good.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      svg.appendChild(svgEl("path", {d, fill: "none", stroke: color, "stroke-width": 2}));
    }
    good.forEach(p => svg.appendChild(svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color},
      undefined)).appendChild(svgEl("title", {}, `${s.name}: ${fmtNum(p[1])}`)));
  });
  box.appendChild(svg);
  if (series.length > 1 || opts.legend) {
    const legend = document.createElement("div");
    legend.className = "title";
    legend.innerHTML = series.map((s, i) =>
      `<span style="color:${s.color || PALETTE[i % PALETTE.length]}">■</span> ${escapeHtml(s.name)}`).join(" &nbsp; ");
    box.appendChild(legend);
  }
  return box;
}

// rows: labels (features); cols: x labels; values[r][c] (null: no data). Colour from white (0) to red (>= max).
function heatmap(title, rows, cols, values, opts) {
  opts = opts || {};
  const max = opts.max || 0.25, padL = 40, padT = 4;
  const cw = Math.max(6, Math.min(24, Math.floor(480 / Math.max(1, cols.length))));
  const ch = Math.max(4, Math.min(14, Math.floor(320 / Math.max(1, rows.length))));
  const w = padL + cols.length * cw + 4, h = padT + rows.length * ch + 20;
  const box = document.createElement("div");
  box.className = "chart";
  box.dataset.chart = title;
  box.appendChild(Object.assign(document.createElement("div"), {className: "title", textContent: title}));
  const svg = svgEl("svg", {width: w, height: h, role: "img", "aria-label": title});
  rows.forEach((r, i) => {
    if (rows.length <= 16 || i % Math.ceil(rows.length / 16) === 0) {
      svg.appendChild(svgEl("text", {x: padL - 3, y: padT + i * ch + ch - 1, "text-anchor": "end", "font-size": 9,
        fill: "#6b7383"}, r));
    }
    cols.forEach((c, j) => {
      const v = values[i][j];
      const t = v === null || v === undefined ? null : Math.min(1, v / max);
      const fill = t === null ? "#f0f0f0" : `rgb(255,${Math.round(255 * (1 - t))},${Math.round(255 * (1 - t))})`;
      const rect = svgEl("rect", {x: padL + j * cw, y: padT + i * ch, width: cw - 1, height: Math.max(1, ch - 1), fill});
      rect.appendChild(svgEl("title", {}, `${r} @ ${c}: PSI ${fmtNum(v)}`));
      svg.appendChild(rect);
    });
  });
  if (cols.length) {
    svg.appendChild(svgEl("text", {x: padL, y: h - 4, "font-size": 10, fill: "#6b7383"}, cols[0]));
    svg.appendChild(svgEl("text", {x: w - 4, y: h - 4, "text-anchor": "end", "font-size": 10, fill: "#6b7383"},
      cols[cols.length - 1]));
  }
  box.appendChild(svg);
  return box;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
