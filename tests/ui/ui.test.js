'use strict';
// Browser test of the web page in ui/: a real engramd (ENGRAMD) serving the
// page and the JSON gateway, driven through Debian's headless Chromium with
// playwright-core.
//
// Environment:
//   ENGRAMD         path of the engramd binary (required)
//   ENGRAM_UI_DIR   the page's directory (default: ../../ui beside this file)
//   ENGRAM_UI_OUT   where screenshots go (default: a new temporary directory)
//   CHROMIUM        the browser (default: /usr/bin/chromium)

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');
const { PNG } = require('pngjs');
const { chromium } = require('playwright-core');

const ENGRAMD = process.env.ENGRAMD;
const UI_DIR = path.resolve(process.env.ENGRAM_UI_DIR || path.join(__dirname, '..', '..', 'ui'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const OUT_DIR = process.env.ENGRAM_UI_OUT
  ? path.resolve(process.env.ENGRAM_UI_OUT)
  : fs.mkdtempSync(path.join(os.tmpdir(), 'engram-ui-shots-'));
const TOKEN = `ui-${crypto.randomBytes(9).toString('hex')}`;
const DEMO_BANK = 'demo-bipolar';
const VIEWPORT = { width: 1440, height: 1300 };

let server = null;      // {proc, base, dataDir, log}
let browser = null;
let page = null;
const pageErrors = [];

// ---------------------------------------------------------------------------
// engramd

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function killServer() {
  if (server && server.proc.exitCode === null && server.proc.signalCode === null) {
    try { server.proc.kill('SIGKILL'); } catch { /* already gone */ }
  }
}
process.on('exit', killServer);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => { killServer(); process.exit(130); });
}

