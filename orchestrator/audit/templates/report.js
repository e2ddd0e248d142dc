"use strict";
// The report page's timeline, table and task details, drawn from the JSON data block.
// Every string in that data came from a plan, an agent or a log: it only ever becomes a
// text node (textContent) or the value of an attribute named here (SAFE_ATTRS), never
// markup, an attribute name, a URL or code.
(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SAFE_ATTRS = new Set([
    "class", "title", "type", "id", "tabindex", "role", "colspan", "data-i", "data-key",
    "aria-sort", "aria-label", "aria-hidden", "x", "y", "width", "height", "x1", "y1",
    "x2", "y2", "d", "transform", "rx", "patternUnits",
  ]);
  const STATUSES = new Set(["succeeded", "cached", "failed", "timed_out", "cancelled", "skipped"]);
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const tasks = data.tasks;
  const PHASES = data.phases;
  const ROW = 16;
  const HEAD = 20;

  function setAttrs(el, attrs) {
    for (const name of Object.keys(attrs)) {
      if (!SAFE_ATTRS.has(name)) throw new Error("not an attribute this page sets: " + name);
      const value = attrs[name];
      if (value !== null && value !== undefined && value !== false) el.setAttribute(name, String(value));
    }
    return el;
  }
  function add(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      el.append(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    }
    return el;
  }
  function h(tag, attrs, ...children) {
    return add(setAttrs(document.createElement(tag), attrs || {}), children);
  }
  function s(tag, attrs, ...children) {
    return add(setAttrs(document.createElementNS(SVG_NS, tag), attrs || {}), children);
  }
  const statusClass = (status) => (STATUSES.has(status) ? "st-" + status : "st-unknown");
  const phaseClass = (index) => (PHASES[index] ? "ph-" + PHASES[index] : "ph-unknown");

  function fmtDur(sec) {
    if (sec === null || sec === undefined || !isFinite(sec)) return "";
    if (sec < 1) return (sec * 1000).toFixed(0) + " ms";
    if (sec < 60) return sec.toFixed(sec < 10 ? 2 : 1) + " s";
    const m = Math.floor(sec / 60);
    if (m < 60) return m + "m " + String(Math.floor(sec % 60)).padStart(2, "0") + "s";
    return Math.floor(m / 60) + "h " + String(m % 60).padStart(2, "0") + "m";
  }
  // A tick's time from the run's start (before it: a task queued by an earlier run).
  function fmtOffset(offset, step) {
    const sign = offset < -1e-9 ? "\u2212" : "";
    const sec = Math.abs(offset);
    if (step < 1) return sign + sec.toFixed(Math.min(3, Math.ceil(-Math.log10(step)))) + " s";
    const whole = Math.round(sec);
    if (whole < 60 && step < 60) return sign + whole + " s";
    const hours = Math.floor(whole / 3600);
    const minutes = Math.floor((whole % 3600) / 60);
    const mmss = String(minutes).padStart(hours ? 2 : 1, "0") + ":" + String(whole % 60).padStart(2, "0");
    return sign + (hours ? hours + ":" + mmss : mmss);
  }
  const t0ms = Date.parse(data.t0);
  const fmtWhen = (sec) => (sec === null || sec === undefined ? "" : new Date(t0ms + sec * 1000).toISOString().replace("T", " ").replace("Z", " UTC"));
  const numbers = new Intl.NumberFormat("en-US");
  const fmtInt = (n) => (n === null || n === undefined ? "" : numbers.format(n));
  const fmtCost = (c) => (c === null || c === undefined ? "" : "$" + Number(c).toFixed(c >= 1 ? 2 : 4));
  const waited = (t) => (t.q === null ? null : t.s - t.q);
  const took = (t) => t.e - t.s;
  // Skipped or cancelled before it started (or served from the cache): a point, not a bar.
  const neverStarted = (t) => t.ph.length === 0 && (t.tries === 0 || t.e - t.s < 0.002);

  // Who depends on whom: depends_on names tasks or whole matrix groups.
  const byId = new Map(tasks.map((t, i) => [t.id, i]));
  const members = new Map();
  tasks.forEach((t, i) => {
    if (t.group !== null) {
      if (!members.has(t.group)) members.set(t.group, []);
      members.get(t.group).push(i);
    }
  });
  const upstream = tasks.map((t) => {
    const found = new Set();
    for (const dep of t.deps) {
      if (byId.has(dep)) found.add(byId.get(dep));
      for (const j of members.get(dep) || []) found.add(j);
    }
    return [...found];
  });
  const downstream = tasks.map(() => []);
  upstream.forEach((ups, i) => ups.forEach((u) => downstream[u].push(i)));
  const siblings = (i) => (tasks[i].group === null ? [] : members.get(tasks[i].group).filter((j) => j !== i));

  const state = {
    groupBy: "agent",
    sortKey: null,
    sortDir: 1,
    selected: -1,
    focused: -1,
    view: [0, Math.max(data.end, 0.001)],
  };
  // The whole span drawn: from the earliest time of any task (0) to the latest.
  const full = () => [0, Math.max(data.end, 0.001)];

  // ---- the table ----
  const tbody = document.getElementById("task-rows");
  const haystacks = tasks.map((t) => [t.id, t.agent, t.branch || "", t.err ? t.err[0] + " " + t.err[1] : ""].join("\n").toLowerCase());
  const sortValue = {
    id: (t) => t.id,
    agent: (t) => t.agent,
    status: (t) => t.status,
    tries: (t) => t.tries,
    wait: waited,
    took,
    files: (t) => (t.files ? t.files.n : null),
    lines: (t) => (t.files ? t.files.add + t.files.del : null),
    tokens: (t) => (t.usage ? t.usage.total_tokens : null),
    cost: (t) => (t.usage ? t.usage.cost_usd : null),
    error: (t) => (t.err ? t.err[0] : null),
  };

  function truncCell(text, extra) {
    return h("td", { class: extra || null }, h("span", { class: "trunc", title: text }, text));
  }
  function buildRow(t, i) {
    const tr = h("tr", { "data-i": i, tabindex: 0 });
    const f = t.files;
    add(tr, [
      truncCell(t.id),
      truncCell(t.agent),
      h("td", {}, h("span", { class: "chip " + statusClass(t.status) }, t.status)),
      h("td", { class: "num" }, String(t.tries)),
      h("td", { class: "num" }, fmtDur(waited(t))),
      neverStarted(t) ? h("td", { class: "num", title: "never started" }, "\u2013") : h("td", { class: "num" }, fmtDur(took(t))),
      h("td", { class: "num" }, f ? String(f.n) : ""),
      h("td", { class: "num" }, f ? "+" + f.add + " \u2212" + f.del : ""),
      h("td", { class: "num" }, t.usage ? fmtInt(t.usage.total_tokens) : ""),
      h("td", { class: "num" }, t.usage ? fmtCost(t.usage.cost_usd) : ""),
      t.err ? h("td", { title: t.err[0] + ": " + t.err[1] }, t.err[0]) : h("td", {}),
    ]);
    return tr;
  }
  const rows = tasks.map(buildRow);
  add(tbody, rows);

  const agentSelect = document.getElementById("f-agent");
  const textInput = document.getElementById("f-text");
  const statusBoxes = [...document.querySelectorAll('#f-status input[name="status"]')];
  function visible(i) {
    const t = tasks[i];
    const shownStatuses = new Set(statusBoxes.filter((b) => b.checked).map((b) => b.value));
    if (!shownStatuses.has(t.status)) return false;
    if (agentSelect.value !== "" && t.agent !== agentSelect.value) return false;
    const text = textInput.value.trim().toLowerCase();
    return text === "" || haystacks[i].includes(text);
  }
  let shown = tasks.map(() => true);
  function applyFilters() {
    shown = tasks.map((_, i) => visible(i));
    let n = 0;
    rows.forEach((tr, i) => {
      tr.hidden = !shown[i];
      if (shown[i]) n += 1;
    });
    document.getElementById("shown").textContent = n + " of " + tasks.length + " task(s) shown";
    drawTimeline();
  }
  function compare(a, b) {
    const va = sortValue[state.sortKey](tasks[a]);
    const vb = sortValue[state.sortKey](tasks[b]);
    if (va === vb) return a - b;
    if (va === null || va === undefined) return 1;
    if (vb === null || vb === undefined) return -1;
    return (va < vb ? -1 : 1) * state.sortDir;
  }
  function applySort() {
    const order = tasks.map((_, i) => i);
    if (state.sortKey !== null) order.sort(compare);
    add(tbody, order.map((i) => rows[i]));
    for (const th of document.querySelectorAll("#tasks-table th")) {
      if (th.dataset.key === state.sortKey) setAttrs(th, { "aria-sort": state.sortDir > 0 ? "ascending" : "descending" });
      else th.removeAttribute("aria-sort");
    }
  }
  for (const th of document.querySelectorAll("#tasks-table th")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      if (!Object.hasOwn(sortValue, key)) return;
      state.sortDir = state.sortKey === key ? -state.sortDir : 1;
      state.sortKey = key;
      applySort();
    });
  }
  tbody.addEventListener("click", (event) => {
    const tr = event.target.closest("tr[data-i]");
    if (tr) select(Number(tr.dataset.i), true);
  });
  tbody.addEventListener("keydown", (event) => {
    const tr = event.target.closest("tr[data-i]");
    if (tr && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      select(Number(tr.dataset.i), true);
    }
  });
  let textTimer = 0;
  textInput.addEventListener("input", () => {
    clearTimeout(textTimer);
    textTimer = setTimeout(applyFilters, 120);
  });
  agentSelect.addEventListener("change", applyFilters);
  statusBoxes.forEach((b) => b.addEventListener("change", applyFilters));

  // ---- the timeline ----
  const labels = document.getElementById("tl-labels");
  const chart = document.getElementById("tl-chart");
  const axis = document.getElementById("tl-axis");
  let bars = [];
  let drawn = [];
  let layers = null;
  let height = 0;

  function lanes() {
    const groups = new Map();
    const put = (key, label, i) => {
      if (!groups.has(key)) groups.set(key, { label, items: [] });
      groups.get(key).items.push(i);
    };
    const order = tasks.map((_, i) => i).filter((i) => shown[i]);
    const begin = (i) => (tasks[i].q === null ? tasks[i].s : tasks[i].q);
    order.sort((a, b) => begin(a) - begin(b) || tasks[a].s - tasks[b].s || a - b);
    if (state.groupBy === "agent") {
      for (const i of order) put("a\u0000" + tasks[i].agent, tasks[i].agent, i);
      return [...groups.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1)).map((e) => e[1]);
    }
    const packed = [];
    for (const i of order) {
      const t = tasks[i];
      if (t.slot === null) {
        // No slot recorded: the first lane free at its start.
        let lane = packed.findIndex((end) => end <= t.s);
        if (lane < 0) {
          lane = packed.length;
          packed.push(0);
        }
        packed[lane] = Math.max(t.e, t.s);
        put("z\u0000" + String(lane).padStart(6, "0"), "no slot recorded \u00b7 lane " + (lane + 1), i);
      } else {
        const key = "s\u0000" + (t.worker || "") + "\u0000" + String(t.slot).padStart(6, "0");
        put(key, (t.worker ? t.worker + " \u00b7 " : "") + "slot " + t.slot, i);
      }
    }
    return [...groups.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1)).map((e) => e[1]);
  }

  // Per task, one group (its outline, or a marker if it never started) to point at; the
  // phases and the waits of every task are drawn as one path per kind, so that 1,000 tasks
  // make a few thousand SVG elements, not ten thousand.
  function drawTimeline() {
    const groups = lanes();
    const labelNodes = [];
    chart.replaceChildren();
    bars = [];
    drawn = [];
    const defs = s("defs", {}, s("pattern", { id: "hatch", width: 4, height: 4, patternUnits: "userSpaceOnUse", transform: "rotate(45)" },
      s("line", { class: "hatch-line", x1: 0, y1: 0, x2: 0, y2: 4 })));
    const bands = s("g", {});
    const barLayer = s("g", {});
    layers = {
      grid: s("g", { class: "grid" }),
      waits: s("path", { class: "wait" }),
      phases: PHASES.map((_, k) => s("path", { class: "phase " + phaseClass(k) })),
      focus: s("g", { class: "focus-layer" }),
      links: s("g", { class: "links" }),
    };
    let y = 0;
    for (const group of groups) {
      labelNodes.push(h("div", { class: "tl-ghead", title: group.label }, group.label + " (" + group.items.length + ")"));
      bands.append(s("rect", { class: "band", x: 0, y, width: "100%", height: HEAD }));
      y += HEAD;
      for (const i of group.items) {
        const t = tasks[i];
        labelNodes.push(h("div", { class: "tl-label", title: t.id, "data-i": i }, t.id));
        const g = s("g", { class: "bar " + statusClass(t.status), "data-i": i });
        const bar = { i, g, y, run: null, marker: null };
        if (neverStarted(t)) {
          bar.marker = s("path", { class: "marker", d: "M0 -5 L5 0 L0 5 L-5 0 Z" });
          g.append(bar.marker);
        } else {
          bar.run = s("rect", { class: "run", y: y + 2, height: ROW - 4, rx: 1.5 });
          g.append(bar.run);
        }
        barLayer.append(g);
        bars[i] = bar;
        drawn.push(i);
        y += ROW;
      }
    }
    height = Math.max(y, ROW);
    labels.replaceChildren(...labelNodes);
    setAttrs(chart, { height });
    chart.append(defs, bands, layers.grid, layers.waits, barLayer, s("g", {}, ...layers.phases), layers.focus, layers.links);
    document.getElementById("tl-shown").textContent = drawn.length + " of " + tasks.length + " task(s) drawn";
    place();
    highlight(state.selected);
  }

  function tooltip(t) {
    const parts = [t.id, t.status + " \u00b7 " + t.agent];
    if (t.q !== null) parts.push("queued " + fmtWhen(t.q) + " (waited " + fmtDur(waited(t)) + ")");
    parts.push(neverStarted(t) ? "never started" : "ran " + fmtDur(took(t)) + " from " + fmtWhen(t.s));
    if (t.err) parts.push(t.err[0] + ": " + t.err[1].slice(0, 300));
    return parts.join("\n");
  }

  function niceStep(span, pixels) {
    const want = span / Math.max(2, pixels / 110);
    const steps = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
    return steps.find((step) => step >= want) || Math.ceil(want / 86400) * 86400;
  }

  // The chart's width, measured once per placing: reading it after a change to the drawing
  // would lay the whole page out again.
  let chartWidth = 0;
  function scale() {
    const width = chartWidth;
    const [v0, v1] = state.view;
    const k = width / (v1 - v0);
    return { width, k, x: (t) => (t - v0) * k };
  }
  const box = (x, y, w, hgt) => "M" + x.toFixed(1) + " " + y + "h" + w.toFixed(2) + "v" + hgt + "h" + (-w).toFixed(2) + "z";
  // Each phase of task *t* drawn in row *y*: [phase index, path data].
  function phaseBoxes(t, y, x, k) {
    const out = [];
    for (const [phase, from, to] of t.ph) {
      const start = Math.min(t.e, t.s + (from || 0));
      const end = Math.max(start, Math.min(t.e, t.s + (to || 0)));
      out.push([phase, box(x(start), y + 3.5, Math.max(0.5, (end - start) * k), ROW - 7)]);
    }
    return out;
  }

  function place() {
    chartWidth = Math.max(chart.clientWidth, 100);
    const { width, k, x } = scale();
    const waits = [];
    const phases = PHASES.map(() => []);
    for (const i of drawn) {
      const bar = bars[i];
      const t = tasks[i];
      if (t.q !== null && t.q < t.s) waits.push(box(x(t.q), bar.y + 6, Math.max(1, (t.s - t.q) * k), 4));
      if (bar.run) {
        setAttrs(bar.run, { x: x(t.s).toFixed(1), width: Math.max(2, (t.e - t.s) * k).toFixed(2) });
        for (const [phase, d] of phaseBoxes(t, bar.y, x, k)) if (phases[phase]) phases[phase].push(d);
      }
      if (bar.marker) setAttrs(bar.marker, { transform: "translate(" + x(t.s).toFixed(1) + "," + (bar.y + ROW / 2) + ")" });
    }
    setAttrs(layers.waits, { d: waits.join("") });
    layers.phases.forEach((path, p) => setAttrs(path, { d: phases[p].join("") }));
    const [v0, v1] = state.view;
    const step = niceStep(v1 - v0, width);
    const ticks = [];
    const lines = [];
    for (let n = Math.ceil(v0 / step); n * step <= v1 + 1e-9; n += 1) {
      const t = n * step;
      const at = x(t).toFixed(1);
      ticks.push(s("line", { x1: at, x2: at, y1: 16, y2: 24 }));
      ticks.push(s("text", { x: x(t) + 3, y: 12 }, fmtOffset(t - data.start, step)));
      lines.push(s("line", { x1: at, x2: at, y1: 0, y2: height }));
    }
    axis.replaceChildren(...ticks);
    layers.grid.replaceChildren(...lines);
    drawFocus();
    drawLinks();
  }

  // The task in focus (hovered or selected) and those related to it, in full colour over
  // the others, which the stylesheet dims.
  function related(i) {
    return [i, ...upstream[i], ...downstream[i], ...siblings(i)].filter((j) => bars[j]);
  }
  function drawFocus() {
    const i = state.focused;
    if (i < 0 || !bars[i]) {
      layers.focus.replaceChildren();
      return;
    }
    const { k, x } = scale();
    const nodes = [];
    for (const j of related(i)) {
      for (const [phase, d] of phaseBoxes(tasks[j], bars[j].y, x, k)) nodes.push(s("path", { class: "phase " + phaseClass(phase), d }));
    }
    layers.focus.replaceChildren(...nodes);
  }

  function drawLinks() {
    layers.links.replaceChildren();
    const i = state.selected;
    if (i < 0 || !bars[i]) return;
    const { x } = scale();
    const mid = (b) => b.y + ROW / 2;
    const link = (from, to, cls) => {
      const x1 = x(tasks[from].e).toFixed(1);
      const b = tasks[to];
      const x2 = x(b.q === null ? b.s : b.q).toFixed(1);
      const xm = ((Number(x1) + Number(x2)) / 2).toFixed(1);
      const y1 = mid(bars[from]);
      const y2 = mid(bars[to]);
      layers.links.append(s("path", { class: cls, d: "M" + x1 + " " + y1 + " C" + xm + " " + y1 + " " + xm + " " + y2 + " " + x2 + " " + y2 }));
    };
    for (const u of upstream[i]) if (bars[u]) link(u, i, "up");
    for (const d of downstream[i]) if (bars[d]) link(i, d, "down");
  }

  function highlight(i) {
    state.focused = i;
    chart.classList.toggle("focus", i >= 0 && Boolean(bars[i]));
    for (const g of chart.querySelectorAll("g.bar.sel, g.bar.up, g.bar.down, g.bar.sib")) g.classList.remove("sel", "up", "down", "sib");
    if (i >= 0) {
      const mark = (list, cls) => list.forEach((j) => bars[j] && bars[j].g.classList.add(cls));
      mark(upstream[i], "up");
      mark(downstream[i], "down");
      mark(siblings(i), "sib");
      if (bars[i]) bars[i].g.classList.add("sel");
    }
    drawFocus();
  }

  function zoom(factor, center) {
    const [f0, f1] = full();
    const [v0, v1] = state.view;
    const c = center === undefined ? (v0 + v1) / 2 : center;
    const span = Math.min(f1 - f0, Math.max((f1 - f0) / 1e6, 0.001, (v1 - v0) * factor));
    let n0 = c - (c - v0) * (span / (v1 - v0));
    n0 = Math.min(Math.max(n0, f0), f1 - span);
    state.view = [n0, n0 + span];
    place();
  }
  function pan(seconds) {
    const [f0, f1] = full();
    const [v0, v1] = state.view;
    const n0 = Math.min(Math.max(v0 + seconds, f0), f1 - (v1 - v0));
    state.view = [n0, n0 + (v1 - v0)];
    place();
  }
  document.getElementById("zoom-in").addEventListener("click", () => zoom(0.5));
  document.getElementById("zoom-out").addEventListener("click", () => zoom(2));
  document.getElementById("zoom-reset").addEventListener("click", () => {
    state.view = full();
    place();
  });
  document.getElementById("pan-left").addEventListener("click", () => pan(-(state.view[1] - state.view[0]) / 3));
  document.getElementById("pan-right").addEventListener("click", () => pan((state.view[1] - state.view[0]) / 3));
  const timeAt = (clientX) => {
    const box = chart.getBoundingClientRect();
    return state.view[0] + ((clientX - box.left) / Math.max(box.width, 1)) * (state.view[1] - state.view[0]);
  };
  chart.addEventListener("wheel", (event) => {
    if (event.ctrlKey || event.metaKey) {
      event.preventDefault();
      zoom(event.deltaY > 0 ? 1.25 : 0.8, timeAt(event.clientX));
    } else if (event.shiftKey || Math.abs(event.deltaX) > Math.abs(event.deltaY)) {
      event.preventDefault();
      const delta = event.shiftKey ? event.deltaY : event.deltaX;
      pan((delta / chartWidth) * (state.view[1] - state.view[0]));
    }
  }, { passive: false });
  let drag = null;
  chart.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, view: state.view.slice(), moved: false };
  });
  window.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.x;
    if (Math.abs(dx) > 3) {
      drag.moved = true;
      chart.classList.add("dragging");
    }
    if (drag.moved) {
      state.view = drag.view.slice();
      pan((-dx / chartWidth) * (drag.view[1] - drag.view[0]));
    }
  });
  window.addEventListener("pointerup", () => {
    chart.classList.remove("dragging");
    setTimeout(() => {
      drag = null;
    }, 0);
  });
  chart.addEventListener("click", (event) => {
    if (drag && drag.moved) return;
    const g = event.target.closest("g.bar");
    if (g) select(Number(g.dataset.i), true);
  });
  chart.addEventListener("pointerover", (event) => {
    const g = event.target.closest("g.bar");
    if (g && !drag) {
      const i = Number(g.dataset.i);
      if (!g.querySelector("title")) g.prepend(s("title", {}, tooltip(tasks[i])));
      if (state.focused !== i) highlight(i);
    }
  });
  chart.addEventListener("pointerout", (event) => {
    const from = event.target.closest("g.bar");
    const to = event.relatedTarget && event.relatedTarget.closest ? event.relatedTarget.closest("g.bar") : null;
    if (from && from !== to) highlight(state.selected);
  });
  labels.addEventListener("click", (event) => {
    const label = event.target.closest(".tl-label");
    if (label) select(Number(label.dataset.i), true);
  });
  for (const radio of document.querySelectorAll('input[name="groupby"]')) {
    radio.addEventListener("change", () => {
      if (radio.checked) {
        state.groupBy = radio.value === "slot" ? "slot" : "agent";
        drawTimeline();
      }
    });
  }
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(place, 100);
  });

  // ---- the details of one task ----
  const panel = document.getElementById("details");
  const body = document.getElementById("details-body");

  function select(i, open) {
    if (state.selected >= 0) rows[state.selected].classList.remove("sel");
    for (const label of labels.querySelectorAll(".tl-label.sel")) label.classList.remove("sel");
    state.selected = i;
    if (i >= 0) {
      rows[i].classList.add("sel");
      const label = labels.querySelector('.tl-label[data-i="' + i + '"]');
      if (label) label.classList.add("sel");
    }
    highlight(i);
    reveal(i);
    drawLinks();
    if (open && i >= 0) openDetails(i);
  }

  // Bring task *i*'s bar into the timeline's view: its time window, then its row.
  function reveal(i) {
    const bar = bars[i];
    if (i < 0 || !bar) return;
    const t = tasks[i];
    const begin = t.q === null ? t.s : t.q;
    const [v0, v1] = state.view;
    if (begin < v0 || t.e > v1) {
      const span = v1 - v0;
      const [f0, f1] = full();
      const n0 = Math.min(Math.max(span >= t.e - begin ? (begin + t.e - span) / 2 : begin, f0), f1 - span);
      state.view = [n0, n0 + span];
      place();
    }
    const scroller = document.getElementById("timeline");
    const top = bar.y + 24;
    if (top < scroller.scrollTop + 24 || top + ROW > scroller.scrollTop + scroller.clientHeight) scroller.scrollTop = top - scroller.clientHeight / 2;
  }

  function table(head, bodyRows) {
    return h("table", {}, h("thead", {}, h("tr", {}, ...head.map((c) => h("th", {}, c)))),
      h("tbody", {}, ...bodyRows.map((r) => h("tr", {}, ...r.map((c) => h("td", {}, c))))));
  }
  function facts(pairs) {
    const dl = h("dl", { class: "facts" });
    for (const [k, v] of pairs) if (v !== null && v !== undefined && v !== "") add(dl, [h("dt", {}, k), h("dd", {}, v)]);
    return dl;
  }
  function taskLink(j) {
    const a = h("button", { type: "button", class: "small", title: tasks[j].id }, tasks[j].id + " (" + tasks[j].status + ")");
    a.addEventListener("click", () => select(j, true));
    return a;
  }
  const notAvailable = (why) => h("p", { class: "muted" }, "not available" + (why ? " (" + why + ")" : ""));

  function logSection(t, stream) {
    const log = t.logs ? t.logs[stream] : null;
    const path = t.logPaths ? t.logPaths[stream] : null;
    const title = h("h3", {}, stream);
    if (!log) return [title, notAvailable(path ? (data.notes.logs || "not read, missing or not a regular file") + "; in the run directory: " + path : "no log file recorded")];
    const note = (log.cut ? "the last " + log.lines.length + " line(s) of " : "all of ") + path + " (" + fmtInt(log.size) + " bytes)";
    return [title, h("p", { class: "muted small" }, note), h("pre", {}, log.lines.join("\n"))];
  }
  function filesSection(t) {
    const f = t.files;
    const out = [h("h3", {}, "Files changed")];
    if (!f) return [...out, notAvailable(data.notes.files || (t.prov.base_commit && t.prov.result_commit ? "not found in the repository" : "no base and result commits"))];
    out.push(h("p", {}, f.n + " file(s), +" + f.add + " \u2212" + f.del + (f.bin ? ", " + f.bin + " binary" : "")));
    if (f.list.length) out.push(table(["File", "+", "\u2212"], f.list.map(([path, a, d]) => [path, a === null ? "binary" : String(a), d === null ? "" : String(d)])));
    if (f.more) out.push(h("p", { class: "muted" }, "and " + f.more + " more file(s)"));
    return out;
  }
  function stepsTable(steps) {
    return table(["Name", "Phase", "Turn", "Passed", "Required", "Exit", "Took"], steps.map((c) => [
      c.name, c.phase, String(c.turn), c.passed ? "yes" : c.timed_out ? "no (timed out)" : "no", c.required ? "yes" : "no",
      c.exit_code === null ? "" : String(c.exit_code), fmtDur(c.duration_s),
    ]));
  }
  function checkoutSection(t) {
    if (!t.checkout) return [];
    const code = h("pre", {}, t.checkout);
    const button = h("button", { type: "button", title: "Copy the command" }, "copy");
    button.addEventListener("click", () => {
      const fallback = () => {
        const range = document.createRange();
        range.selectNodeContents(code);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        button.textContent = "selected: press Ctrl+C";
      };
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(t.checkout).then(() => {
          button.textContent = "copied";
        }, fallback);
      } else {
        fallback();
      }
    });
    return [h("h3", {}, "Check the branch out"), h("div", { class: "cmd" }, code, button)];
  }

  function openDetails(i) {
    const t = tasks[i];
    const parts = [
      h("h2", {}, t.id),
      h("p", {}, h("span", { class: "chip " + statusClass(t.status) }, t.status), " ", t.agent, " \u00b7 ", t.tries + " attempt(s)", t.resumed ? " \u00b7 resumed" : ""),
    ];
    if (t.err) parts.push(h("h3", {}, "Error"), h("p", {}, h("strong", {}, t.err[0])), h("pre", {}, t.err[1]));
    parts.push(facts([
      ["Group", t.group],
      ["Queued", t.q === null ? null : fmtWhen(t.q)],
      ["Waited", fmtDur(waited(t))],
      ["Started", fmtWhen(t.s)],
      ["Finished", fmtWhen(t.e)],
      ["Took", neverStarted(t) ? "never started" : fmtDur(took(t))],
      ["Slot", t.slot === null ? null : (t.worker ? t.worker + " \u00b7 " : "") + "slot " + t.slot],
      ["Exit code", t.exit === null ? null : String(t.exit)],
      ["Branch", t.branch],
      ["Worktree", t.worktree],
    ]));
    const ups = upstream[i];
    const downs = downstream[i];
    const sibs = siblings(i);
    if (t.deps.length) parts.push(h("h3", {}, "Depends on"), h("p", { class: "small" }, t.deps.join(", ")), h("div", { class: "chips" }, ...ups.map(taskLink)));
    if (downs.length) parts.push(h("h3", {}, "Needed by"), h("div", { class: "chips" }, ...downs.map(taskLink)));
    if (sibs.length) parts.push(h("h3", {}, "Other members of group " + t.group), h("div", { class: "chips" }, ...sibs.map(taskLink)));
    if (t.ph.length) {
      parts.push(h("h3", {}, "Phases"), table(["Phase", "From", "To", "Took"], t.ph.map(([p, a, b]) => [PHASES[p] || "?", fmtDur(a), fmtDur(b), fmtDur(b - a)])));
    }
    parts.push(...logSection(t, "stdout"), ...logSection(t, "stderr"));
    parts.push(...filesSection(t));
    if (t.checks.length) parts.push(h("h3", {}, "Setup steps and checks"), stepsTable(t.checks));
    if (t.hooks.length) parts.push(h("h3", {}, "Hooks"), stepsTable(t.hooks));
    if (t.usage) {
      const u = t.usage;
      parts.push(h("h3", {}, "Usage"), facts([
        ["Model", u.model], ["Input tokens", fmtInt(u.input_tokens)], ["Output tokens", fmtInt(u.output_tokens)],
        ["Cache read tokens", fmtInt(u.cache_read_tokens)], ["Cache write tokens", fmtInt(u.cache_write_tokens)],
        ["Total tokens", fmtInt(u.total_tokens)], ["Turns", fmtInt(u.turns)],
        ["Cost", u.cost_usd === null ? "not known" : fmtCost(u.cost_usd) + (u.cost_source ? " (" + u.cost_source + ")" : "")],
      ]));
    }
    if (t.attempts.length) {
      parts.push(h("h3", {}, "Attempts"), table(["#", "Status", "Started", "Took", "Exit", "Error", "Worker"], t.attempts.map((a) => [
        String(a.n) + (a.repair ? " (repair)" : ""), a.status, fmtWhen(a.s), fmtDur(a.took), a.exit === null ? "" : String(a.exit), a.err || "", a.worker || "",
      ])));
    }
    if (t.output !== null) parts.push(h("h3", {}, "Output"), h("pre", {}, t.output));
    parts.push(...checkoutSection(t));
    parts.push(h("h3", {}, "Provenance"), table(["Field", "Value"], Object.keys(t.prov).filter((k) => t.prov[k] !== null).map((k) => [k, h("span", { class: "mono" }, String(t.prov[k]))])));
    body.replaceChildren(...parts);
    panel.hidden = false;
    panel.scrollTop = 0;
    document.getElementById("details-close").focus({ preventScroll: true });
  }
  function closeDetails() {
    panel.hidden = true;
    if (state.selected >= 0) rows[state.selected].focus({ preventScroll: true });
  }
  document.getElementById("details-close").addEventListener("click", closeDetails);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) closeDetails();
  });

  applyFilters();
  // Ready once the built page has been laid out and painted: the next frame, then a task.
  requestAnimationFrame(() => setTimeout(() => {
    document.documentElement.dataset.readyMs = String(Math.round(performance.now()));
    document.documentElement.dataset.ready = "1";
  }, 0));
})();
