// The dashboard's charts, drawn by uPlot (vendored in static/vendor/uplot, served by the dashboard itself; no CDN):
// time axes with real ticks, drag-to-zoom, one time range shared by the charts of a page (zoom one, the others
// follow; a double click goes back to the page's range), legends, threshold lines read from what the page was given
// (a rollout's gates, the policy), vertical markers (waves, decisions) and heatmaps with a colour scale on the same
// time axis as the line charts. Each chart's box carries data-x-min / data-x-max (its range now) and data-x-ticks
// (the tick labels last drawn) for the browser tests.
"use strict";

const PALETTE = ["#2d5bd7", "#c0392b", "#1f8a4c", "#b7791f", "#7b3fb5", "#16828f", "#d35400", "#555"];
// Steps between time ticks (ms): seconds to days, so a short bake still gets several labelled ticks.
const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800]
  .map(s => s * 1000);
const chartGroups = new Map(); // group name → {range: [min, max], charts: [uPlot]}
// The range a person zoomed a group to, per page: kept when a live update redraws the page, dropped on double-click.
const zooms = new Map();

function fmtNum(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.001 || a >= 100000)) return v.toExponential(2);
  return Number(v.toPrecision(3)).toString();
}

// Destroy the previous page's charts (a page redraw replaces them all).
function resetCharts() {
  for (const g of chartGroups.values()) g.charts.forEach(u => u.destroy());
  chartGroups.clear();
}

function group(name, range) {
  if (!chartGroups.has(name)) chartGroups.set(name, {range, key: `${location.hash}|${name}`, charts: [], syncing: false});
  return chartGroups.get(name);
}

const pad2 = n => String(n).padStart(2, "0");
// Tick labels for a time axis in milliseconds: the finer the step between ticks, the more of the time shown.
function timeTicks(splits, incr) {
  return splits.map(ms => {
    const d = new Date(ms);
    const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
    if (incr < 60_000) return `${hm}:${pad2(d.getSeconds())}`;
    if (incr < 86_400_000) return hm;
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
  });
}

function chartBox(title, opts) {
  const box = document.createElement("div");
  box.className = "chart" + (opts.fired ? " fired" : "");
  box.dataset.chart = opts.name || title;
  const head = document.createElement("div");
  head.className = "title";
  head.textContent = title + (opts.fired ? " — this gate fired" : "");
  box.appendChild(head);
  return box;
}

function recordRange(u, box) {
  box.dataset.xMin = String(Math.round(u.scales.x.min));
  box.dataset.xMax = String(Math.round(u.scales.x.max));
}

// The x-axis, zoom and sync settings every chart of a group shares. A chart starts at the group's range (or the
// zoom kept for this page); a drag zooms it and every chart of its group; a double-click goes back to the range.
function sharedX(box, g, time) {
  const show = (u, range) => {
    g.syncing = true;
    for (const c of [u, ...g.charts.filter(c => c !== u)]) c.setScale("x", {min: range[0], max: range[1]});
    g.syncing = false;
  };
  return {
    axis: {
      stroke: "#6b7383",
      grid: {stroke: "#eef0f4"},
      // at least one label ("21:23:24" is about 55 px in uPlot's 12 px font) and a gap between ticks: labels never
      // touch, however wide the chart
      space: time ? 70 : 48,
      incrs: time ? TIME_INCRS : [1, 2, 5, 10, 20, 50, 100],
      values: (u, splits, axisIdx, space, incr) => {
        const labels = time ? timeTicks(splits, incr) : splits.map(v => fmtNum(v));
        box.dataset.xTicks = labels.join("|");
        return labels;
      },
    },
    // Not ranged over the data: a range asked for (a drag's zoom, the group's sync, a double-click's reset) is
    // kept as asked; with none (the first draw, new data) it is the zoom kept for this page or the group's range.
    // (uPlot passes every x range, a drag's included, through this function: ignoring its arguments would undo
    // every zoom.)
    scale: {
      time,
      auto: false,
      range: (u, min, max) => (min === null || max === null || min === undefined || max === undefined || !(max > min)
        ? (zooms.get(g.key) || g.range).slice() : [min, max]),
    },
    cursor: {drag: {x: true, y: false, setScale: true}, bind: {dblclick: () => null}},
    hooks: {
      // uPlot's first draw ranges x over the data unless a range is pending when it starts: set one here.
      init: [u => {
        const view = zooms.get(g.key) || g.range;
        u.setScale("x", {min: view[0], max: view[1]});
      }],
      setScale: [(u, key) => {
        if (key !== "x") return;
        recordRange(u, box);
        if (g.syncing || !u.fedfleetDragging) return; // only a person's drag zooms the group
        u.fedfleetDragging = false;
        const range = [u.scales.x.min, u.scales.x.max];
        zooms.set(g.key, range);
        show(u, range);
      }],
    },
    start(u) {
      g.charts.push(u);
      u.over.addEventListener("dblclick", () => { zooms.delete(g.key); show(u, g.range); });
      // uPlot zooms on the mouseup that ends a drag begun here; the flag outlives that event's scale change only
      u.over.addEventListener("mousedown", () => {
        u.fedfleetDragging = true;
        document.addEventListener("mouseup", () => setTimeout(() => { u.fedfleetDragging = false; }), {once: true});
      });
      recordRange(u, box);
    },
  };
}