async function startServer() {
  assert.ok(ENGRAMD, 'set ENGRAMD to the engramd binary');
  assert.ok(fs.existsSync(ENGRAMD), `ENGRAMD=${ENGRAMD} does not exist`);
  assert.ok(fs.existsSync(path.join(UI_DIR, 'index.html')), `${UI_DIR}/index.html is missing`);
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'engram-ui-data-'));
  const tokenFile = path.join(dataDir, 'token');
  fs.writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
  const [grpcPort, metricsPort, httpPort] = [await freePort(), await freePort(), await freePort()];
  const args = [
    `--listen=127.0.0.1:${grpcPort}`,
    `--metrics_listen=127.0.0.1:${metricsPort}`,
    `--http_listen=127.0.0.1:${httpPort}`,
    `--http_ui_dir=${UI_DIR}`,
    `--data_dir=${path.join(dataDir, 'data')}`,
    `--auth_token_file=${tokenFile}`,
  ];
  const proc = spawn(ENGRAMD, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  const keep = (chunk) => { log.push(chunk.toString()); if (log.length > 400) log.shift(); };
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  server = { proc, base: `http://127.0.0.1:${httpPort}`, dataDir, log };
  const deadline = Date.now() + 30000;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`engramd exited (${proc.exitCode ?? proc.signalCode}):\n${log.join('')}`);
    }
    try {
      const res = await fetch(`${server.base}/v1/ListBanks`, {
        method: 'POST', headers: authHeaders(), body: '{}', signal: AbortSignal.timeout(2000),
      });
      if (res.status === 200) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error(`engramd did not serve HTTP within 30 s:\n${log.join('')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function stopServer() {
  if (!server) return;
  const { proc } = server;
  if (proc.exitCode === null && proc.signalCode === null) {
    const exited = new Promise((r) => proc.once('exit', r));
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
  fs.rmSync(server.dataDir, { recursive: true, force: true });
}

function authHeaders() {
  return { 'Content-Type': 'application/json', Authorization: `Bearer ${TOKEN}` };
}

// POST /v1/{method} straight to the gateway (not through the page).
async function call(method, body) {
  const res = await fetch(`${server.base}/v1/${method}`, {
    method: 'POST', headers: authHeaders(), body: JSON.stringify(body), signal: AbortSignal.timeout(20000),
  });
  const text = await res.text();
  assert.equal(res.status, 200, `${method}: HTTP ${res.status} ${text}`);
  return JSON.parse(text);
}

// ---------------------------------------------------------------------------
// Screenshots

function decodePng(file) {
  return PNG.sync.read(fs.readFileSync(file));
}

// Pixel statistics of the region of `png` under the element `selector`.
async function regionStats(png, selector, { scrollX = 0, scrollY = 0 } = {}) {
  const box = await page.locator(selector).first().boundingBox();
  assert.ok(box, `${selector} is not visible`);
  const x0 = Math.max(0, Math.floor(box.x + scrollX + 2));
  const y0 = Math.max(0, Math.floor(box.y + scrollY + 2));
  const x1 = Math.min(png.width, Math.ceil(box.x + scrollX + box.width - 2));
  const y1 = Math.min(png.height, Math.ceil(box.y + scrollY + box.height - 2));
  const stats = { pixels: 0, dark: 0, light: 0, colored: 0, nonWhite: 0, lineColor: 0 };
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const p = (y * png.width + x) * 4;
      const r = png.data[p]; const g = png.data[p + 1]; const b = png.data[p + 2];
      const lum = 0.299 * r + 0.587 * g + 0.114 * b;
      stats.pixels++;
      if (lum < 70) stats.dark++;
      if (lum > 200) stats.light++;
      if (Math.max(r, g, b) - Math.min(r, g, b) > 60) stats.colored++;
      if (lum < 235) stats.nonWhite++;
      // The chart's line colour, #e8590c.
      if (Math.abs(r - 232) < 40 && Math.abs(g - 89) < 40 && Math.abs(b - 12) < 40) stats.lineColor++;
    }
  }
  return stats;
}

async function screenshot(name) {
  const file = path.join(OUT_DIR, `${name}.png`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

// ---------------------------------------------------------------------------
// Helpers on the page

const uiState = (fn, arg) => page.evaluate(fn, arg);

async function setRange(selector, value) {
  await page.evaluate(([sel, v]) => {
    const el = document.querySelector(sel);
    el.value = String(v);
    el.dispatchEvent(new Event('input', { bubbles: true }));
  }, [selector, value]);
}

async function waitStatus(kind, pattern, timeout = 15000) {
  await page.waitForFunction(([k, src]) => {
    const el = document.getElementById('status');
    return el && el.dataset.kind === k && new RegExp(src).test(el.textContent);
  }, [kind, pattern.source], { timeout });
}

function nonIncreasing(energies, relTol = 1e-6) {
  for (let i = 1; i < energies.length; i++) {
    const tol = relTol * Math.max(1, Math.abs(energies[i - 1]));
    if (!(energies[i] <= energies[i - 1] + tol)) return `step ${i}: ${energies[i - 1]} -> ${energies[i]}`;
  }
  return null;
}

// ---------------------------------------------------------------------------

before(async () => {
  fs.mkdirSync(OUT_DIR, { recursive: true });
  await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // No connections beyond loopback: the machine's network is closed.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: VIEWPORT, deviceScaleFactor: 1 });
  page = await context.newPage();
  page.setDefaultTimeout(20000);
  page.on('pageerror', (e) => pageErrors.push(String(e)));
});

after(async () => {
  try { if (browser) await browser.close(); } finally {
    await stopServer();
    console.log(`# screenshots in ${OUT_DIR}`);
  }
});

test('the page loads from / and shows the server error without a token', async () => {
  const res = await page.goto(`${server.base}/`);
  assert.ok(res.ok(), `GET / answered ${res.status()}`);
  assert.match(page.url(), /\/ui\/(index\.html)?$/);
  assert.equal(await page.title(), 'Engram — memories');
  // Without the token ListBanks is refused: the status line carries the server's code and message.
  await waitStatus('error', /UNAUTHENTICATED/);
  const text = await page.locator('#status').textContent();
  assert.match(text, /401/);
});

test('the token is sent, kept in localStorage and survives a reload', async () => {
  await page.fill('#token', TOKEN);
  await page.press('#token', 'Tab');
  await waitStatus('ok', /0 banks/);
  await page.reload();
  assert.equal(await page.inputValue('#token'), TOKEN);
  await waitStatus('ok', /0 banks/);
  assert.equal(await page.locator('#banks-empty').isVisible(), true);
});

