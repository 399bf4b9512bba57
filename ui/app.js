// Engram web page: banks, stored patterns, corruption of a pattern, step-by-step
// retrieval with its energy curve, and streamed sampling.
//
// Talks to engramd's JSON gateway on the same origin: POST /v1/{Method} with the
// request message in the proto3 JSON mapping (lowerCamelCase names, enums by
// name, uint64 as decimal strings, bytes as base64), and POST /v1/SampleStream
// answering one SampleFrame per NDJSON line. Errors arrive as
// {"error": {"code": <http status>, "status": "<gRPC code>", "message": "..."}}.
//
// The page's state is exposed read-only as window.engramUi (see `ui` below); the
// energy chart also carries its values in its data-energies attribute.

const TOKEN_KEY = 'engram.token';
const BANK_KEY = 'engram.bank';
const DEMO_SIDE = 28;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------
// State

const ui = {
  status: { kind: 'idle', text: '' },
  banks: [],             // BankInfo JSON objects from ListBanks
  bank: null,            // the selected BankInfo
  shape: null,           // {w, h}: how a vector of the bank's dim is laid out as an image
  range: [-1, 1],        // display range of the bank's values
  page: { bank: '', start: 0, size: 48, ids: [], payloads: [], data: [], next: 0, history: [] },
  original: null,        // {id, payload, pattern: Float32Array}
  masks: [],             // rectangles in cell coordinates {x0, y0, x1, y1}, end exclusive
  query: null,           // Float32Array: the corrupted query
  retrieve: null,        // see runRetrieve
  sample: null,          // see runSample
};
window.engramUi = ui;

// ---------------------------------------------------------------------------
// HTTP

export class ApiError extends Error {
  constructor(httpStatus, code, message) {
    super(message);
    this.httpStatus = httpStatus;
    this.code = code;
  }
  toString() {
    return `${this.code}: ${this.message}` + (this.httpStatus ? ` (HTTP ${this.httpStatus})` : '');
  }
}

function headers() {
  const h = { 'Content-Type': 'application/json', Accept: 'application/json' };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

function errorFromBody(httpStatus, text) {
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  const e = body && body.error;
  if (e) return new ApiError(e.code || httpStatus, e.status || `HTTP ${httpStatus}`, e.message || '');
  return new ApiError(httpStatus, `HTTP ${httpStatus}`, (text || '').trim().slice(0, 300) || 'request failed');
}

async function api(method, body = {}, { signal } = {}) {
  let res;
  try {
    res = await fetch(`/v1/${method}`, { method: 'POST', headers: headers(), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'UNAVAILABLE', `${method}: the server cannot be reached (${e.message})`);
  }
  const text = await res.text();
  if (!res.ok) throw errorFromBody(res.status, text);
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    throw new ApiError(res.status, 'INTERNAL', `${method}: the response is not JSON`);
  }
}

// Reads an NDJSON stream, calling onObject for every line; an {"error": ...}
// line ends the stream with an ApiError.
async function streamNdjson(method, body, { signal, onObject }) {
  let res;
  try {
    res = await fetch(`/v1/${method}`, {
      method: 'POST', headers: { ...headers(), Accept: 'application/x-ndjson' }, body: JSON.stringify(body), signal,
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'UNAVAILABLE', `${method}: the server cannot be reached (${e.message})`);
  }
  if (!res.ok) throw errorFromBody(res.status, await res.text());
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  const handle = (line) => {
    if (!line.trim()) return;
    const obj = JSON.parse(line);
    if (obj.error) throw new ApiError(obj.error.code || 0, obj.error.status || 'UNKNOWN', obj.error.message || '');
    onObject(obj);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        handle(line);
      }
    }
    buffer += decoder.decode();
    handle(buffer);
  } catch (e) {
    reader.cancel().catch(() => {});
    throw e;
  }
}

// ---------------------------------------------------------------------------
// JSON value helpers