// Horizontal threshold lines and vertical markers, drawn over the plot.
function drawOverlays(u, thresholds, markers) {
  const ctx = u.ctx, {left, top, width, height} = u.bbox, px = devicePixelRatio || 1;
  ctx.save();
  ctx.font = `${10 * px}px system-ui, sans-serif`;
  for (const t of thresholds) {
    const y = u.valToPos(t.value, "y", true);
    if (y < top || y > top + height) continue;
    ctx.strokeStyle = t.color || "#c0392b";
    ctx.setLineDash([5 * px, 4 * px]);
    ctx.lineWidth = px;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + width, y); ctx.stroke();
    ctx.fillStyle = t.color || "#c0392b";
    ctx.textAlign = "right";
    ctx.fillText(t.name, left + width - 4 * px, y - 5 * px);
  }
  markers.forEach((m, i) => {
    const x = u.valToPos(m.at, "x", true);
    if (x < left || x > left + width) return;
    ctx.strokeStyle = m.color || "#8a93a5";
    ctx.setLineDash(m.color ? [] : [2 * px, 3 * px]);
    ctx.lineWidth = px;
    ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    ctx.fillStyle = m.color || "#5b6475";
    // right of its line, or left of it when the label would run past the plot's right edge
    const right = x + 3 * px + ctx.measureText(m.label).width <= left + width;
    ctx.textAlign = right ? "left" : "right";
    ctx.fillText(m.label, right ? x + 3 * px : x - 3 * px, top + (11 + 11 * (i % 3)) * px);
  });
  ctx.restore();
}

// A line chart over time (or over rounds with opts.time = false).
// series: [{name, points: [[x, y], ...], color?}]; opts: {group, range: [x0, x1], thresholds: [{name, value}],
// markers: [{at, label, color?}], width, height, fired, time (default true), note}
function lineChart(title, series, opts) {
  opts = opts || {};
  const time = opts.time !== false;
  const box = chartBox(title, opts);
  const xs = series.flatMap(s => s.points.map(p => p[0]));
  const ys = series.flatMap(s => s.points.map(p => p[1])).filter(v => v !== null && v !== undefined && !Number.isNaN(v));
  if (!ys.length) {
    box.appendChild(Object.assign(document.createElement("p"), {className: "muted empty", textContent: "no data yet"}));
    return box;
  }
  const range = opts.range || [Math.min(...xs), Math.max(...xs)];
  if (range[0] === range[1]) range[1] = range[0] + (time ? 60_000 : 1);
  const g = group(opts.group || title, range);
  const thresholds = opts.thresholds || [];
  const shared = sharedX(box, g, time);
  const aligned = uPlot.join(series.map(s => [s.points.map(p => p[0]), s.points.map(p => p[1])]));
  const u = new uPlot({
    width: opts.width || 420,
    height: opts.height || 200,
    ms: 1,
    scales: {
      x: shared.scale,
      y: {range: (u, min, max) => {
        const vals = [min, max, 0, ...thresholds.map(t => t.value)].filter(v => v !== null && Number.isFinite(v));
        let lo = Math.min(...vals), hi = Math.max(...vals);
        if (hi === lo) hi = lo + 1;
        return [lo, hi + (hi - lo) * 0.08];
      }},
    },
    axes: [shared.axis, {stroke: "#6b7383", size: 52, grid: {stroke: "#eef0f4"}, values: (u, vals) => vals.map(fmtNum)}],
    series: [
      {label: time ? "time" : "round", value: (u, v) => v === null ? "–" : (time ? new Date(v).toLocaleTimeString() : `round ${v}`)},
      ...series.map((s, i) => ({
        label: s.name, stroke: s.color || PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
        points: {show: true, size: 5}, value: (u, v) => fmtNum(v),
      })),
    ],
    cursor: shared.cursor,
    legend: {show: true, live: true},
    hooks: {...shared.hooks, draw: [u => drawOverlays(u, thresholds, opts.markers || [])]},
  }, aligned, box);
  shared.start(u);
  if (opts.note) box.appendChild(Object.assign(document.createElement("div"), {className: "note muted", textContent: opts.note}));
  return box;
}