test('the demo bank is created through the page and listed with its capacity', async () => {
  await page.selectOption('#demo-kind', 'bipolar');
  await page.click('#demo-create');
  await page.waitForSelector(`#banks tbody tr[data-bank="${DEMO_BANK}"]`);
  await page.waitForFunction(() => document.querySelectorAll('#patterns .thumb').length >= 10);
  const row = await page.locator(`#banks tbody tr[data-bank="${DEMO_BANK}"]`).innerText();
  assert.match(row, /784/);
  assert.match(row, /bipolar/);
  assert.match(row, /\b10\b/);
  assert.equal(await page.locator(`#banks tbody tr[data-bank="${DEMO_BANK}"] .gauge .fill`).count(), 1);

  const info = await call('GetBank', { name: DEMO_BANK });
  assert.equal(info.dim, 784);
  assert.equal(info.kind, 'STATE_KIND_BIPOLAR');
  assert.equal(String(info.patterns), '10');
  assert.ok(Number(info.capacity.patterns) > 0);
  const thumbs = await page.locator('#patterns .thumb span').allInnerTexts();
  const stored = await call('GetPatterns', { bank: DEMO_BANK });
  const payloads = stored.payloads.map((p) => Buffer.from(p, 'base64').toString('utf8'));
  assert.deepEqual(thumbs, payloads);
  assert.ok(payloads.includes('letter G') && payloads.includes('disk'), payloads.join(', '));
  for (const v of stored.patterns) assert.ok(v === 1 || v === -1);
});

let recall = null;  // what the page reports after Retrieve

test('a pattern is corrupted by a dragged mask and flipped pixels, then recalled step by step', async () => {
  await page.locator('#patterns .thumb', { hasText: 'letter G' }).click();
  await page.waitForFunction(() => window.engramUi.original && window.engramUi.original.payload === 'letter G');
  const orig = await uiState(() => ({ id: window.engramUi.original.id, pattern: Array.from(window.engramUi.original.pattern) }));

  // Drag a rectangle over the upper left part of the query canvas.
  const box = await page.locator('#query-canvas').boundingBox();
  const at = (fx, fy) => [box.x + fx * box.width, box.y + fy * box.height];
  await page.mouse.move(...at(0.2, 0.12));
  await page.mouse.down();
  for (let k = 1; k <= 8; k++) await page.mouse.move(...at(0.2 + (0.4 * k) / 8, 0.12 + (0.4 * k) / 8));
  await page.mouse.up();
  await setRange('#flip', 0.12);
  await setRange('#step-delay', 60);

  const corrupted = await uiState(() => ({
    masks: window.engramUi.masks, query: Array.from(window.engramUi.query), diff: window.engramUi.queryDiff,
  }));
  assert.equal(corrupted.masks.length, 1, JSON.stringify(corrupted.masks));
  const m = corrupted.masks[0];
  assert.ok(m.x1 - m.x0 >= 8 && m.y1 - m.y0 >= 8, `mask ${JSON.stringify(m)}`);
  for (const v of corrupted.query) assert.ok(v === 1 || v === -1);
  // Masked-out ink: every masked cell is -1 unless flipped afterwards; flips: ~12 % of 784.
  assert.ok(corrupted.diff >= 0.12 * 784 * 0.8, `only ${corrupted.diff} values differ`);
  assert.notDeepEqual(corrupted.query, orig.pattern);

  await page.click('#retrieve');
  await page.waitForFunction(() => window.engramUi.retrieve && window.engramUi.retrieve.done, null, { timeout: 30000 });
  recall = await uiState(() => {
    const r = window.engramUi.retrieve;
    return {
      query: r.query, state: Array.from(r.state), energies: r.energies, steps: r.steps, stopReason: r.stopReason,
      equalsOriginal: r.equalsOriginal, nearest: r.nearest, error: r.error || null, dynamics: r.dynamics,
      chart: JSON.parse(document.getElementById('energy-chart').dataset.energies),
      verdict: document.getElementById('recall-verdict')?.dataset.equal,
    };
  });
  assert.equal(recall.error, null);
  assert.deepEqual(recall.query, corrupted.query);

  // The energy curve: at least two points, never rising.
  assert.ok(recall.energies.length >= 2, `energies ${JSON.stringify(recall.energies)}`);
  assert.deepEqual(recall.chart, recall.energies);
  assert.equal(nonIncreasing(recall.energies), null);
  assert.ok(recall.energies[recall.energies.length - 1] < recall.energies[0]);
  assert.equal(recall.stopReason, 'STOP_REASON_CONVERGED');
  assert.equal(recall.steps, recall.energies.length - 1);

  // The recalled state is the stored pattern, bit for bit.
  const back = await call('GetPatterns', { bank: DEMO_BANK, ids: [orig.id] });
  assert.deepEqual(recall.state, back.patterns);
  assert.equal(recall.equalsOriginal, true);
  assert.equal(recall.verdict, 'true');
  assert.equal(recall.nearest.id, orig.id);
  assert.equal(Buffer.from(recall.nearest.payload, 'base64').toString(), 'letter G');
  assert.match(await page.locator('#nearest').innerText(), /letter G/);

  // The same query through the API directly: one step per call as the page does ...
  let x = recall.query;
  const energies = [];
  for (let i = 0; i < 100; i++) {
    const res = await call('Retrieve', {
      bank: DEMO_BANK, queries: x,
      options: { dynamics: recall.dynamics, maxSteps: 1, returnTrace: true, seed: String(i + 1) },
    });
    const r = res.results[0];
    if (!energies.length) energies.push(r.energyTrace[0]);
    if (r.steps > 0) energies.push(r.energyTrace[r.energyTrace.length - 1]);
    x = r.state;
    if (r.stopReason !== 'STOP_REASON_MAX_STEPS' || r.steps === 0) break;
  }
  assert.deepEqual(energies, recall.energies);
  assert.deepEqual(x, recall.state);
  // ... and in a single call with the whole trace.
  const one = (await call('Retrieve', {
    bank: DEMO_BANK, queries: recall.query, options: { dynamics: recall.dynamics, returnTrace: true },
  })).results[0];
  assert.equal(one.stopReason, 'STOP_REASON_CONVERGED');
  assert.deepEqual(one.state, recall.state);
  assert.equal(one.lyapunovViolations, 0);
  assert.equal(nonIncreasing(one.energyTrace), null);
  const close = (a, b) => Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(a));
  assert.ok(close(one.energyTrace[0], recall.energies[0]), `${one.energyTrace[0]} vs ${recall.energies[0]}`);
  assert.ok(close(one.energyEnd, recall.energies[recall.energies.length - 1]));

  // The screenshot shows the recalled image and the drawn curve.
  const png = decodePng(await screenshot('recall'));
  const state = await regionStats(png, '#state-canvas');
  assert.ok(state.dark > 0.05 * state.pixels && state.light > 0.05 * state.pixels, `state canvas ${JSON.stringify(state)}`);
  const query = await regionStats(png, '#query-canvas');
  assert.ok(query.dark > 0 && query.light > 0 && query.colored > 0, `query canvas ${JSON.stringify(query)}`);
  const chart = await regionStats(png, '#energy-chart');
  assert.ok(chart.lineColor > 60, `energy chart ${JSON.stringify(chart)}`);
  assert.ok(chart.nonWhite > 300, `energy chart ${JSON.stringify(chart)}`);
});