const floats = (a) => Float32Array.from(a || [], Number);
const num = (v, dflt = 0) => (v === undefined || v === null ? dflt : Number(v));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function b64encodeText(s) {
  const bytes = new TextEncoder().encode(s);
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

function payloadText(b64) {
  if (!b64) return '';
  let bin;
  try { bin = atob(b64); } catch { return b64; }
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  try {
    const s = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    if (!/[\u0000-\u0008\u000e-\u001f]/.test(s)) return s;
  } catch { /* binary */ }
  const hex = Array.from(bytes.slice(0, 12), (b) => b.toString(16).padStart(2, '0')).join('');
  return `0x${hex}${bytes.length > 12 ? '…' : ''} (${bytes.length} bytes)`;
}

const enumName = (v, prefix) => (v ? String(v).replace(prefix, '').toLowerCase() : '');

function fmt(x) {
  if (x === undefined || x === null) return '—';
  const v = Number(x);
  if (!Number.isFinite(v)) return String(v);
  if (v !== 0 && (Math.abs(v) >= 1e6 || Math.abs(v) < 1e-3)) return v.toExponential(3);
  return String(Number(v.toPrecision(6)));
}

function energyLabel(energy) {
  if (!energy) return '';
  const fam = enumName(energy.family, 'ENERGY_FAMILY_') || 'default';
  const parts = [fam];
  if (fam === 'polynomial') parts.push(`n=${num(energy.degree) || 3}${energy.rectified ? ' rect' : ''}`);
  if (['exponential', 'lse', 'gaussian'].includes(fam)) parts.push(`β=${fmt(num(energy.beta) || 1)}`);
  if (fam === 'general') {
    parts.push(enumName(energy.similarity, 'SIMILARITY_') || 'dot');
    parts.push(enumName(energy.separation, 'SEPARATION_') || 'softmax');
  }
  return parts.join(' ');
}

// ---------------------------------------------------------------------------
// Status line

function setStatus(kind, text) {
  ui.status = { kind, text };
  const el = $('status');
  el.dataset.kind = kind;
  el.textContent = text;
}

function showError(e) {
  if (e && e.name === 'AbortError') return;
  console.warn(e);
  setStatus('error', e instanceof ApiError ? e.toString() : `Error: ${e && e.message ? e.message : e}`);
}

// Wraps an event handler: errors land in the status line.
const guard = (fn) => async (...args) => {
  try { await fn(...args); } catch (e) { showError(e); }
};

// ---------------------------------------------------------------------------
// Rendering vectors as images

function shapeFor(dim) {
  const s = Math.round(Math.sqrt(dim));
  if (s * s === dim) return { w: s, h: s };
  const w = Math.ceil(Math.sqrt(dim));
  return { w, h: Math.ceil(dim / w) };
}

// Draws `vec` (laid out row-major on shape) into `canvas`, scaling each cell
// to a block of `scale` pixels. Values map linearly from range to black..white.
function drawVector(canvas, vec, shape = ui.shape, range = ui.range, maxPx = 280) {
  if (!shape) return;
  const scale = Math.max(1, Math.min(16, Math.floor(maxPx / Math.max(shape.w, shape.h))));
  const W = shape.w * scale;
  const H = shape.h * scale;
  if (canvas.width !== W) canvas.width = W;
  if (canvas.height !== H) canvas.height = H;
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(W, H);
  const [lo, hi] = range;
  const span = hi - lo || 1;
  const n = shape.w * shape.h;
  for (let i = 0; i < n; i++) {
    let r, g, b;
    if (!vec || i >= vec.length) { r = 70; g = 80; b = 110; } else {
      const v = vec[i];
      if (!Number.isFinite(v)) { r = 220; g = 0; b = 120; } else {
        const t = Math.max(0, Math.min(1, (v - lo) / span));
        r = g = b = Math.round(16 + t * 234);
      }
    }
    const cx = (i % shape.w) * scale;
    const cy = Math.floor(i / shape.w) * scale;
    for (let y = 0; y < scale; y++) {
      let p = ((cy + y) * W + cx) * 4;
      for (let x = 0; x < scale; x++, p += 4) {
        img.data[p] = r; img.data[p + 1] = g; img.data[p + 2] = b; img.data[p + 3] = 255;
      }
    }
  }
  ctx.putImageData(img, 0, 0);
  return scale;
}

function clearCanvas(canvas) {
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
}

// ---------------------------------------------------------------------------
// Procedural demo images: the letters of ENGRAM and four shapes, 28 x 28.

const GLYPHS = {
  E: ['11111', '10000', '10000', '11110', '10000', '10000', '11111'],
  N: ['10001', '11001', '10101', '10011', '10001', '10001', '10001'],
  G: ['01110', '10001', '10000', '10111', '10001', '10001', '01111'],
  R: ['11110', '10001', '10001', '11110', '10100', '10010', '10001'],
  A: ['01110', '10001', '10001', '11111', '10001', '10001', '10001'],
  M: ['10001', '11011', '10101', '10101', '10001', '10001', '10001'],
};

// Returns [{name, ink}] with ink a Float32Array of 28 * 28 values in [0, 1].
function demoImages() {
  const S = DEMO_SIDE;
  const out = [];
  for (const [letter, rows] of Object.entries(GLYPHS)) {
    const ink = new Float32Array(S * S);
    const cell = 3; const ox = Math.floor((S - 5 * cell) / 2); const oy = Math.floor((S - 7 * cell) / 2);
    rows.forEach((row, gy) => [...row].forEach((c, gx) => {
      if (c !== '1') return;
      for (let y = 0; y < cell; y++) for (let x = 0; x < cell; x++) ink[(oy + gy * cell + y) * S + ox + gx * cell + x] = 1;
    }));
    out.push({ name: `letter ${letter}`, ink });
  }
  // Shapes by their indicator functions on [0, 28)^2, 4 x 4 supersampled.
  const shapes = {
    disk: (x, y) => (x - 14) ** 2 + (y - 14) ** 2 <= 10 ** 2,
    square: (x, y) => Math.max(Math.abs(x - 14), Math.abs(y - 14)) <= 10 && Math.max(Math.abs(x - 14), Math.abs(y - 14)) >= 7,
    triangle: (x, y) => y >= 4 && y <= 24 && Math.abs(x - 14) <= (y - 4) * 0.55,
    cross: (x, y) => (Math.abs((x - 14) - (y - 14)) <= 2.2 || Math.abs((x - 14) + (y - 14)) <= 2.2) && Math.max(Math.abs(x - 14), Math.abs(y - 14)) <= 10.5,
  };
  for (const [name, f] of Object.entries(shapes)) {
    const ink = new Float32Array(S * S);
    for (let py = 0; py < S; py++) for (let px = 0; px < S; px++) {
      let hits = 0;
      for (let sy = 0; sy < 4; sy++) for (let sx = 0; sx < 4; sx++) if (f(px + (sx + 0.5) / 4, py + (sy + 0.5) / 4)) hits++;
      ink[py * S + px] = hits / 16;
    }
    out.push({ name, ink });
  }
  return out;
}

const DEMO = {
  bipolar: {
    name: 'demo-bipolar',
    kind: 'STATE_KIND_BIPOLAR',
    energy: { family: 'ENERGY_FAMILY_LSE', beta: 1 },
    value: (ink) => (ink >= 0.5 ? 1 : -1),
  },
  continuous: {
    name: 'demo-continuous',
    kind: 'STATE_KIND_CONTINUOUS',
    energy: { family: 'ENERGY_FAMILY_LSE', beta: 1 },
    value: (ink) => 2 * ink - 1,
  },
};

async function createDemo() {
  const demo = DEMO[$('demo-kind').value] || DEMO.bipolar;
  setStatus('busy', `Creating bank ${demo.name}…`);
  const dim = DEMO_SIDE * DEMO_SIDE;
  let info;
  try {
    info = await api('CreateBank', { name: demo.name, dim, kind: demo.kind, energy: demo.energy });
  } catch (e) {
    if (!(e instanceof ApiError) || e.code !== 'ALREADY_EXISTS') throw e;
    info = await api('GetBank', { name: demo.name });
  }
  if (num(info.patterns) === 0) {
    const images = demoImages();
    const patterns = [];
    for (const im of images) for (const v of im.ink) patterns.push(demo.value(v));
    const res = await api('Store', {
      bank: demo.name, patterns, payloads: images.map((im) => b64encodeText(im.name)),
    });
    setStatus('ok', `Bank ${demo.name}: stored ${images.length} patterns (ids ${res.ids[0]}…${res.ids[res.ids.length - 1]}).`);
  } else {
    setStatus('ok', `Bank ${demo.name} exists already (${info.patterns} patterns).`);
  }
  await refreshBanks();
  await selectBank(demo.name);
}

// ---------------------------------------------------------------------------
// Banks

async function refreshBanks() {
  const res = await api('ListBanks', {});
  ui.banks = res.banks || [];
  renderBanks();
  if (ui.status.kind === 'error' || ui.status.kind === 'idle' || ui.status.kind === 'busy') {
    setStatus('ok', `${ui.banks.length} bank${ui.banks.length === 1 ? '' : 's'}.`);
  }
  return ui.banks;
}

function renderBanks() {
  const tbody = $('banks').querySelector('tbody');
  tbody.replaceChildren();
  $('banks-empty').hidden = ui.banks.length > 0;
  for (const b of ui.banks) {
    const tr = document.createElement('tr');
    tr.dataset.bank = b.name;
    if (ui.bank && ui.bank.name === b.name) tr.classList.add('selected');
    const cap = b.capacity || {};
    const capPatterns = num(cap.patterns);
    const k = num(b.patterns);
    const frac = capPatterns > 0 ? k / capPatterns : 0;
    const cells = [
      b.name, String(b.dim), enumName(b.kind, 'STATE_KIND_'), energyLabel(b.energy), String(k),
    ];
    for (const c of cells) {
      const td = document.createElement('td');
      td.textContent = c;
      tr.append(td);
    }
    const gauge = document.createElement('td');
    gauge.className = 'gauge-cell';
    const bar = document.createElement('div');
    bar.className = 'gauge' + (cap.overCapacity ? ' over' : '');
    const fill = document.createElement('div');
    fill.className = 'fill';
    fill.style.width = `${Math.min(100, frac * 100)}%`;
    bar.append(fill);
    const label = document.createElement('span');
    label.className = 'gauge-label';
    const capText = capPatterns >= 1e6 ? capPatterns.toExponential(1) : fmt(Math.round(capPatterns * 10) / 10);
    const pct = frac * 100;
    const pctText = pct >= 0.1 ? `${fmt(Math.round(pct * 10) / 10)} %` : pct > 0 ? '< 0.1 %' : '0 %';
    label.textContent = capPatterns > 0 ? `${k} / ${capText} · ${pctText}` : `${k} / —`;
    bar.title = `capacity ${fmt(capPatterns)} patterns (exact recall: ${fmt(num(cap.exactPatterns))}); ${cap.formula || ''}; load K/N = ${fmt(b.load)}`;
    label.title = bar.title;
    gauge.append(bar, label);
    tr.append(gauge);
    const del = document.createElement('td');
    const delBtn = document.createElement('button');
    delBtn.type = 'button';
    delBtn.className = 'small danger';
    delBtn.textContent = '✕';
    delBtn.title = `Delete bank ${b.name}`;
    delBtn.setAttribute('aria-label', delBtn.title);
    delBtn.addEventListener('click', guard(async (ev) => {
      ev.stopPropagation();
      if (!confirm(`Delete bank ${b.name} and all its patterns?`)) return;
      await api('DeleteBank', { name: b.name });
      if (ui.bank && ui.bank.name === b.name) { ui.bank = null; localStorage.removeItem(BANK_KEY); clearBankView(); }
      setStatus('ok', `Deleted bank ${b.name}.`);
      await refreshBanks();
    }));
    del.append(delBtn);
    tr.append(del);
    tr.addEventListener('click', guard(() => selectBank(b.name)));
    tbody.append(tr);
  }
}

function clearBankView() {
  $('bank-name').textContent = '';
  $('patterns').replaceChildren();
  $('page-info').textContent = '';
  ui.original = null; ui.query = null; ui.masks = [];
  for (const id of ['original-canvas', 'query-canvas', 'state-canvas']) clearCanvas($(id));
}

// Only the latest selection writes the view: a slower answer for a bank the user
// has since left is dropped.
let bankGen = 0;

async function selectBank(name) {
  const gen = ++bankGen;
  const info = await api('GetBank', { name });
  if (gen !== bankGen) return;
  const changed = !ui.bank || ui.bank.name !== name;
  if (changed) {
    // The previous bank's thumbnails, original and run must not stay clickable
    // while this bank's first page loads.
    stopRetrieve();
    ui.retrieve = null;
    clearBankView();
  }
  ui.bank = info;
  localStorage.setItem(BANK_KEY, name);
  ui.shape = shapeFor(num(info.dim));
  const continuous = info.kind === 'STATE_KIND_CONTINUOUS';
  $('bank-name').textContent = `— ${name}`;
  if (changed) {
    $('sample-energy').value = continuous ? 'ENERGY_FAMILY_GAUSSIAN' : '';
    $('dynamics').value = 'DYNAMICS_SYNC';
    $('mask-fill').options[0].textContent = continuous ? 'low (min)' : 'low (−1)';
    $('mask-fill').options[1].textContent = continuous ? 'high (max)' : 'high (+1)';
    ui.masks = [];
    ui.page.history = [];
  }
  renderBanks();
  await loadPage(changed ? 0 : ui.page.start);
  if (gen !== bankGen) return;
  if (changed || !ui.original) {
    if (ui.page.ids.length) selectPattern(0); else clearBankView();
    $('bank-name').textContent = `— ${name}`;
  }
}

// ---------------------------------------------------------------------------
// Patterns

async function loadPage(start) {
  const bank = ui.bank;
  const dim = num(bank.dim);
  const size = Math.max(1, Math.min(48, Math.floor(2e6 / dim)));
  const res = await api('GetPatterns', { bank: bank.name, pageStart: String(start), pageSize: size });
  if (ui.bank !== bank) return;
  const data = floats(res.patterns);
  const ids = res.ids || [];
  ui.page = {
    ...ui.page, bank: bank.name, start, size, ids, payloads: (res.payloads || []).map(payloadText),
    data, next: num(res.nextPageStart),
  };
  if (ui.bank.kind === 'STATE_KIND_CONTINUOUS') {
    let lo = Infinity; let hi = -Infinity;
    for (const v of data) { if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; } }
    ui.range = lo < hi ? [lo, hi] : [-1, 1];
  } else {
    ui.range = [-1, 1];
  }
  renderThumbs();
  const total = num(ui.bank.patterns);
  $('page-info').textContent = ids.length ? `${start + 1}–${start + ids.length} of ${total}` : `0 of ${total}`;
  $('page-prev').disabled = start === 0;
  $('page-next').disabled = ui.page.next >= total || ids.length === 0;
}