// Colour for a PSI value: white at 0 through amber to red at `max` (and beyond); grey for no data.
function heatColour(v, max) {
  if (v === null || v === undefined || Number.isNaN(v)) return "#eceef2";
  const t = Math.max(0, Math.min(1, v / max));
  const stops = [[255, 255, 255], [253, 204, 92], [214, 96, 40], [150, 20, 30]];
  const f = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(f)), w = f - i;
  const c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * w));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// A heatmap over time: rows (features) × time cells [at - cell/2, at + cell/2], on the group's shared time axis,
// with a colour scale from 0 to `max` (the threshold's multiple) under it.
// cells: [{at, values: [per row]}]; opts: {group, range, cellMs, max, threshold, width, height}
function heatmap(title, rows, cells, opts) {
  opts = opts || {};
  const box = chartBox(title, opts);
  const max = opts.max || 0.5;
  const g = group(opts.group || title, opts.range);
  const shared = sharedX(box, g, true);
  const readout = Object.assign(document.createElement("div"), {className: "note muted readout", textContent: "hover a cell for its PSI"});
  const half = (opts.cellMs || 1000) / 2;
  const u = new uPlot({
    width: opts.width || 420,
    height: opts.height || 220,
    ms: 1,
    scales: {x: shared.scale, y: {auto: false, range: [0, rows.length]}},
    axes: [shared.axis, {
      stroke: "#6b7383", size: 52, grid: {show: false},
      splits: () => rows.map((_, i) => i + 0.5).filter((_, i) => rows.length <= 16 || i % Math.ceil(rows.length / 16) === 0),
      values: (u, splits) => splits.map(s => rows[Math.floor(s)]),
    }],
    series: [{}, {label: "PSI", show: true, stroke: "transparent", points: {show: false}}],
    legend: {show: false},
    cursor: {...shared.cursor, points: {show: false}},
    hooks: {
      ...shared.hooks,
      draw: [u => {
        const ctx = u.ctx;
        ctx.save();
        ctx.beginPath();
        ctx.rect(u.bbox.left, u.bbox.top, u.bbox.width, u.bbox.height);
        ctx.clip();
        for (const c of cells) {
          const x0 = u.valToPos(c.at - half, "x", true), x1 = u.valToPos(c.at + half, "x", true);
          c.values.forEach((v, r) => {
            const y0 = u.valToPos(r + 1, "y", true), y1 = u.valToPos(r, "y", true);
            ctx.fillStyle = heatColour(v, max);
            ctx.fillRect(x0, y0, Math.max(1, x1 - x0 - 1), Math.max(1, y1 - y0 - 0.5));
          });
        }
        ctx.restore();
      }],
      setCursor: [u => {
        const {left, top} = u.cursor;
        if (left === undefined || left < 0) return;
        const at = u.posToVal(left, "x"), r = Math.floor(u.posToVal(top, "y"));
        const c = cells.find(c => Math.abs(c.at - at) <= half);
        readout.textContent = c && r >= 0 && r < rows.length
          ? `${rows[r]} at ${new Date(c.at).toLocaleTimeString()}: PSI ${fmtNum(c.values[r])}` : "no data here";
      }],
    },
  }, [[g.range[0], g.range[1]], [null, null]], box);
  shared.start(u);
  box.appendChild(readout);
  box.appendChild(colourScale(max, opts.threshold));
  return box;
}

function colourScale(max, threshold) {
  const scale = document.createElement("div");
  scale.className = "colour-scale";
  const steps = Array.from({length: 11}, (_, i) => `${heatColour(max * i / 10, max)} ${i * 10}%`).join(", ");
  const ticks = [0, max / 4, max / 2, 3 * max / 4, max];
  scale.innerHTML = `<span class="muted">PSI</span><div class="ramp" style="background: linear-gradient(to right, ${steps})"></div>` +
    `<div class="ramp-ticks">${ticks.map(t => `<span>${fmtNum(t)}${t === max ? "+" : ""}</span>`).join("")}</div>` +
    (threshold !== undefined ? `<span class="muted">threshold ${fmtNum(threshold)} at the middle; no data: grey</span>` : "");
  return scale;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