test('sampling streams frames, animates them and shows every sample class', async () => {
  await page.fill('#sample-count', '4');
  await page.fill('#sample-steps', '24');
  await page.fill('#trajectory-every', '1');
  await page.fill('#sample-seed', '7');
  await page.click('#sample');
  await page.waitForFunction(() => window.engramUi.sample && window.engramUi.sample.done, null, { timeout: 40000 });
  const s = await uiState(() => {
    const x = window.engramUi.sample;
    return {
      error: x.error || null, framesReceived: x.framesReceived, frames: x.frames.length, framesShown: x.framesShown,
      shownFrame: x.shownFrame, classes: x.classes, nearest: x.nearest, request: x.request,
      first: Array.from(x.frames[0].states), last: Array.from(x.frames[x.frames.length - 1].states),
      badges: Array.from(document.querySelectorAll('#samples .sample-class'), (e) => e.textContent),
      info: document.getElementById('sample-frame-info').textContent,
    };
  });
  assert.equal(s.error, null);
  assert.ok(s.framesReceived >= 3, `${s.framesReceived} frames`);
  assert.ok(s.framesShown >= 3, `${s.framesShown} frames shown`);
  assert.equal(s.shownFrame, s.frames - 1);
  assert.notDeepEqual(s.first, s.last);
  assert.equal(s.classes.length, 4);
  for (const c of s.classes) assert.ok(['memorized', 'spurious', 'novel'].includes(c), c);
  assert.deepEqual(s.badges, s.classes);
  for (const n of s.nearest) assert.ok(n && n.id, JSON.stringify(s.nearest));
  assert.match(s.info, /frame \d+ \/ \d+/);
  await waitStatus('ok', /Sample: 4 samples/);

  // The seed reproduces the samples: the same request through the unary API.
  const res = await call('Sample', s.request);
  const classes = res.samples.map((x) => x.sampleClass.replace('SAMPLE_CLASS_', '').toLowerCase());
  assert.deepEqual(classes, s.classes);
  assert.deepEqual(res.samples.map((x) => x.nearest.id), s.nearest.map((n) => n.id));
  assert.ok(res.samples[0].trajectory.length >= 3);

  const png = decodePng(await screenshot('sample'));
  const grid = await regionStats(png, '#samples');
  assert.ok(grid.dark > 500 && grid.light > 500, `samples ${JSON.stringify(grid)}`);

  // Replay from the trajectory recorded in the result.
  await page.click('#replay');
  await page.waitForFunction(() => window.engramUi.sample.replayedFromTrajectory && window.engramUi.sample.done
    && window.engramUi.sample.shownFrame === window.engramUi.sample.frames.length - 1, null, { timeout: 20000 });
  const frames = await uiState(() => window.engramUi.sample.frames.length);
  assert.equal(frames, res.samples[0].trajectory.length);
});

