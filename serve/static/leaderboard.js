// The leaderboard page (/leaderboard): ratings with their 95 % intervals drawn as bars on one
// shared scale, the history chart and the pairwise win-rate heat map; refreshed on its own.
"use strict";

const REFRESH_MS = 15000;
const SVG = "http://www.w3.org/2000/svg";
const BAR_WIDTH = 160, BAR_HEIGHT = 16;

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

// One interval as an error bar on the scale [lo, hi] shared by all rows.
function ciBar(row, lo, hi) {
  const bar = svg("svg", { width: BAR_WIDTH, height: BAR_HEIGHT, class: "ci-bar",
                           role: "img", "aria-label": `95 % CI ${fmt(row.ci_lower)}–${fmt(row.ci_upper)}` });
  const x = (v) => 4 + (BAR_WIDTH - 8) * (hi > lo ? (v - lo) / (hi - lo) : 0.5);
  const mid = BAR_HEIGHT / 2;
  bar.appendChild(svg("line", { x1: 0, x2: BAR_WIDTH, y1: mid, y2: mid, class: "axis" }));
  if (row.ci_lower !== null && row.ci_upper !== null) {
    bar.appendChild(svg("line", { x1: x(row.ci_lower), x2: x(row.ci_upper), y1: mid, y2: mid }));
    for (const v of [row.ci_lower, row.ci_upper]) {
      bar.appendChild(svg("line", { x1: x(v), x2: x(v), y1: mid - 5, y2: mid + 5 }));
    }
  }
  if (row.rating !== null) bar.appendChild(svg("circle", { cx: x(row.rating), cy: mid, r: 4 }));
  return bar;
}

function drawBoard(board) {
  const rows = board.data;
  const bounds = rows.flatMap((r) => [r.ci_lower, r.ci_upper, r.rating]).filter((v) => v !== null);
  const lo = Math.min(...bounds), hi = Math.max(...bounds);
  const tbody = $("board-rows");
  tbody.textContent = "";
  for (const r of rows) {
    const tr = el("tr");
    tr.dataset.version = r.id;
    const ci = r.ci_lower === null ? "–" : `${fmt(r.ci_lower)} – ${fmt(r.ci_upper)}`;
    const style = r.style && r.style.rating !== null && r.style.rating !== undefined
      ? `${fmt(r.style.rating)} (${fmt(r.style.ci_lower)} – ${fmt(r.style.ci_upper)})` : "–";
    const winRate = r.win_rate_vs_base === null ? "–" : `${(100 * r.win_rate_vs_base).toFixed(0)} %`;
    const cells = [[fmt(r.rank), "num"], [r.id], [fmt(r.rating), "num"], [ci], [null],
                   [r.battles, "num"], [winRate, "num"], [style, "num"], [r.state], [r.parent || "–"]];
    for (const [text, cls] of cells) tr.appendChild(el("td", text, cls));
    tr.children[4].appendChild(ciBar(r, lo, hi));
    tbody.appendChild(tr);
  }
  const when = board.fitted_at ? new Date(board.fitted_at * 1000).toLocaleTimeString() : "not yet";
  $("board-meta").textContent =
    `${board.n_votes} votes in the latest fit (${when}); ${rows.length} versions. Refreshes every ${REFRESH_MS / 1000} s.`;
}

function drawHeat(pairwise) {
  const table = $("heat");
  table.textContent = "";
  if (!pairwise.models.length) { table.appendChild(el("caption", "No votes between two versions yet.")); return; }
  const head = el("tr");
  head.appendChild(el("th", "row \\ column"));
  for (const m of pairwise.models) head.appendChild(el("th", m));
  table.appendChild(head);
  pairwise.models.forEach((m, i) => {
    const tr = el("tr");
    tr.appendChild(el("th", m));
    pairwise.models.forEach((_, j) => {
      const rate = pairwise.win_rate[i][j];
      const td = el("td", rate === null ? "–" : `${Math.round(100 * rate)} %`, "cell");
      td.title = `${pairwise.battles[i][j]} votes`;
      if (rate !== null) {  // blue above 50 %, red below (CSSOM: allowed by the page's CSP)
        const strength = Math.min(1, Math.abs(rate - 0.5) * 2);
        td.style.backgroundColor = rate >= 0.5 ? `rgba(47, 111, 237, ${0.1 + 0.5 * strength})`
                                               : `rgba(179, 38, 30, ${0.1 + 0.5 * strength})`;
      }
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
}

async function refresh() {
  try {
    const [board, pairwise] = await Promise.all([fetch("/v1/leaderboard"), fetch("/v1/leaderboard/pairwise")]);
    if (!board.ok) { $("board-error").textContent = await apiError(board); return; }
    $("board-error").textContent = "";
    drawBoard(await board.json());
    if (pairwise.ok) drawHeat(await pairwise.json());
    $("history-chart").src = `/v1/leaderboard/history.png?t=${Date.now()}`;
  } catch (error) {
    $("board-error").textContent = networkError(error);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