function rowOf(i) {
  const dim = num(ui.bank.dim);
  return ui.page.data.subarray(i * dim, (i + 1) * dim);
}

function renderThumbs() {
  const box = $('patterns');
  box.replaceChildren();
  ui.page.ids.forEach((id, i) => {
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'thumb';
    btn.dataset.id = id;
    btn.dataset.index = String(i);
    btn.title = `id ${id}: ${ui.page.payloads[i] || '(no payload)'}`;
    const c = document.createElement('canvas');
    drawVector(c, rowOf(i), ui.shape, ui.range, 56);
    const label = document.createElement('span');
    label.textContent = ui.page.payloads[i] || `#${id}`;
    btn.append(c, label);
    if (ui.original && ui.original.id === id) btn.classList.add('selected');
    btn.addEventListener('click', () => selectPattern(i));
    box.append(btn);
  });
}

function selectPattern(i) {
  const id = ui.page.ids[i];
  ui.original = { id, payload: ui.page.payloads[i], pattern: Float32Array.from(rowOf(i)) };
  for (const el of $('patterns').querySelectorAll('.thumb')) el.classList.toggle('selected', el.dataset.id === id);
  drawVector($('original-canvas'), ui.original.pattern);
  $('original-caption').textContent = `original #${id} ${ui.original.payload ? `“${ui.original.payload}”` : ''}`;
  stopRetrieve();
  ui.retrieve = null;
  recomputeQuery();
  drawVector($('state-canvas'), ui.query);
  $('state-caption').textContent = 'state';
  $('retrieve-result').replaceChildren();
  drawChart();
}