test('a call the server rejects shows its code and message', async () => {
  await page.selectOption('#dynamics', 'DYNAMICS_GRADIENT');
  await page.click('#retrieve');
  await waitStatus('error', /FAILED_PRECONDITION|INVALID_ARGUMENT/);
  const text = await page.locator('#status').innerText();
  assert.match(text, /HTTP 400/);
  assert.ok(text.length > 40, text);
  await page.selectOption('#dynamics', 'DYNAMICS_SYNC');
  assert.deepEqual(pageErrors, []);
});

test('a continuous demo bank recalls a noisy pattern with the energy falling', async () => {
  await page.selectOption('#demo-kind', 'continuous');
  // The new bank's first page arrives late: until it does, the previous bank's
  // thumbnails must be gone, so that nothing picked meanwhile is overwritten.
  const slowPage = async (route) => { await new Promise((r) => setTimeout(r, 600)); await route.continue(); };
  await page.route('**/v1/GetPatterns', slowPage);
  await page.click('#demo-create');
  await page.waitForSelector('#banks tbody tr[data-bank="demo-continuous"].selected');
  assert.equal(await page.locator('#patterns .thumb').count(), 0, 'the previous bank\'s thumbnails are still shown');
  await page.waitForFunction(() => window.engramUi.bank.name === 'demo-continuous'
    && window.engramUi.page.bank === 'demo-continuous' && document.querySelectorAll('#patterns .thumb').length >= 10);
  await page.unroute('**/v1/GetPatterns', slowPage);
  await page.locator('#patterns .thumb', { hasText: 'disk' }).click();
  await page.waitForFunction(() => window.engramUi.original && window.engramUi.original.payload === 'disk');
  await page.click('#clear-mask');
  await setRange('#flip', 0);
  await setRange('#noise', 0.8);
  await page.click('#retrieve');
  await page.waitForFunction(() => window.engramUi.retrieve && window.engramUi.retrieve.done, null, { timeout: 30000 });
  const r = await uiState(() => {
    const x = window.engramUi.retrieve;
    return {
      id: window.engramUi.original.id, query: x.query, state: Array.from(x.state), energies: x.energies,
      error: x.error || null, equal: x.equalsOriginal, close: x.closeToOriginal, nearest: x.nearest,
    };
  });
  assert.equal(r.error, null);
  assert.ok(r.query.some((v) => v !== 1 && v !== -1), 'the noisy query is not continuous');
  assert.ok(r.energies.length >= 2);
  assert.equal(nonIncreasing(r.energies), null);
  assert.ok(r.equal || r.close, JSON.stringify({ equal: r.equal, close: r.close }));
  assert.equal(r.nearest.id, r.id);
  const back = await call('GetPatterns', { bank: 'demo-continuous', ids: [r.id] });
  let worst = 0;
  back.patterns.forEach((v, i) => { worst = Math.max(worst, Math.abs(v - r.state[i])); });
  assert.ok(worst < 0.05, `largest difference from the stored pattern ${worst}`);
  const png = decodePng(await screenshot('continuous'));
  const state = await regionStats(png, '#state-canvas');
  assert.ok(state.dark > 0.05 * state.pixels && state.light > 0.05 * state.pixels, `state canvas ${JSON.stringify(state)}`);
  assert.deepEqual(pageErrors, []);
});