// ---------------------------------------------------------------------------
// Corruption

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function gaussian(rand) {
  const u = Math.max(rand(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
}

function maskGrid() {
  const { w, h } = ui.shape;
  const m = new Uint8Array(w * h);
  for (const r of ui.masks) {
    for (let y = Math.max(0, r.y0); y < Math.min(h, r.y1); y++) {
      for (let x = Math.max(0, r.x0); x < Math.min(w, r.x1); x++) m[y * w + x] = 1;
    }
  }
  return m;
}

// The query: the original with the masked cells filled, a fraction of
// coordinates flipped (negated), then Gaussian noise (bipolar: sign of it).
function recomputeQuery() {
  if (!ui.original) return;
  const x = Float32Array.from(ui.original.pattern);
  const n = x.length;
  const bipolar = ui.bank.kind !== 'STATE_KIND_CONTINUOUS';
  const rand = mulberry32(num($('corrupt-seed').value) * 2654435761 + 12345);
  const [lo, hi] = ui.range;
  const mask = maskGrid();
  const fill = $('mask-fill').value;
  for (let i = 0; i < n; i++) {
    if (!mask[i]) continue;
    if (fill === 'high') x[i] = hi;
    else if (fill === 'random') x[i] = bipolar ? (rand() < 0.5 ? -1 : 1) : lo + rand() * (hi - lo);
    else x[i] = lo;
  }
  const flip = Number($('flip').value);
  const k = Math.round(flip * n);
  const idx = Uint32Array.from({ length: n }, (_, i) => i);
  for (let j = 0; j < k; j++) {
    const r = j + Math.floor(rand() * (n - j));
    const t = idx[j]; idx[j] = idx[r]; idx[r] = t;
    x[idx[j]] = -x[idx[j]];
  }
  const sigma = Number($('noise').value);
  if (sigma > 0) {
    for (let i = 0; i < n; i++) {
      const v = x[i] + sigma * gaussian(rand);
      x[i] = bipolar ? (v >= 0 ? 1 : -1) : v;
    }
  }
  ui.query = x;
  let diff = 0;
  for (let i = 0; i < n; i++) if (x[i] !== ui.original.pattern[i]) diff++;
  ui.queryDiff = diff;
  drawQuery();
  $('query-caption').textContent = `query — ${diff} of ${n} values differ (drag to mask)`;
}

let dragRect = null;

function drawQuery() {
  const canvas = $('query-canvas');
  if (!ui.query) { clearCanvas(canvas); return; }
  const scale = drawVector(canvas, ui.query);
  const ctx = canvas.getContext('2d');
  ctx.lineWidth = 2;
  ctx.strokeStyle = 'rgba(255, 140, 0, 0.9)';
  for (const r of ui.masks) ctx.strokeRect(r.x0 * scale + 1, r.y0 * scale + 1, (r.x1 - r.x0) * scale - 2, (r.y1 - r.y0) * scale - 2);
  if (dragRect) {
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = 'rgba(0, 170, 255, 0.95)';
    ctx.fillStyle = 'rgba(0, 170, 255, 0.18)';
    const r = normRect(dragRect);
    ctx.fillRect(r.x0 * scale, r.y0 * scale, (r.x1 - r.x0) * scale, (r.y1 - r.y0) * scale);
    ctx.strokeRect(r.x0 * scale + 1, r.y0 * scale + 1, (r.x1 - r.x0) * scale - 2, (r.y1 - r.y0) * scale - 2);
    ctx.setLineDash([]);
  }
}

function cellAt(canvas, ev) {
  const rect = canvas.getBoundingClientRect();
  const { w, h } = ui.shape;
  const x = Math.floor(((ev.clientX - rect.left) / rect.width) * w);
  const y = Math.floor(((ev.clientY - rect.top) / rect.height) * h);
  return { x: Math.max(0, Math.min(w - 1, x)), y: Math.max(0, Math.min(h - 1, y)) };
}

function normRect(d) {
  return {
    x0: Math.min(d.a.x, d.b.x), y0: Math.min(d.a.y, d.b.y),
    x1: Math.max(d.a.x, d.b.x) + 1, y1: Math.max(d.a.y, d.b.y) + 1,
  };
}

function installMaskDrag() {
  const canvas = $('query-canvas');
  canvas.addEventListener('pointerdown', (ev) => {
    if (!ui.query || ev.button !== 0) return;
    ev.preventDefault();
    canvas.setPointerCapture(ev.pointerId);
    const c = cellAt(canvas, ev);
    dragRect = { a: c, b: c };
    drawQuery();
  });
  canvas.addEventListener('pointermove', (ev) => {
    if (!dragRect) return;
    dragRect.b = cellAt(canvas, ev);
    drawQuery();
  });
  const finish = (ev) => {
    if (!dragRect) return;
    dragRect.b = cellAt(canvas, ev);
    ui.masks.push(normRect(dragRect));
    dragRect = null;
    recomputeQuery();
  };
  canvas.addEventListener('pointerup', finish);
  canvas.addEventListener('pointercancel', () => { dragRect = null; drawQuery(); });
}

// ---------------------------------------------------------------------------
// Energy chart

function drawChart() {
  const canvas = $('energy-chart');
  const r = ui.retrieve;
  const energies = r ? r.energies : [];
  canvas.dataset.energies = JSON.stringify(energies);
  const ctx = canvas.getContext('2d');
  const W = canvas.width; const H = canvas.height;
  const css = getComputedStyle(document.documentElement);
  const bg = css.getPropertyValue('--chart-bg').trim() || '#fff';
  const fg = css.getPropertyValue('--chart-fg').trim() || '#333';
  const grid = css.getPropertyValue('--chart-grid').trim() || '#ddd';
  const lineColor = css.getPropertyValue('--chart-line').trim() || '#e8590c';
  ctx.fillStyle = bg;
  ctx.fillRect(0, 0, W, H);
  const m = { l: 78, r: 14, t: 22, b: 30 };
  ctx.font = '12px system-ui, sans-serif';
  ctx.fillStyle = fg;
  ctx.fillText('energy per step', m.l, 14);
  const finite = energies.filter(Number.isFinite);
  const ref = r && Number.isFinite(r.originalEnergy) ? r.originalEnergy : null;
  if (!finite.length) {
    ctx.fillStyle = fg;
    ctx.fillText(energies.length ? 'non-finite energies' : 'Retrieve to see the energy fall', m.l + 10, H / 2);
    return;
  }
  let lo = Math.min(...finite, ...(ref !== null ? [ref] : []));
  let hi = Math.max(...finite, ...(ref !== null ? [ref] : []));
  if (hi - lo < 1e-12 * Math.max(1, Math.abs(hi))) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const nSteps = Math.max(1, energies.length - 1);
  const X = (i) => m.l + (i / nSteps) * (W - m.l - m.r);
  const Y = (e) => m.t + ((hi - e) / (hi - lo)) * (H - m.t - m.b);
  ctx.strokeStyle = grid; ctx.lineWidth = 1;
  ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  for (let k = 0; k <= 4; k++) {
    const e = lo + ((hi - lo) * k) / 4;
    const y = Math.round(Y(e)) + 0.5;
    ctx.beginPath(); ctx.moveTo(m.l, y); ctx.lineTo(W - m.r, y); ctx.stroke();
    ctx.fillStyle = fg; ctx.fillText(fmt(e), m.l - 6, y);
  }
  ctx.textAlign = 'center'; ctx.textBaseline = 'top';
  const every = Math.max(1, Math.ceil(nSteps / 10));
  for (let i = 0; i <= nSteps; i += every) ctx.fillText(String(i), X(i), H - m.b + 6);
  ctx.textAlign = 'left'; ctx.textBaseline = 'alphabetic';
  if (ref !== null) {
    ctx.setLineDash([6, 4]); ctx.strokeStyle = '#2f9e44';
    const y = Y(ref);
    ctx.beginPath(); ctx.moveTo(m.l, y); ctx.lineTo(W - m.r, y); ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = '#2f9e44'; ctx.fillText('E(original)', W - m.r - 74, y - 4);
  }
  ctx.strokeStyle = lineColor; ctx.lineWidth = 2.5;
  ctx.beginPath();
  let started = false;
  energies.forEach((e, i) => {
    if (!Number.isFinite(e)) return;
    if (!started) { ctx.moveTo(X(i), Y(e)); started = true; } else ctx.lineTo(X(i), Y(e));
  });
  ctx.stroke();
  ctx.fillStyle = lineColor;
  energies.forEach((e, i) => {
    if (!Number.isFinite(e)) return;
    ctx.beginPath(); ctx.arc(X(i), Y(e), 4, 0, 2 * Math.PI); ctx.fill();
  });
}

// ---------------------------------------------------------------------------
// Retrieval, one Retrieve call (max_steps = 1) per step

let retrieveGen = 0;
let retrieveAbort = null;

function stopRetrieve() {
  retrieveGen++;
  if (retrieveAbort) retrieveAbort.abort();
  retrieveAbort = null;
  if (ui.retrieve && ui.retrieve.running) { ui.retrieve.running = false; ui.retrieve.stopped = true; }
  $('stop-retrieve').disabled = true;
  $('retrieve').disabled = false;
}

function sameVector(a, b, tol = 0) {
  if (!a || !b || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!(Math.abs(a[i] - b[i]) <= tol)) return false;
  return true;
}

async function runRetrieve() {
  if (!ui.bank || !ui.original || !ui.query) throw new Error('pick a stored pattern first');
  stopRetrieve();
  const gen = ++retrieveGen;
  const abort = new AbortController();
  retrieveAbort = abort;
  const bank = ui.bank.name;
  const dim = num(ui.bank.dim);
  const cap = Math.max(1, Math.min(1000, num($('step-cap').value, 60)));
  const delay = num($('step-delay').value, 0);
  const dynamics = $('dynamics').value;
  const clamp = $('clamp').checked ? Array.from(maskGrid().subarray(0, dim), (m) => !m) : undefined;
  const r = {
    running: true, done: false, query: Array.from(ui.query), state: Float32Array.from(ui.query),
    energies: [], steps: 0, calls: 0, stopReason: '', nearest: null, equalsOriginal: false,
    originalEnergy: null, lyapunovViolations: 0, dynamics, clamp: !!clamp,
  };
  ui.retrieve = r;
  $('retrieve').disabled = true;
  $('stop-retrieve').disabled = false;
  $('retrieve-result').replaceChildren();
  drawVector($('state-canvas'), r.state);
  drawChart();
  setStatus('busy', `Retrieving from ${bank}…`);
  try {
    try {
      const e = await api('Energy', { bank, states: Array.from(ui.original.pattern) }, { signal: abort.signal });
      r.originalEnergy = num((e.energies || [])[0], NaN);
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      r.originalEnergy = null;
    }
    for (let i = 0; i < cap; i++) {
      const req = {
        bank,
        queries: Array.from(r.state),
        options: { dynamics, maxSteps: 1, returnTrace: true, seed: String(i + 1) },
      };
      if (clamp) req.clamp = clamp;
      const res = await api('Retrieve', req, { signal: abort.signal });
      if (gen !== retrieveGen) return;
      const x = (res.results || [])[0];
      if (!x) throw new ApiError(0, 'INTERNAL', 'Retrieve returned no result');
      r.calls++;
      const trace = (x.energyTrace || []).map(Number);
      const steps = num(x.steps);
      if (r.energies.length === 0) r.energies.push(trace.length ? trace[0] : num(x.energyStart));
      if (steps > 0) r.energies.push(trace.length > 1 ? trace[trace.length - 1] : num(x.energyEnd));
      r.steps += steps;
      r.lyapunovViolations += num(x.lyapunovViolations);
      r.state = floats(x.state);
      r.nearest = x.nearest || null;
      r.stopReason = x.stopReason || '';
      drawVector($('state-canvas'), r.state);
      drawChart();
      $('state-caption').textContent = `step ${r.steps} · E = ${fmt(r.energies[r.energies.length - 1])} · ${enumName(r.stopReason, 'STOP_REASON_')}`;
      renderRetrieveResult();
      if (r.stopReason !== 'STOP_REASON_MAX_STEPS' || steps === 0) break;
      if (delay > 0) await sleep(delay);
      if (gen !== retrieveGen) return;
    }
    const bipolar = ui.bank.kind !== 'STATE_KIND_CONTINUOUS';
    const scaleTol = bipolar ? 0 : 1e-3 * Math.max(1, ...Array.from(ui.original.pattern, Math.abs));
    r.equalsOriginal = sameVector(r.state, ui.original.pattern, scaleTol);
    // Within delta_memorized's default (0.05 relative distance) of the original.
    let norm = 0;
    for (const v of ui.original.pattern) norm += v * v;
    r.relativeDistance = r.nearest ? num(r.nearest.distance) / Math.sqrt(norm || 1) : Infinity;
    r.closeToOriginal = !r.equalsOriginal && !!r.nearest && r.nearest.id === ui.original.id && r.relativeDistance < 0.05;
    r.running = false;
    r.done = true;
    renderRetrieveResult();
    const why = enumName(r.stopReason, 'STOP_REASON_') || 'stopped';
    const outcome = r.equalsOriginal ? 'recalled the original'
      : r.closeToOriginal ? 'close to the original' : 'did not recall the original';
    setStatus('ok', `Retrieve: ${r.steps} step${r.steps === 1 ? '' : 's'}, ${why}; ${outcome}.`);
  } catch (e) {
    if (gen === retrieveGen) { r.running = false; r.done = true; r.error = String(e); }
    throw e;
  } finally {
    if (gen === retrieveGen) {
      $('retrieve').disabled = false;
      $('stop-retrieve').disabled = true;
      retrieveAbort = null;
    }
  }
}

function renderRetrieveResult() {
  const r = ui.retrieve;
  const box = $('retrieve-result');
  box.replaceChildren();
  if (!r) return;
  const line = (label, value, cls) => {
    const div = document.createElement('div');
    if (cls) div.className = cls;
    const b = document.createElement('b'); b.textContent = `${label} `;
    const s = document.createElement('span'); s.textContent = value;
    div.append(b, s);
    box.append(div);
    return div;
  };
  const e0 = r.energies[0]; const e1 = r.energies[r.energies.length - 1];
  line('energy', `${fmt(e0)} → ${fmt(e1)} in ${r.steps} step${r.steps === 1 ? '' : 's'} (${r.calls} call${r.calls === 1 ? '' : 's'})`
    + (Number.isFinite(r.originalEnergy) ? `; E(original) = ${fmt(r.originalEnergy)}` : ''));
  line('stop', enumName(r.stopReason, 'STOP_REASON_') || '—');
  if (r.nearest) {
    const p = payloadText(r.nearest.payload);
    const nearestLine = line('nearest memory', `#${r.nearest.id} ${p ? `“${p}”` : ''} · distance ${fmt(num(r.nearest.distance))} · overlap ${fmt(num(r.nearest.similarity))}`);
    nearestLine.id = 'nearest';
    nearestLine.dataset.id = r.nearest.id;
  } else {
    line('nearest memory', 'none (empty bank)');
  }
  if (r.lyapunovViolations) line('Lyapunov violations', String(r.lyapunovViolations), 'bad');
  if (r.done) {
    const nearestIsOriginal = r.nearest && r.nearest.id === ui.original.id;
    const rel = r.relativeDistance;
    const close = r.closeToOriginal;
    const verdict = r.equalsOriginal
      ? '✓ the state equals the original pattern'
      : close ? `≈ the state is within ${Number((rel * 100).toPrecision(3))} % of the original (relative distance)`
        : nearestIsOriginal ? '≈ nearest is the original, but the state differs from it'
          : '✗ fell into another attractor';
    const v = line('recall', verdict, r.equalsOriginal || close ? 'good' : 'bad');
    v.id = 'recall-verdict';
    v.dataset.equal = String(r.equalsOriginal);
  }
}

// ---------------------------------------------------------------------------
// Sampling over SampleStream

let sampleAbort = null;
let playTimer = null;

function stopPlayer() {
  if (playTimer) clearTimeout(playTimer);
  playTimer = null;
}

function sampleClassName(c) {
  return enumName(c, 'SAMPLE_CLASS_') || 'unspecified';
}

function renderSampleGrid(count) {
  const box = $('samples');
  box.replaceChildren();
  for (let i = 0; i < count; i++) {
    const fig = document.createElement('figure');
    fig.className = 'sample';
    const c = document.createElement('canvas');
    c.width = 112; c.height = 112;
    const cap = document.createElement('figcaption');
    cap.textContent = `sample ${i + 1}`;
    fig.append(c, cap);
    box.append(fig);
  }
}

function showFrame(j) {
  const s = ui.sample;
  if (!s || !s.frames.length) return;
  j = Math.max(0, Math.min(s.frames.length - 1, j));
  s.shownFrame = j;
  const f = s.frames[j];
  const dim = num(ui.bank.dim);
  const canvases = $('samples').querySelectorAll('canvas');
  canvases.forEach((c, i) => {
    const st = f.states.subarray(i * dim, (i + 1) * dim);
    if (st.length === dim) drawVector(c, st, ui.shape, ui.range, 112);
  });
  $('sample-scrub').max = String(s.frames.length - 1);
  $('sample-scrub').value = String(j);
  $('sample-frame-info').textContent = `frame ${j + 1} / ${s.frames.length}${s.streaming ? '+' : ''} · step ${f.step} · σ = ${fmt(f.sigma)}`;
}

// Advances the shown frame at a steady pace until it reaches the last frame of
// a finished stream, then shows the classes.
function play(fromStart = false) {
  const s = ui.sample;
  stopPlayer();
  if (fromStart) s.shownFrame = -1;
  s.playing = true;
  const tick = () => {
    if (ui.sample !== s) return;
    if (s.shownFrame < s.frames.length - 1) {
      showFrame(s.shownFrame + 1);
      s.framesShown++;
    } else if (!s.streaming) {
      s.playing = false;
      playTimer = null;
      if (s.result) renderSampleResult();
      s.done = true;
      return;
    }
    const interval = Math.max(16, Math.min(120, 2400 / Math.max(1, s.expectedFrames)));
    playTimer = setTimeout(tick, interval);
  };
  tick();
}

function renderSampleResult() {
  const s = ui.sample;
  const samples = (s.result && s.result.samples) || [];
  s.classes = samples.map((x) => sampleClassName(x.sampleClass));
  s.nearest = samples.map((x) => (x.nearest ? { id: x.nearest.id, payload: payloadText(x.nearest.payload) } : null));
  const figs = $('samples').querySelectorAll('figure');
  const dim = num(ui.bank.dim);
  samples.forEach((x, i) => {
    const fig = figs[i];
    if (!fig) return;
    const st = floats(x.state);
    if (st.length === dim && s.shownFrame === s.frames.length - 1) drawVector(fig.querySelector('canvas'), st, ui.shape, ui.range, 112);
    const cap = fig.querySelector('figcaption');
    cap.replaceChildren();
    const cls = s.classes[i];
    const badge = document.createElement('span');
    badge.className = `badge sample-class ${cls}`;
    badge.textContent = cls;
    const near = document.createElement('span');
    near.className = 'sample-nearest';
    const nm = s.nearest[i];
    near.textContent = nm
      ? `#${nm.id} ${nm.payload ? `“${nm.payload}”` : ''}${x.mirrored ? ' (mirrored)' : ''} · d=${fmt(num(x.relativeDistance))}`
      : 'no memory';
    const flags = document.createElement('span');
    flags.className = 'muted';
    flags.textContent = [x.fixedPoint ? 'fixed point' : '', x.spuriousFixedPoint ? 'spurious fixed point' : ''].filter(Boolean).join(' · ');
    cap.append(badge, near, flags);
  });
  const counts = {};
  for (const c of s.classes) counts[c] = (counts[c] || 0) + 1;
  const summary = Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(', ');
  setStatus('ok', `Sample: ${samples.length} samples in ${num(s.result.steps)} steps, ${s.framesReceived} frames streamed — ${summary}.`);
}

async function runSample() {
  if (!ui.bank) throw new Error('select a bank first');
  if (sampleAbort) sampleAbort.abort();
  stopPlayer();
  const abort = new AbortController();
  sampleAbort = abort;
  const dim = num(ui.bank.dim);
  const count = Math.max(1, Math.min(64, num($('sample-count').value, 6)));
  const steps = Math.max(1, num($('sample-steps').value, 32));
  const every = Math.max(1, num($('trajectory-every').value, 1));
  const req = {
    bank: ui.bank.name, count, seed: String(num($('sample-seed').value)),
    schedule: { steps }, trajectoryEvery: every,
  };
  if ($('sampler').value) req.sampler = $('sampler').value;
  if ($('sample-energy').value) req.energy = { family: $('sample-energy').value };
  if ($('sample-start').value === 'query') {
    if (!ui.query) throw new Error('pick a pattern to start from its query');
    req.query = Array.from(ui.query);
    req.sigmaStart = num($('sigma-start').value);
  }
  const s = {
    running: true, streaming: true, done: false, frames: [], framesReceived: 0, framesShown: 0,
    shownFrame: -1, result: null, classes: [], nearest: [], count, expectedFrames: Math.ceil(steps / every) + 2,
    request: req,
  };
  ui.sample = s;
  renderSampleGrid(count);
  $('sample').disabled = true;
  $('stop-sample').disabled = false;
  $('replay').disabled = true;
  $('sample-scrub').disabled = true;
  setStatus('busy', `Sampling ${count} from ${ui.bank.name}…`);
  play();
  try {
    await streamNdjson('SampleStream', req, {
      signal: abort.signal,
      onObject: (f) => {
        s.framesReceived++;
        let states = floats(f.states);
        if (f.result) s.result = f.result;
        if (states.length !== count * dim && f.result) {
          states = new Float32Array(count * dim);
          (f.result.samples || []).forEach((x, i) => states.set(floats(x.state).subarray(0, dim), i * dim));
        }
        if (states.length === count * dim) s.frames.push({ step: num(f.step), sigma: num(f.sigma), states });
      },
    });
    if (!s.result) throw new ApiError(0, 'INTERNAL', 'the stream ended without a result frame');
  } catch (e) {
    s.error = String(e);
    s.done = true;
    throw e;
  } finally {
    s.streaming = false;
    s.running = false;
    if (sampleAbort === abort) sampleAbort = null;
    $('sample').disabled = false;
    $('stop-sample').disabled = true;
    $('replay').disabled = !(s.result || s.frames.length);
    $('sample-scrub').disabled = s.frames.length === 0;
  }
}

// Replays the trajectory recorded in the result (every sample's
// TrajectoryPoints), or the streamed frames when the result has none.
function replay() {
  const s = ui.sample;
  if (!s) return;
  const dim = num(ui.bank.dim);
  const samples = (s.result && s.result.samples) || [];
  const len = samples.length ? Math.min(...samples.map((x) => (x.trajectory || []).length)) : 0;
  if (len > 0) {
    const frames = [];
    for (let j = 0; j < len; j++) {
      const states = new Float32Array(samples.length * dim);
      samples.forEach((x, i) => states.set(floats(x.trajectory[j].state).subarray(0, dim), i * dim));
      const p = samples[0].trajectory[j];
      frames.push({ step: num(p.step), sigma: num(p.sigma), states });
    }
    s.frames = frames;
    s.replayedFromTrajectory = true;
  }
  s.expectedFrames = s.frames.length;
  s.done = false;
  play(true);
}

// ---------------------------------------------------------------------------
// Wiring

function bindOutputs() {
  const flip = () => { $('flip-value').textContent = `${Math.round(Number($('flip').value) * 100)} %`; };
  const noise = () => { $('noise-value').textContent = fmt(Number($('noise').value)); };
  const delay = () => { $('step-delay-value').textContent = `${$('step-delay').value} ms`; };
  flip(); noise(); delay();
  $('flip').addEventListener('input', () => { flip(); recomputeQuery(); });
  $('noise').addEventListener('input', () => { noise(); recomputeQuery(); });
  $('step-delay').addEventListener('input', delay);
  $('mask-fill').addEventListener('change', recomputeQuery);
  $('corrupt-seed').addEventListener('input', recomputeQuery);
  $('clear-mask').addEventListener('click', () => { ui.masks = []; recomputeQuery(); });
}

function init() {
  const token = $('token');
  token.value = localStorage.getItem(TOKEN_KEY) || '';
  token.addEventListener('change', guard(async () => {
    const v = token.value.trim();
    if (v) localStorage.setItem(TOKEN_KEY, v); else localStorage.removeItem(TOKEN_KEY);
    await refreshBanks();
    setStatus('ok', `Token ${v ? 'saved' : 'cleared'}; ${ui.banks.length} bank${ui.banks.length === 1 ? '' : 's'}.`);
  }));
  $('refresh-banks').addEventListener('click', guard(async () => {
    await refreshBanks();
    if (ui.bank && ui.banks.some((b) => b.name === ui.bank.name)) await selectBank(ui.bank.name);
  }));
  $('demo-create').addEventListener('click', guard(createDemo));
  $('page-prev').addEventListener('click', guard(async () => {
    const prev = ui.page.history.pop();
    await loadPage(prev !== undefined ? prev : Math.max(0, ui.page.start - ui.page.size));
  }));
  $('page-next').addEventListener('click', guard(async () => {
    ui.page.history.push(ui.page.start);
    await loadPage(ui.page.next);
  }));
  $('retrieve').addEventListener('click', guard(runRetrieve));
  $('stop-retrieve').addEventListener('click', () => { stopRetrieve(); setStatus('ok', 'Retrieve stopped.'); });
  $('sample').addEventListener('click', guard(runSample));
  $('stop-sample').addEventListener('click', () => { if (sampleAbort) sampleAbort.abort(); setStatus('ok', 'Sampling stopped.'); });
  $('replay').addEventListener('click', replay);
  $('sample-scrub').addEventListener('input', () => {
    stopPlayer();
    if (ui.sample) ui.sample.playing = false;
    showFrame(Number($('sample-scrub').value));
  });
  bindOutputs();
  installMaskDrag();
  drawChart();
  guard(async () => {
    setStatus('busy', 'Listing banks…');
    const banks = await refreshBanks();
    const saved = localStorage.getItem(BANK_KEY);
    const pick = banks.find((b) => b.name === saved) || banks[0];
    if (pick) await selectBank(pick.name);
    ui.ready = true;
  })().finally(() => { ui.ready = true; });
}

init();
